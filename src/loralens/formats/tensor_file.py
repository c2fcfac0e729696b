"""Reading tensor files safely: safetensors, or pickled state dicts with ``weights_only=True`` only."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from loralens.formats.errors import LoRAFormatError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_safetensors_keys(path: Path) -> tuple[list[str], dict[str, str]]:
    """Keys and metadata of a safetensors file, reading only its header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except Exception as e:  # SafetensorError, OSError, ... all mean "not a readable file"
        raise LoRAFormatError(
            path, f"not a readable safetensors file (truncated or corrupt?): {e}"
        ) from e


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (in file order) and the metadata of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
            return tensors, dict(f.metadata() or {})
    except LoRAFormatError:
        raise
    except Exception as e:
        raise LoRAFormatError(
            path, f"not a readable safetensors file (truncated or corrupt?): {e}"
        ) from e


def read_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict saved with ``torch.save``, loaded with ``weights_only=True``.

    The restricted unpickler builds tensors and plain containers only: a file that holds any
    other object is refused, and no code from it ever runs.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests retrying with weights_only=False: never do that here
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next(
            (ln for ln in lines if "GLOBAL" in ln or "nsupported" in ln), lines[-1] if lines else ""
        )
        raise LoRAFormatError(
            path,
            "refused: the pickle holds objects other than tensors, so it was not loaded and none "
            f"of its code ran (loralens reads pickled weights with weights_only=True only): {detail}",
        ) from e
    except Exception as e:
        raise LoRAFormatError(path, f"not a readable PyTorch weights file: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise LoRAFormatError(
            path, f"expected a dict of name -> tensor (a state dict), got {type(obj).__name__}"
        )
    return dict(obj)


def read_tensor_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file or of a pickled state dict (.bin/.pt)."""
    if path.suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle_state_dict(path), {}
    raise LoRAFormatError(
        path, f"unknown weights file type {path.suffix!r}: expected .safetensors or .bin"
    )


def read_tensor_keys(path: Path) -> tuple[list[str], dict[str, str]]:
    """Keys and metadata, cheaply for safetensors (header only)."""
    if path.suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors_keys(path)
    tensors, meta = read_tensor_file(path)
    return list(tensors), meta
