"""Reading an adapter one layer at a time (:func:`open_lora`), or whole (:func:`load_lora`, built
on it: one reader for both).

Opening reads the file's header and key list once: the format is detected, every module's
factors are paired (by parsed module path, alpha keys included), their shapes, dtypes and
scales checked, Flux's fused modules planned into their parts and the canonical layer order
fixed, all before any factor is read. Iterating then reads each layer's tensors when it is
reached, straight into its float32 factors. A caller that keeps one layer at a time holds about
one layer: the largest layer's float32 factors, or a fused module's while its parts are given
out. Pickled ``.bin`` files cannot be read in parts (``torch.load`` reads the whole pickle), so
their tensors are held, in the file's dtype, while the reader is open.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loralens.formats.canonical import Placed, cut, place
from loralens.formats.detect import open_file_layers
from loralens.formats.layers import FileLayers
from loralens.formats.lycoris import Expansion
from loralens.lora import LoRA, LoRALayer


class LoRAReader:
    """An adapter open for reading one layer at a time: ``names``, ``shapes`` (delta W, out x
    in) and ``metadata`` as :func:`load_lora` gives them, known on opening; each layer's values
    read when iteration reaches it (each pass reads the file again). Close it, or use it as a
    context manager."""

    def __init__(self, opened: FileLayers, *, canonical: bool = True) -> None:
        """Use :func:`open_lora`."""
        self._file, self._pending = opened.file, opened.layers
        names = [p.name for p in self._pending]
        shapes = [p.shape for p in self._pending]
        self._placed: list[Placed] | None = None
        self.metadata: dict[str, Any] = dict(opened.metadata)
        if canonical:
            conventions = [p.magnitude_convention for p in self._pending]
            fmt, source = str(self.metadata.get("format", "")), self.metadata.get("source")
            try:
                self._placed, found = place(names, shapes, conventions, fmt, source)
            except BaseException:
                self.close()
                raise
            self.metadata.update(found)
            names = [p.name for p in self._placed]
            shapes = [p.shape(shapes) for p in self._placed]
        self.names: list[str] = names
        self.shapes: list[tuple[int, int]] = shapes

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[LoRALayer]:
        """Every layer in order, read when reached. Keep none you do not need: a loop variable
        still holds the previous layer while the next one is read (``del`` it, or ``map``)."""
        expansion = Expansion()  # what the LyCORIS layers of one pass may expand to
        if self._placed is None:
            for pending in self._pending:
                layer = pending.read(expansion)
                yield layer
                del layer
            return
        left = Counter(p.source for p in self._placed)
        held: dict[int, LoRALayer] = {}  # fused file layers whose other parts come later
        for placed in self._placed:
            source = held.pop(placed.source, None)
            if source is None:
                source = self._pending[placed.source].read(expansion)
            left[placed.source] -= 1
            if left[placed.source]:
                held[placed.source] = source
            layer = cut(source, placed)
            del source
            yield layer
            del layer

    def read(self) -> LoRA:
        """Every layer, as one LoRA."""
        return LoRA(layers=list(self), metadata=dict(self.metadata))

    def close(self) -> None:
        """Release the file."""
        self._file.close()

    def __enter__(self) -> LoRAReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_lora(
    path: str | os.PathLike[str], *, allow_nonfinite: bool = False, canonical: bool = True
) -> LoRAReader:
    """Open the adapter at ``path`` (anything :func:`load_lora` reads) to read one layer at a
    time: the same layers, names, scales, metadata, checks and errors as :func:`load_lora`,
    which is ``open_lora(path).read()``. Problems the header shows (unpaired or misshapen
    factors, dtypes, ranks, scales) are raised on opening; NaN/inf values and a delta W beyond
    float32 when the layer is read.

    >>> from loralens.features import describe_layer
    >>> with open_lora("adapter/") as reader:  # doctest: +SKIP
    ...     rows = list(map(describe_layer, reader))  # map lets each layer go before the next
    """
    return LoRAReader(open_file_layers(Path(path), allow_nonfinite), canonical=canonical)


def load_lora(
    path: str | os.PathLike[str], *, allow_nonfinite: bool = False, canonical: bool = True
) -> LoRA:
    """Read a LoRA from a PEFT adapter folder, or a PEFT/kohya/diffusers/ComfyUI/XLabs/LyCORIS
    .safetensors/.bin file (LyCORIS LoCon-Tucker, LoHa and LoKr exactly, as low rank).

    Layers come out in the base model's module order (names sorted with digit runs compared as
    numbers), with the adapter's scale folded into U, so ``lora.delta_weights()[name]`` equals
    what the source library merges into that weight (math orientation, out x in). Pickled
    ``.bin`` files are read with ``torch.load(weights_only=True)`` only. NaN/inf weights raise
    ``LoRAFormatError`` naming the file and layer unless ``allow_nonfinite=True``.

    Layer names are canonical (:mod:`loralens.formats.canonical`): the module paths diffusers
    and transformers build, the same for one adapter in any format, with the file's own module
    name in ``layer.meta["file_key"]``; ``canonical=False`` keeps the file's names.
    :func:`open_lora` reads the same layers one at a time.
    """
    with open_lora(path, allow_nonfinite=allow_nonfinite, canonical=canonical) as reader:
        return reader.read()
