"""kohya-ss single-file LoRAs (the Stable Diffusion trainers' format).

Keys: ``lora_unet_<path_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
(``lora_te_``, ``lora_te1_``, ``lora_te2_`` for text encoders). The scale is alpha / rank, and
an alpha of 0 or a missing alpha means alpha = rank (scale 1). This is kohya's own rule
(``scale = alpha / lora_dim`` per module); it agrees with diffusers' ``fuse_lora`` whenever the
file has one alpha for all modules (as kohya's trainer writes it;
tests/formats/test_formats_diffusers_fuse.py). With different alphas per module, diffusers 0.42
applies a shared alpha to attention modules instead of each module's own. The reader names
layers by the kohya stems (``lora_unet_down_blocks_0_..._to_q``); ``load_lora`` then maps them
to module paths where the model's grammar says which (:mod:`loralens.formats.canonical`). The
safetensors header metadata (e.g. ``ss_network_dim``) is kept in
``lora.metadata["safetensors_metadata"]``.
"""

from __future__ import annotations

from pathlib import Path

from loralens.formats.layers import FileLayers
from loralens.formats.single_file import open_single_file


def open_kohya(path: Path, *, allow_nonfinite: bool = False) -> FileLayers:
    """Open a kohya-style .safetensors (or weights-only .bin) file."""
    return open_single_file(path, "kohya", allow_nonfinite=allow_nonfinite)
