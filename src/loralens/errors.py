"""Errors shared across packages (each package's own input errors live beside its code)."""

from __future__ import annotations


class OutputExistsError(ValueError):
    """The output already exists, or was made with other settings: writing would lose or mix it."""


class LoRALensWarning(UserWarning):
    """Something a result should be read with (an assumption made, a number that may mislead):
    the CLI prints it as one ``warning:`` line."""
