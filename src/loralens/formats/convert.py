"""``convert``: one LoRA file or folder written in another format (PEFT folder, kohya or diffusers
file), exactly: every layer's rank and alpha as read, LyCORIS layers (LoHa, LoKr, LoCon-Tucker)
as plain LoRA at their exact rank, layers under the module names the target format's library
loads (:mod:`loralens.formats.canonical`)."""

from __future__ import annotations

import os
from pathlib import Path

from loralens import atomic
from loralens.errors import OutputExistsError, SettingsError
from loralens.formats.file_writers import save_diffusers, save_kohya
from loralens.formats.peft import save_peft
from loralens.lora import LoRA

#: Formats ``convert`` writes -> their writer.
WRITERS = {"peft": save_peft, "kohya": save_kohya, "diffusers": save_diffusers}
#: The format a LoRA read as each format is written back as by default (``resize``).
SAME_FAMILY = {
    "peft": "peft",
    "kohya": "kohya",
    "lycoris": "kohya",
    "diffusers": "diffusers",
    "comfyui": "diffusers",
    "xlabs": "diffusers",
}


def write_lora(lora: LoRA, out: str | os.PathLike[str], to: str) -> Path:
    """Write ``lora`` to ``out`` (a folder for peft, a .safetensors file otherwise) as ``to``,
    whole or not at all; refuses an ``out`` that exists, even one that appears while it is
    written (``OutputExistsError``)."""
    if to not in WRITERS:
        raise SettingsError(f"unknown target format {to!r}: expected one of {', '.join(WRITERS)}")
    out = Path(out)
    if atomic.output_exists(out, folder=True):
        raise OutputExistsError(f"{out}: already exists; remove it or choose another path")
    if to != "peft":
        return WRITERS[to](lora, out)  # one file, published without replacing anything
    with atomic.new_dir(out) as tmp:
        save_peft(lora, tmp)
    return out


def convert(src: str | os.PathLike[str], out: str | os.PathLike[str], *, to: str) -> Path:
    """Read the LoRA at ``src`` (any format ``load_lora`` reads) and write it to ``out`` as
    ``to`` ("peft", "kohya" or "diffusers"); returns the path written."""
    from loralens.formats.reader import load_lora

    if to not in WRITERS:
        raise SettingsError(f"unknown target format {to!r}: expected one of {', '.join(WRITERS)}")
    return write_lora(load_lora(src), out, to)
