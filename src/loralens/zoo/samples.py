"""``loralens zoo samples``: a PNG grid of a digits zoo's images with and without one LoRA.

For every prompt, two rows: the base model alone and the base model with the LoRA, generated
from the same starting noise (column j uses sampling seed j), so the difference between the rows
is what the LoRA does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from loralens.errors import InputError
from loralens.zoo.digits.data import IMAGE, prompt_for
from loralens.zoo.digits.model import DiffusionBase, load_adapter
from loralens.zoo.digits.sampling import fixed_noise, sample
from loralens.zoo.folder import MANIFEST, read_manifest


def default_prompts(row: dict | None) -> list[str]:
    """The adapter's own prompt(s) first (instance prompt, or its classes), then a few others."""
    prompts: list[str] = []
    row = row or {}
    if row.get("instance_prompt"):
        prompts.append(str(row["instance_prompt"]))
    present = [c for c in range(10) if str(row.get(f"class_{c}", "")) in {"1", "1.0", "True"}]
    prompts += [prompt_for(c) for c in present[:4]]
    for p in ("a zero", "a three", "a bold seven", "a slanted four"):
        if p not in prompts and len(prompts) < 6:
            prompts.append(p)
    return prompts


def _adapter_dir(zoo: Path, adapter: str) -> Path:
    for cand in (Path(adapter), zoo / "adapters" / adapter):
        if (cand / "adapter_config.json").is_file():
            return cand
    if adapter.isdigit() and (zoo / "adapters" / f"{int(adapter):06d}").is_dir():
        return zoo / "adapters" / f"{int(adapter):06d}"
    raise InputError(f"no adapter {adapter!r} in {zoo / 'adapters'} (and no such folder)")


@torch.no_grad()
def render_samples(
    zoo: Path | str,
    adapter: str,
    out: Path | str,
    *,
    prompts: Sequence[str] | None = None,
    seeds: int = 6,
    steps: int | None = None,
    guidance: float | None = None,
    scale: int = 6,
) -> dict:
    """Write the grid PNG to ``out``; returns what was drawn (prompts, seeds, rows, size)."""
    zoo = Path(zoo)
    manifest = read_manifest(zoo) if (zoo / MANIFEST).exists() else {}
    opts = manifest.get("options", {})
    if not (zoo / "base" / "unet").is_dir():
        raise InputError(
            f"{zoo} has no diffusion base model (base/unet): `zoo samples` draws zoos of the "
            "digits presets (digits-dreambooth, digits-subsets)"
        )
    adir = _adapter_dir(zoo, adapter)
    row = None
    if (adir / "labels.json").is_file():
        row = json.loads((adir / "labels.json").read_text())
    prompts = list(prompts) if prompts else default_prompts(row)
    steps = int(steps or opts.get("sample_steps", 8))
    guidance = float(guidance if guidance is not None else opts.get("guidance", 3.0))
    base = DiffusionBase.load(zoo / "base")
    lora_unet = load_adapter(base.unet, adir)
    noise = fixed_noise(seeds, 0)
    uncond = base.encode([""])
    rows, labels = [], []
    for p in prompts:
        cond = base.encode([p]).expand(seeds, -1, -1)
        for tag, unet in (("base", base.unet), ("LoRA", lora_unet)):
            rows.append(
                sample(
                    unet, base.scheduler, cond, noise, uncond=uncond, steps=steps, guidance=guidance
                )
            )
            labels.append(f"{tag}: {p}")
    grid = image_grid(rows, scale=scale)
    grid = _with_row_labels(grid, labels, cell=IMAGE * scale + 2)
    title = f"{adir.name}: rows = base model / with LoRA, columns = seeds 0..{seeds - 1}"
    grid = _with_title(grid, title)
    save_png(grid, Path(out))
    return {"adapter": str(adir), "prompts": prompts, "seeds": seeds, "size": list(grid.shape[:2])}


def image_grid(rows: Sequence[torch.Tensor], scale: int = 6, pad: int = 2) -> np.ndarray:
    """Rows of (n, 1, 8, 8) images in [-1, 1] -> an RGB uint8 array (white gaps between cells)."""
    n = max(r.shape[0] for r in rows)
    cell = IMAGE * scale
    h = len(rows) * (cell + pad) + pad
    w = n * (cell + pad) + pad
    out = np.full((h, w), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        for j in range(r.shape[0]):
            img = ((1 - (r[j, 0].clamp(-1, 1) + 1) / 2) * 255).round().to(torch.uint8).numpy()
            img = np.kron(img, np.ones((scale, scale), dtype=np.uint8))
            y0, x0 = pad + i * (cell + pad), pad + j * (cell + pad)
            out[y0 : y0 + cell, x0 : x0 + cell] = img
    return np.stack([out] * 3, axis=-1)


def save_png(array: np.ndarray, path: Path) -> None:
    """Write an RGB uint8 array as a PNG file (folders made as needed)."""
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _with_row_labels(grid: np.ndarray, labels: Sequence[str], cell: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    width = 8 + 7 * max(len(s) for s in labels)
    img = Image.new("RGB", (grid.shape[1] + width, grid.shape[0]), "white")
    img.paste(Image.fromarray(grid), (width, 0))
    draw = ImageDraw.Draw(img)
    for i, s in enumerate(labels):
        draw.text(
            (4, 2 + i * cell + cell // 2 - 6),
            s,
            fill="black" if s.startswith("base") else "darkred",
        )
    return np.asarray(img)


def _with_title(grid: np.ndarray, title: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    w = max(grid.shape[1], 8 + 6 * len(title))
    img = Image.new("RGB", (w, grid.shape[0] + 18), "white")
    img.paste(Image.fromarray(grid), (0, 18))
    ImageDraw.Draw(img).text((4, 3), title, fill="black")
    return np.asarray(img)
