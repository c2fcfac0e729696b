"""How far a prediction can be trusted: conformal intervals and sets, the fit check (layout,
update size, distribution scores), the span score and a run's calibration."""
