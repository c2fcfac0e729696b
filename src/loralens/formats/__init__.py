"""Readers and writers of real LoRA files: PEFT folders, kohya and diffusers single files."""

from loralens.formats.canonical import model_family
from loralens.formats.convert import convert, write_lora
from loralens.formats.detect import FORMATS, detect_format, expand_adapters, find_adapters
from loralens.formats.errors import LoRAFormatError
from loralens.formats.file_writers import save_diffusers, save_kohya
from loralens.formats.peft import save_peft as save_lora
from loralens.formats.reader import LoRAReader, load_lora, open_lora

__all__ = [
    "FORMATS",
    "LoRAFormatError",
    "LoRAReader",
    "convert",
    "detect_format",
    "expand_adapters",
    "find_adapters",
    "load_lora",
    "model_family",
    "open_lora",
    "save_diffusers",
    "save_kohya",
    "save_lora",
    "write_lora",
]
