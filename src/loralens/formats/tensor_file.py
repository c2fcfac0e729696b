"""Reading weights files safely: regular files only, safetensors read tensor by tensor, and pickled
state dicts with ``weights_only=True`` only.

A safetensors header is validated by the ``safetensors`` library itself; the tensors are then
read one at a time with plain reads, not through a memory map, so resident memory holds only the
tensors a caller keeps (a reader widening one layer at a time peaks near its own result).
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import warnings
from pathlib import Path
from typing import IO, Any

import torch

from loralens import atomic
from loralens.formats.errors import LoRAFormatError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

#: safetensors dtype names -> torch dtypes (those this torch has).
_DTYPES = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
        "C64": "complex64",
    }.items()
    if hasattr(torch, attr)
}


def refuse_special(path: Path, mode: int) -> None:
    """Raise unless ``mode`` (from stat) is a regular file's: nothing else is ever opened."""
    if not stat.S_ISREG(mode):
        raise LoRAFormatError(
            path,
            f"is {atomic.file_kind(mode)}, not a regular file; loralens opens regular files only",
        )


def open_regular(path: Path) -> IO[bytes]:
    """Open ``path`` for reading if it is a regular file (symlinks followed); refuse anything
    else with a LoRAFormatError (checked before opening and on the open descriptor, opened
    without blocking, so a named pipe can never hang the reader)."""
    try:
        return atomic.open_regular(path)
    except atomic.SpecialFileError as e:
        raise LoRAFormatError(
            path, f"is {e.kind}, not a regular file; loralens opens regular files only"
        ) from e
    except OSError as e:
        raise LoRAFormatError(path, f"cannot open: {e.strerror or e}") from e


#: Bytes read per step when widening a tensor into its destination.
CHUNK_BYTES = 4 * 2**20


class TensorFile:
    """An open weights file: ``keys``, header ``metadata``, and each tensor's dtype and shape
    now; a tensor's values when read into a caller's buffer (:meth:`read_into`)."""

    def __init__(self, path: Path, keys: list[str], metadata: dict[str, str]) -> None:
        self.path, self.keys, self.metadata = path, keys, metadata

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Copy the tensor into ``out`` (any dtype and strides), seen as ``rows x rest`` (rows
        = its first axis, 1 for a scalar), converting on the way."""
        raise NotImplementedError

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor as a new contiguous tensor of ``dtype``."""
        out = torch.empty(self.shape(key), dtype=dtype)
        self.read_into(key, as_rows(out))
        return out

    def close(self) -> None:
        """Release the file (nothing to release by default)."""

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (contiguous) as a 2-D view: its first axis by the rest (1 x 1 for a scalar)."""
    return t.reshape(t.shape[0] if t.ndim else 1, -1)


class SafetensorsFile(TensorFile):
    """A safetensors file whose tensors are read with plain reads, a chunk at a time."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._file = open_regular(path)
        try:
            try:  # the library's own validation of the header (offsets, sizes, dtypes)
                with safe_open(str(path), framework="pt") as f:
                    keys, metadata = list(f.keys()), dict(f.metadata() or {})
                n = int.from_bytes(self._read_exact(0, 8), "little")
                if 8 + n > os.fstat(self._file.fileno()).st_size:  # changed since validated
                    raise LoRAFormatError(path, "changed while being read")
                header = json.loads(self._read_exact(8, n))
            except LoRAFormatError:
                raise
            except Exception as e:  # SafetensorError, OSError, ... all mean "not readable"
                raise LoRAFormatError(
                    path, f"not a readable safetensors file (truncated or corrupt?): {e}"
                ) from e
            self._start = 8 + n
            self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
            if set(self._entries) != set(keys):
                raise LoRAFormatError(path, "changed while being read")
        except BaseException:
            self._file.close()
            raise
        super().__init__(path, keys, metadata)

    def _read_exact(self, offset: int, size: int) -> bytearray:
        buf = bytearray(size)
        self._read_buffer(offset, memoryview(buf))
        return buf

    def _read_buffer(self, offset: int, view: memoryview) -> None:
        self._file.seek(offset)
        done = 0
        while done < len(view):
            got = self._file.readinto(view[done:])
            if not got:
                raise LoRAFormatError(self.path, "truncated while being read")
            done += got

    def dtype(self, key: str) -> torch.dtype:
        name = self._entries[key]["dtype"]
        if name not in _DTYPES:
            raise LoRAFormatError(self.path, f"tensor {key!r} has unsupported dtype {name}")
        return _DTYPES[name]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._entries[key]["shape"])

    def read_into(self, key: str, out: torch.Tensor) -> None:
        dtype, shape = self.dtype(key), self.shape(key)
        rows = shape[0] if shape else 1
        begin, end = self._entries[key]["data_offsets"]
        if rows == 0 or end == begin:
            return
        row_bytes = (end - begin) // rows
        step = max(1, CHUNK_BYTES // row_bytes)
        buf = torch.empty(min(rows, step) * row_bytes, dtype=torch.uint8)
        for i in range(0, rows, step):
            k = min(step, rows - i)
            chunk = buf[: k * row_bytes]
            self._read_buffer(self._start + begin + i * row_bytes, memoryview(chunk.numpy()))
            out[i : i + k].copy_(chunk.view(dtype).reshape(k, -1))

    def close(self) -> None:
        self._file.close()


class PickleFile(TensorFile):
    """A state dict saved with ``torch.save``, loaded whole with ``weights_only=True``."""

    def __init__(self, path: Path) -> None:
        with open_regular(path) as f:
            self._tensors = read_pickle_state_dict(f, path)
        super().__init__(path, list(self._tensors), {})

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        out.copy_(self._tensors[key].reshape(out.shape))


def read_pickle_state_dict(f: IO[bytes], path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``f`` (the open file at ``path``), loaded with ``weights_only=True``.

    The restricted unpickler builds tensors and plain containers only: a file that holds any
    other object is refused, and no code from it ever runs.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
            obj = torch.load(f, map_location="cpu", weights_only=True)
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
        detail = str(e).strip() or type(e).__name__
        raise LoRAFormatError(path, f"not a readable PyTorch weights file: {detail}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoRAFormatError(
            path, f"expected a dict of name -> tensor (a state dict), got {type(obj).__name__}"
        )
    for k, v in obj.items():
        if not (isinstance(k, str) and isinstance(v, torch.Tensor)):
            raise LoRAFormatError(
                path,
                f"expected a dict of name -> tensor (a state dict), but {str(k)[:200]!r} "
                f"holds a {type(v).__name__}",
            )
    return dict(obj)


def open_tensor_file(path: Path) -> TensorFile:
    """The .safetensors file or pickled state dict (.bin/.pt) at ``path``, opened for reading."""
    if path.suffix in SAFETENSORS_SUFFIXES:
        return SafetensorsFile(path)
    if path.suffix in PICKLE_SUFFIXES:
        return PickleFile(path)
    raise LoRAFormatError(
        path, f"unknown weights file type {path.suffix!r}: expected .safetensors or .bin"
    )


def read_tensor_keys(path: Path) -> tuple[list[str], dict[str, str]]:
    """Keys and metadata, cheaply for safetensors (header only)."""
    with open_tensor_file(path) as f:
        return f.keys, f.metadata
