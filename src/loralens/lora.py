"""The one representation of a LoRA used everywhere: layers of (name, U, V) with delta W = U @ V.T."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from loralens.errors import InputError


def delta_weight(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """delta W = U @ V.T (out x in) of one layer's factors, or of stacks of them (..., out, r)."""
    return U @ V.mT


#: A float32 Gram diagonal below this may have lost a nonzero column's squares to underflow.
_SQUARE_UNDERFLOWS = 2.0**-100

#: Entries of a factor widened or tested at once by :func:`row_blocks` (4 MiB as float64).
BLOCK_ENTRIES = 2**19


def row_blocks(f: torch.Tensor, dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """``f`` (at least 1-D: an n x r factor) as blocks along its first axis (cast to
    ``dtype``), each of at most :data:`BLOCK_ENTRIES` entries: work on a wide factor without a
    whole copy of it."""
    step = max(1, BLOCK_ENTRIES // max(1, math.prod(f.shape[1:])))
    for i in range(0, f.shape[0], step):
        block = f[i : i + step]
        yield block if dtype is None else block.to(dtype)


def factor_gram(f: torch.Tensor) -> torch.Tensor:
    """f^T f of an (n x r) factor in float64, summed over blocks of rows: each block's product
    in float32 (float64 for float64 factors) like a GEMM, or in float64 where float32 overflows,
    so it never overflows and never copies the whole factor."""
    dtype = torch.float64 if f.dtype == torch.float64 else torch.float32
    gram = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
    for block in row_blocks(f, dtype):
        part = block.mT @ block
        small = part.diagonal() < _SQUARE_UNDERFLOWS
        if not bool(torch.isfinite(part.sum())) or bool((block[:, small] != 0).any()):
            part = block.mT.double() @ block.double()  # overflowed or underflowed: redo exactly
        gram += part
    return gram


#: Largest Frobenius norm of a factor and of delta W: its square (the Grams U^T U and V^T V,
#: |delta W|_F^2) must fit float32, the precision every command computes them in.
MAX_NORM = math.sqrt(float(torch.finfo(torch.float32).max))


def overflowing_norm(U: torch.Tensor, V: torch.Tensor) -> tuple[str, str, float] | None:
    """(what, symbol, |.|_F) of the first of U, V and delta W = U @ V.T whose squared norm
    overflows float32 (a kohya alpha of 1e38 over tiny ``lora_down`` weights makes delta W fit
    and U^T U not), else None. From the r x r Grams: delta W is never formed."""
    gu, gv = factor_gram(U), factor_gram(V)
    squares = (
        ("up factor (the scale folded in)", "U", gu.trace()),
        ("down factor", "V", gv.trace()),
        ("delta W", "delta W", (gu * gv).sum().clamp(min=0)),
    )
    for what, symbol, square in squares:
        fro = math.sqrt(float(square))
        if not fro < MAX_NORM:
            return what, symbol, fro
    return None


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN/inf. A sum is finite only if every term is (NaN and inf
    propagate), and summing is ~30x faster than ``isfinite`` and allocates nothing; a sum that
    overflows (huge but finite values) falls back to the exact test, a block at a time."""
    if bool(torch.isfinite(t.sum())):
        return True
    return all(
        bool(torch.isfinite(b).all()) for b in row_blocks(t.reshape(-1) if t.ndim == 0 else t)
    )


@dataclass
class LoRALayer:
    """One adapted weight matrix: delta W = U @ V.T, U (out x r), V (in x r), scale folded into U.

    ``meta`` carries what the math does not need but a writer or a reader of results does:
    ``kind`` ("linear", "conv", "embedding"), ``kernel_size`` for conv layers, ``scale`` (the
    alpha / r factor folded into U), ``magnitude`` (DoRA) and ``magnitude_convention``,
    ``fan_in_fan_out``; from ``load_lora``: ``file_key`` (the file's own module name),
    ``canonical`` (whether the name is a known module path) and ``component`` (the pipeline
    component, for diffusion pipelines).
    """

    name: str
    U: torch.Tensor
    V: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.U.ndim != 2 or self.V.ndim != 2:
            raise InputError(
                f"layer {self.name!r}: U and V must be 2-D (out x r, in x r), "
                f"got U {tuple(self.U.shape)} and V {tuple(self.V.shape)}"
            )
        if not (self.U.is_floating_point() and self.V.is_floating_point()):
            raise InputError(
                f"layer {self.name!r}: U and V must be floating point, got "
                f"{self.U.dtype} and {self.V.dtype}"
            )
        if self.U.shape[1] != self.V.shape[1]:
            raise InputError(
                f"layer {self.name!r}: U {tuple(self.U.shape)} and V {tuple(self.V.shape)} "
                "disagree on the rank (second axis)"
            )

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.U.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.V.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of delta W (out, in)."""
        return (self.out_features, self.in_features)

    def delta_weight(self) -> torch.Tensor:
        """delta W = U @ V.T in the math orientation (out x in)."""
        return delta_weight(self.U, self.V)

    def __repr__(self) -> str:
        return f"LoRALayer({self.name!r}, {self.out_features}x{self.in_features}, rank {self.rank})"

    def with_factors(self, U: torch.Tensor, V: torch.Tensor) -> LoRALayer:
        """A copy of this layer with other factors and the same name and metadata."""
        return replace(self, U=U, V=V, meta=dict(self.meta))


@dataclass
class LoRA:
    """An ordered list of layers (base model's module order) plus metadata.

    Metadata keys used by loralens: ``format`` (source format), ``base_model``,
    ``target_modules``, ``source`` (path it was read from), ``peft_config`` (the adapter
    config as read), ``safetensors_metadata``.
    """

    layers: list[LoRALayer]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [layer.name for layer in self.layers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InputError(f"LoRA has duplicate layer names: {dupes}")

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        dtype = str(self.layers[0].U.dtype).removeprefix("torch.") if self.layers else "empty"
        fmt = self.metadata.get("format")
        source = self.metadata.get("source")
        return (
            f"LoRA({len(self.layers)} layers, {_rank_text(self.ranks)}, {dtype}"
            + (f", {fmt}" if fmt else "")
            + (f", source={str(source)!r}" if source else "")
            + ")"
        )

    def __iter__(self) -> Iterator[LoRALayer]:
        return iter(self.layers)

    def __getitem__(self, name: str) -> LoRALayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [layer.shape for layer in self.layers]

    @property
    def ranks(self) -> list[int]:
        return [layer.rank for layer in self.layers]

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """Map layer name -> delta W (out x in), equal to what the source library merges."""
        return {layer.name: layer.delta_weight() for layer in self.layers}

    def map_factors(self, fn) -> LoRA:
        """A new LoRA whose layer i has factors ``fn(i, layer) -> (U, V)``."""
        layers = [layer.with_factors(*fn(i, layer)) for i, layer in enumerate(self.layers)]
        return LoRA(layers=layers, metadata=dict(self.metadata))

    def to(self, *args: Any, **kwargs: Any) -> LoRA:
        """Move/cast every factor, like ``torch.Tensor.to``."""
        return self.map_factors(lambda _, la: (la.U.to(*args, **kwargs), la.V.to(*args, **kwargs)))


@dataclass(frozen=True)
class LayerSpec:
    """What a model needs to know about its inputs: layer names, delta-W shapes and ranks."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    ranks: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "ranks": list(self.ranks),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerSpec:
        return cls(
            names=tuple(d["names"]),
            shapes=tuple(tuple(int(x) for x in s) for s in d["shapes"]),
            ranks=tuple(int(r) for r in d["ranks"]),
        )

    def describe_mismatch(self, other: LayerSpec) -> str:
        """A human-readable list of how ``other``'s layers differ from these (empty if they fit)."""
        problems = []
        mine, theirs = dict(zip(self.names, self.shapes)), dict(zip(other.names, other.shapes))
        missing = [n for n in self.names if n not in theirs]
        extra = [n for n in other.names if n not in mine]
        if missing:
            problems.append(f"missing layers: {_clip(missing)}")
        if extra:
            problems.append(f"unexpected layers: {_clip(extra)}")
        wrong = [
            f"{n}: {theirs[n]} != {mine[n]}"
            for n in self.names
            if n in theirs and theirs[n] != mine[n]
        ]
        if wrong:
            problems.append(f"shape mismatch (out, in): {_clip(wrong)}")
        if not problems and list(self.names) != list(other.names):
            problems.append("same layers in a different order")
        return "; ".join(problems)


def _rank_text(ranks: Sequence[int]) -> str:
    """ "rank 4" when every layer has rank 4, else "ranks 2-8" (smallest to largest)."""
    lo, hi = (min(ranks), max(ranks)) if ranks else (0, 0)
    return f"rank {hi}" if lo == hi else f"ranks {lo}-{hi}"


def _clip(items: Sequence[str], k: int = 8) -> str:
    shown = ", ".join(items[:k])
    return shown + (f", ... ({len(items) - k} more)" if len(items) > k else "")


@dataclass
class LoRABatch:
    """LoRAs with the same layer names and shapes, stacked per layer.

    ``U[i]`` is (B, out_i, r_i) and ``V[i]`` is (B, in_i, r_i), where r_i is the largest rank of
    layer i in the batch; smaller ranks are zero-padded on the rank axis, which changes no
    U @ V.T (:meth:`pad_to` widens further, e.g. to a model's ranks). ``ranks`` (B x L) holds
    each LoRA's true rank per layer. :func:`collate` and the store lay factors out rank-major
    (``U[i].mT`` contiguous, see :func:`factor_zeros`); any layout works, but the skinny
    products on wide layers run several times faster on this one.
    """

    names: list[str]
    U: list[torch.Tensor]
    V: list[torch.Tensor]
    ranks: torch.Tensor
    #: what :meth:`derived` keeps; a batch made from this one (``select``, ``pad_to``, ``to``,
    #: ``replace``) starts without it
    _derived: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.U[0].shape[0]) if self.U else 0

    def derived(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, kept on this batch under ``key``: what several readers of one batch
        derive from its factors alone (a model's linear base and its network both read the
        spectrum) is computed once. Factors that require grad are never kept from."""
        if any(u.requires_grad for u in self.U) or any(v.requires_grad for v in self.V):
            return compute()
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    def __repr__(self) -> str:
        widths = [int(u.shape[2]) for u in self.U]
        where = f", {self.dtype}, {self.device}".replace("torch.", "") if self.U else ""
        return (
            f"LoRABatch({len(self)} LoRAs, {self.num_layers} layers, {_rank_text(widths)}{where})"
        )

    @property
    def num_layers(self) -> int:
        return len(self.names)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(int(u.shape[1]), int(v.shape[1])) for u, v in zip(self.U, self.V)]

    @property
    def spec(self) -> LayerSpec:
        return LayerSpec(
            names=tuple(self.names),
            shapes=tuple(self.shapes),
            ranks=tuple(int(u.shape[2]) for u in self.U),
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.U[0].dtype

    @property
    def device(self) -> torch.device:
        return self.U[0].device

    def to(self, *args: Any, **kwargs: Any) -> LoRABatch:
        """Move/cast every factor (the integer ``ranks`` only moves device)."""
        U = [u.to(*args, **kwargs) for u in self.U]
        V = [v.to(*args, **kwargs) for v in self.V]
        return LoRABatch(names=list(self.names), U=U, V=V, ranks=self.ranks.to(U[0].device))

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> LoRABatch:
        """The sub-batch at ``index`` along the batch axis."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return LoRABatch(
            names=list(self.names),
            U=[u[index] for u in self.U],
            V=[v[index] for v in self.V],
            ranks=self.ranks[index],
        )

    def pad_to(self, ranks: Sequence[int]) -> LoRABatch:
        """This batch with layer i's rank axis zero-padded to width ``ranks[i]`` (exact: zero
        columns change no U @ V.T). Layers already that wide are shared, not copied; a width
        below the batch's own is refused (padding never truncates)."""
        widths = [int(r) for r in ranks]
        if len(widths) != self.num_layers:
            raise InputError(f"got {len(widths)} rank widths for {self.num_layers} layers")
        narrow = [
            f"{name}: {w} < {u.shape[2]}"
            for name, u, w in zip(self.names, self.U, widths)
            if w < u.shape[2]
        ]
        if narrow:
            raise InputError(f"cannot pad to a width below the batch's own: {_clip(narrow)}")

        def pad(f: torch.Tensor, r: int) -> torch.Tensor:
            if f.shape[2] == r:
                return f
            out = factor_zeros(f.shape[0], f.shape[1], r, dtype=f.dtype, device=f.device)
            out[:, :, : f.shape[2]] = f
            return out

        U = [pad(u, r) for u, r in zip(self.U, widths)]
        V = [pad(v, r) for v, r in zip(self.V, widths)]
        return LoRABatch(names=list(self.names), U=U, V=V, ranks=self.ranks)

    def delta_weights(self) -> list[torch.Tensor]:
        """Per layer, the (B, out, in) stack of delta W."""
        return [delta_weight(u, v) for u, v in zip(self.U, self.V)]

    def unbatch(self) -> list[LoRA]:
        """The LoRAs of this batch, padding removed."""
        out = []
        for b in range(len(self)):
            layers = []
            for i, name in enumerate(self.names):
                r = int(self.ranks[b, i])
                layers.append(LoRALayer(name, self.U[i][b, :, :r], self.V[i][b, :, :r]))
            out.append(LoRA(layers=layers))
        return out


def spec_of(lora: LoRA) -> LayerSpec:
    """The layer spec of one LoRA."""
    return LayerSpec(names=tuple(lora.names), shapes=tuple(lora.shapes), ranks=tuple(lora.ranks))


def factor_zeros(
    batch: int, n: int, r: int, *, dtype: torch.dtype | None = None, device: Any = None
) -> torch.Tensor:
    """A (batch, n, r) zero factor stored rank-major (its ``.mT`` is contiguous).

    On this layout ``Phi @ U``, ``U^T U`` and QR of a tall n x r factor map onto BLAS/LAPACK
    without a transposing copy: 3-5x faster than row-major at n = 12288, r = 4
    (benchmarks/skinny_gemm.py).
    """
    return torch.zeros(batch, r, n, dtype=dtype, device=device).mT


def collate(loras: Sequence[LoRA], *, dtype: torch.dtype | None = None) -> LoRABatch:
    """Stack LoRAs with the same layers into a batch, zero-padding each layer to its largest rank.

    Raises ``ValueError`` listing the layers that differ when the LoRAs do not share layer
    names and shapes.
    """
    if not loras:
        raise InputError("collate needs at least one LoRA")
    first = spec_of(loras[0])
    for k, lora in enumerate(loras[1:], start=1):
        problem = first.describe_mismatch(spec_of(lora))
        if problem:
            src = lora.metadata.get("source", f"LoRA #{k}")
            ref = loras[0].metadata.get("source", "LoRA #0")
            raise InputError(f"cannot batch {src} with {ref}: {problem}")
    dtype = dtype or loras[0].layers[0].U.dtype
    rank_table = torch.tensor([lora.ranks for lora in loras], dtype=torch.long)
    width = rank_table.max(dim=0).values.tolist()
    U, V = [], []
    for i, (out_f, in_f) in enumerate(first.shapes):
        r = int(width[i])
        u = factor_zeros(len(loras), out_f, r, dtype=dtype)
        v = factor_zeros(len(loras), in_f, r, dtype=dtype)
        for b, lora in enumerate(loras):
            layer = lora.layers[i]
            u[b, :, : layer.rank] = layer.U
            v[b, :, : layer.rank] = layer.V
        U.append(u)
        V.append(v)
    return LoRABatch(names=list(first.names), U=U, V=V, ranks=rank_table)
