"""The one error every reader and writer raises for a file it cannot read as a LoRA."""

from __future__ import annotations

import os

from loralens.errors import InputError


class LoRAFormatError(InputError):
    """A file or folder is not a LoRA loralens can read exactly.

    The message always starts with the path, then says what is wrong and, where it helps, what
    was expected. ``path`` and ``problem`` hold the two parts.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
