"""Errors shared across packages (each package's own input errors live beside its code)."""

from __future__ import annotations


class OutputExistsError(ValueError):
    """The output already exists, or was made with other settings: writing would lose or mix it."""
