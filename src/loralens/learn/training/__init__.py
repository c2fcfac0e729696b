"""``train``: one split or cross-validation, the calibration step, and the run folder
written."""
