"""The hostile corpus: crafted adapters, labels, stores and runs, each built at test time.

Every builder writes its input under a folder and returns the path to hand to loralens. Each
entry is something an attacker or a broken tool produced; loralens must answer it with a clear
error naming the file (or a correct result), never run code from it, hang, or crash.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

import loralens as ll

MARKER = "PWNED"  # a file any payload in this corpus would create if it ran
LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")


def good_lora(seed: int = 0, rank: int = 2) -> ll.LoRA:
    """A valid two-layer LoRA with PEFT module names."""
    g = torch.Generator().manual_seed(seed)
    return ll.LoRA(
        layers=[
            ll.LoRALayer(name, torch.randn(8, rank, generator=g), torch.randn(8, rank, generator=g))
            for name in LAYERS
        ]
    )


def good_peft(folder: Path, seed: int = 0) -> Path:
    ll.save_lora(good_lora(seed), folder)
    return folder


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def pickle_payload(root: Path) -> Path:
    folder = good_peft(root / "pickle-payload")
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Payload(root / MARKER)}))
    return folder


def regex_bomb(root: Path) -> Path:
    folder = good_peft(root / "regex-bomb")
    _edit_config(folder, rank_pattern={"(.*.*)*X": 4})
    return folder


def fifo_weights(root: Path) -> Path:
    folder = good_peft(root / "fifo-weights")
    (folder / "adapter_model.safetensors").unlink()
    os.mkfifo(folder / "adapter_model.safetensors")
    return folder


def fifo_file(root: Path) -> Path:
    path = root / "fifo.safetensors"
    os.mkfifo(path)
    return path


def alpha_pattern_nan(root: Path) -> Path:
    folder = good_peft(root / "alpha-pattern-nan")
    cfg = (
        (folder / "adapter_config.json")
        .read_text()
        .replace('"alpha_pattern": {}', '"alpha_pattern": {"q_proj": NaN}')
    )
    (folder / "adapter_config.json").write_text(cfg)
    return folder


def alpha_huge(root: Path) -> Path:
    folder = good_peft(root / "alpha-huge")
    _edit_config(folder, lora_alpha=1e308)
    return folder


def rank_fractional(root: Path) -> Path:
    folder = good_peft(root / "rank-fractional")
    _edit_config(folder, r=4.5)
    return folder


def rank_pattern_inf(root: Path) -> Path:
    folder = good_peft(root / "rank-pattern-inf")
    cfg = (
        (folder / "adapter_config.json")
        .read_text()
        .replace('"rank_pattern": {}', '"rank_pattern": {"q_proj": Infinity}')
    )
    (folder / "adapter_config.json").write_text(cfg)
    return folder


def nested_config(root: Path) -> Path:
    folder = good_peft(root / "nested-config")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    text = json.dumps(cfg)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (folder / "adapter_config.json").write_text(text)
    return folder


def _retyped(root: Path, name: str, dtype: torch.dtype) -> Path:
    folder = good_peft(root / name)
    tensors = {k: (v * 10).to(dtype) for k, v in _tensors(folder).items()}
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def bool_factors(root: Path) -> Path:
    return _retyped(root, "bool-factors", torch.bool)


def int_factors(root: Path) -> Path:
    return _retyped(root, "int-factors", torch.int64)


def header_huge(root: Path) -> Path:
    path = root / "header-huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    return path


def header_offsets(root: Path) -> Path:
    header = json.dumps(
        {
            "lora_unet_a.lora_down.weight": {
                "dtype": "F32",
                "shape": [2, 4],
                "data_offsets": [0, 10**12],
            }
        }
    ).encode()
    path = root / "header-offsets.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 32)
    return path


def truncated(root: Path) -> Path:
    folder = good_peft(root / "truncated")
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def empty_weights(root: Path) -> Path:
    folder = good_peft(root / "empty-weights")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def kohya_alpha_huge(root: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    path = root / "kohya-alpha-huge.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.randn(2, 8, generator=g),
            "lora_unet_down_blocks_0_attn1_to_q.lora_up.weight": torch.randn(8, 2, generator=g),
            "lora_unet_down_blocks_0_attn1_to_q.alpha": torch.tensor(1e38),
        },
        path,
    )
    return path


def kohya_alpha_overflow(root: Path) -> Path:
    """alpha 1e38 over tiny lora_down weights: delta W fits float32, U^T U does not."""
    g = torch.Generator().manual_seed(0)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = root / "kohya-alpha-overflow.safetensors"
    save_file(
        {
            f"{stem}.lora_down.weight": torch.randn(2, 8, generator=g) * 1e-30,
            f"{stem}.lora_up.weight": torch.randn(8, 2, generator=g),
            f"{stem}.alpha": torch.tensor(1e38),
        },
        path,
    )
    return path


#: adapters that are hostile but valid: loralens must read them correctly, quickly.
VALID = {"regex-bomb"}  # the pattern matches no module: PEFT's rule gives the default rank

#: name -> builder of a hostile adapter (a folder or a file) under a given root.
ADAPTERS: dict[str, Callable[[Path], Path]] = {
    f.__name__.replace("_", "-"): f
    for f in (
        pickle_payload,
        regex_bomb,
        fifo_weights,
        fifo_file,
        alpha_pattern_nan,
        alpha_huge,
        rank_fractional,
        rank_pattern_inf,
        nested_config,
        bool_factors,
        int_factors,
        header_huge,
        header_offsets,
        truncated,
        empty_weights,
        kohya_alpha_huge,
        kohya_alpha_overflow,
    )
}
