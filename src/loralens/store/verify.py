"""A full check of a store (``loralens store verify``): every file against its recorded
checksum, the structure, and every value finite; problems are collected, not raised."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralens.store.format import CHECKSUMS, INDEX, SHARD_PATTERN, StoreError, read_info
from loralens.store.integrity import check_checksum, shard_numbers
from loralens.store.reader import LoRAStore


@dataclass
class StoreReport:
    """What :func:`verify_store` found: ``ok`` unless ``problems`` (each naming its file);
    ``checked`` lists what was compared, ``notes`` what could not be (e.g. no checksums)."""

    path: str
    num_loras: int | None = None
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.path,
            "ok": self.ok,
            "num_loras": self.num_loras,
            "checked": self.checked,
            "problems": self.problems,
            "notes": self.notes,
        }

    def __str__(self) -> str:
        head = f"{self.path}: " + ("ok" if self.ok else f"{len(self.problems)} problem(s)")
        if self.num_loras is not None:
            head += f", {self.num_loras} LoRAs"
        lines = [head, *(f"  problem: {p}" for p in self.problems)]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verify_store(path: str | os.PathLike) -> StoreReport:
    """Check the store at ``path`` in full: every file with a checksum recorded in
    ``store.json`` (size and sha256), the structure as on open, and every value of every shard
    finite. Stores written before checksums were recorded are checked for all but the hashes,
    which the report notes (not a problem)."""
    path = Path(path)
    report = StoreReport(str(path))
    try:
        info = read_info(path)
    except StoreError as e:
        report.problems.append(str(e))
        return report
    sums = info.get(CHECKSUMS, {})
    for name, recorded in sums.items():
        try:
            check_checksum(path / name, recorded)
            report.checked.append(f"{name}: sha256 ok ({recorded['bytes']} bytes)")
        except (StoreError, OSError) as e:
            report.problems.append(str(e) if isinstance(e, StoreError) else f"{path / name}: {e}")
    try:
        store = LoRAStore(path, verify=False)  # hashes compared above
    except StoreError as e:
        report.problems.append(str(e))
        return report
    report.num_loras = len(store)
    used = store.shards
    for shard in used:
        try:
            store.check_shard(shard, check_hash=False)
        except StoreError as e:
            report.problems.append(str(e))
    report.checked.append(f"{len(used)} shard(s): every value finite, rows consistent with {INDEX}")
    if not sums:
        report.notes.append(
            "no checksums recorded (written before loralens recorded them): structure and "
            "values checked, contents not compared with what was written"
        )
    else:
        unsummed = [SHARD_PATTERN.format(s) for s in used if SHARD_PATTERN.format(s) not in sums]
        if unsummed:
            report.notes.append(
                f"no checksum recorded for {', '.join(unsummed)} (written before loralens "
                "recorded them)"
            )
    extra = [SHARD_PATTERN.format(s) for s in shard_numbers(path) if s not in used]
    if extra:
        report.notes.append(f"unreferenced shard(s) ignored: {', '.join(extra)}")
    return report
