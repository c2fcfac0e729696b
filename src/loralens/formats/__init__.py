"""Readers and writers of real LoRA files: PEFT folders, kohya and diffusers single files."""

from loralens.formats.detect import (
    FORMATS,
    detect_format,
    expand_adapters,
    find_adapters,
    load_lora,
)
from loralens.formats.errors import LoRAFormatError
from loralens.formats.peft import save_peft as save_lora

__all__ = [
    "FORMATS",
    "LoRAFormatError",
    "detect_format",
    "expand_adapters",
    "find_adapters",
    "load_lora",
    "save_lora",
]
