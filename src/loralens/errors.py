"""The errors loralens raises on purpose, one family under :class:`LoRALensError`, and its
warning. The CLI turns these, and only these, into one ``error:`` line and an exit code (input
1, settings 2, output in the way 3, output not writable 4); anything else is a bug and keeps its traceback. Each package's own
kinds (``LoRAFormatError``, ``StoreError``, ...) live beside their code and derive from these."""

from __future__ import annotations


class LoRALensError(Exception):
    """Something loralens refuses on purpose, with a message naming the file or setting."""


class InputError(LoRALensError, ValueError):
    """An input (adapter, labels, store, run, index, zoo) that cannot be read or is invalid."""


class SettingsError(LoRALensError, ValueError):
    """A setting out of its range or of the wrong type (an option, a hyperparameter)."""


class OutputExistsError(LoRALensError, ValueError):
    """The output already exists, or was made with other settings: writing would lose or mix it."""


class OutputError(LoRALensError, OSError):
    """An output that cannot be written: a read-only or full folder, an I/O error."""


class RunError(InputError):
    """A run directory that cannot be used: a missing, malformed or inconsistent file."""


class RunNotFoundError(RunError, FileNotFoundError):
    """A run directory, or one of its files, that does not exist."""


class NonFiniteOutputError(InputError):
    """A model whose outputs are NaN/inf for some inputs (diverged, or inputs far off scale)."""


class LoRALensWarning(UserWarning):
    """Something a result should be read with (an assumption made, a number that may mislead):
    the CLI prints it as one ``warning:`` line."""
