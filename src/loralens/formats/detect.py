"""Which LoRA format a path holds, and opening it with that format's reader."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from loralens.formats.diffusers import ADAPTER_METADATA_KEY, COMPONENTS, open_diffusers
from loralens.formats.errors import LoRAFormatError
from loralens.formats.keys import (
    DIFFUSERS_KEY,
    KOHYA_KEY,
    LORA_MID_KEY,
    LYCORIS_KEY,
    PEFT_KEY,
    XLABS_KEY,
    refuse_not_low_rank,
)
from loralens.formats.kohya import open_kohya
from loralens.formats.layers import FileLayers
from loralens.formats.peft import (
    CONFIG_NAME,
    PREFIX,
    WEIGHT_NAMES,
    has_config,
    is_peft_dir,
    open_peft,
    open_peft_weights_only,
)
from loralens.formats.peft_lycoris import open_peft_lycoris, peft_lycoris_algorithm
from loralens.formats.single_file import open_single_file
from loralens.formats.tensor_file import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    read_tensor_keys,
    refuse_special,
)

FORMATS = ("peft", "kohya", "diffusers", "comfyui", "xlabs", "lycoris")
EXPECTED = (
    "expected a PEFT adapter folder (adapter_config.json + adapter_model.safetensors or "
    "adapter_model.bin), or a LoRA .safetensors/.bin file in PEFT (*.lora_A.weight), kohya "
    "(lora_unet_*.lora_down.weight), diffusers (unet.*.lora.down.weight), ComfyUI "
    "(diffusion_model.*), XLabs (double_blocks.*.processor.qkv_lora1.down.weight) or LyCORIS "
    "(*.hada_w1_a, *.lokr_w1, *.lora_mid.weight) style"
)
#: Key prefixes of ComfyUI's own model layout (and of ai-toolkit files written for it).
COMFYUI_PREFIXES = ("diffusion_model.", "text_encoders.")


def _single_weights_in(folder: Path) -> Path | None:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in SAFETENSORS_SUFFIXES]
    return files[0] if len(files) == 1 else None


def _resolve(path: Path) -> tuple[str, Path]:
    """(format, the file or folder that holds it). Nothing but regular files is ever opened."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as e:
        raise LoRAFormatError(path, f"no such file or folder; {EXPECTED}") from e
    except OSError as e:  # a symlink loop, a folder we may not enter, ...
        raise LoRAFormatError(path, f"cannot read: {e.strerror or e}") from e
    if path.name == CONFIG_NAME and not stat.S_ISDIR(mode):
        path = path.parent  # the config stands for its adapter folder (reading it checks it)
    elif not stat.S_ISDIR(mode):
        refuse_special(path, mode)
        return _file_format(path), path
    try:
        return _folder_format(path)
    except OSError as e:  # unreadable folder
        raise LoRAFormatError(path, f"cannot list the folder: {e.strerror or e}") from e


def _folder_format(path: Path) -> tuple[str, Path]:
    if is_peft_dir(path):
        return "peft", path
    if any((path / w).exists() for w in WEIGHT_NAMES):
        raise LoRAFormatError(
            path, f"missing {CONFIG_NAME}: a PEFT adapter folder needs it beside the weights"
        )
    subs = sorted(p.name for p in path.iterdir() if is_peft_dir(p))
    if subs:
        raise LoRAFormatError(
            path,
            f"holds PEFT adapters in sub-folders ({', '.join(subs[:5])}); load one of them",
        )
    single = _single_weights_in(path)
    if single is not None:
        return _file_format(single), single
    raise LoRAFormatError(path, f"folder holds no LoRA; {EXPECTED}")


def _file_format(path: Path) -> str:
    if path.suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise LoRAFormatError(path, f"unknown file type {path.suffix!r}; {EXPECTED}")
    keys, st_meta = read_tensor_keys(path)
    if not keys:
        raise LoRAFormatError(path, f"holds no tensors; {EXPECTED}")
    if any(k.startswith(PREFIX) for k in keys) and has_config(path.parent):
        return "peft"  # a PEFT folder's weights (LoRA, LoHa or LoKr), read with its config
    if any(LYCORIS_KEY.match(k) or LORA_MID_KEY.match(k) for k in keys):
        return "lycoris"
    if any(XLABS_KEY.match(k) for k in keys):
        return "xlabs"
    lora_keys = [k for k in keys if KOHYA_KEY.match(k) or PEFT_KEY.match(k)]
    if lora_keys and all(k.startswith(COMFYUI_PREFIXES) for k in lora_keys):
        return "comfyui"
    if any(KOHYA_KEY.match(k) for k in keys):
        return "kohya"
    if any(DIFFUSERS_KEY.match(k) for k in keys):
        return "diffusers"
    if any(PEFT_KEY.match(k) for k in keys):
        if any(k.startswith(PREFIX) for k in keys) or has_config(path.parent):
            return "peft"
        if ADAPTER_METADATA_KEY in st_meta or any(k.startswith(COMPONENTS) for k in keys):
            return "diffusers"
        return "peft"
    refuse_not_low_rank(keys, path)
    shown = ", ".join(repr(k) for k in keys[:3])
    raise LoRAFormatError(path, f"no LoRA keys found (keys like {shown}); {EXPECTED}")


def find_adapters(folder: Path, suffixes: tuple[str, ...] = SAFETENSORS_SUFFIXES) -> list[Path]:
    """Every adapter under ``folder``, sorted: PEFT folders (holding adapter_config.json; not
    searched further) and files ending in ``suffixes``. Hidden folders and folder links are
    not followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if CONFIG_NAME in filenames:
            found.append(here)
            dirnames.clear()
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [here / f for f in filenames if f.endswith(suffixes)]
    return sorted(found)


def expand_adapters(paths: list[str | os.PathLike[str]]) -> list[Path]:
    """``paths`` with every folder that is not itself an adapter replaced by the adapters in
    it (:func:`find_adapters`); anything else, readable or not, is kept as given."""
    out: list[Path] = []
    for p in map(Path, paths):
        found = []
        if p.is_dir():
            try:
                _resolve(p)
            except LoRAFormatError:
                found = find_adapters(p)
        out += found or [p]
    return out


def detect_format(path: str | os.PathLike[str]) -> str:
    """The LoRA format at ``path``: one of :data:`FORMATS` ("peft", "kohya", "diffusers",
    "comfyui", "xlabs", "lycoris"), named for what the file is.

    Raises ``LoRAFormatError`` (naming the path and what was expected) for anything else.
    """
    return _resolve(Path(path))[0]


def open_file_layers(path: Path, allow_nonfinite: bool) -> FileLayers:
    """The adapter at ``path`` opened by its format's reader, its layers planned."""
    fmt, where = _resolve(path)
    if fmt == "peft":
        if peft_lycoris_algorithm(where if where.is_dir() else where.parent):
            return open_peft_lycoris(where, allow_nonfinite=allow_nonfinite)
        if where.is_dir():
            return open_peft(where, allow_nonfinite=allow_nonfinite)
        if has_config(where.parent):
            return open_peft(where, allow_nonfinite=allow_nonfinite, weights=where)
        return open_peft_weights_only(where, allow_nonfinite=allow_nonfinite)
    if fmt == "kohya":
        return open_kohya(where, allow_nonfinite=allow_nonfinite)
    if fmt == "diffusers":
        return open_diffusers(where, allow_nonfinite=allow_nonfinite)
    return open_single_file(where, fmt, allow_nonfinite=allow_nonfinite)
