"""What a model is fitted on and how: targets and tasks, rows and splits, the ``--where``
filter, linear probes and the linear base, and the epochs with early stopping."""
