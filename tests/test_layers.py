"""The package's layers (docs/ARCHITECTURE.md): every import inside loralens, at module level,
in a function or under TYPE_CHECKING, points to a lower layer or stays inside its own package."""

from __future__ import annotations

import ast
from pathlib import Path

import loralens

SRC = Path(loralens.__file__).parent

#: Layers from the bottom up; a module may import its own package and anything on a lower row.
LAYERS = [
    {"errors"},
    {"atomic", "lora"},
    {"jsonio", "cache", "raycluster", "training_metadata"},
    {"formats", "fused"},
    {"symmetry", "features", "resize", "hub", "families"},
    {"flags", "canonical_form"},
    {"inspection", "models", "zoo"},
    {"store"},
    {"learn.fitting"},
    {"learn.trust"},
    {"learn.runs"},
    {"learn.training"},
    {"learn.bench"},
    {"learn"},
    {"screening", "search"},
    {"serve"},
    {"cli"},
    {"__main__", ""},
]
RANK = {group: k for k, row in enumerate(LAYERS) for group in row}


def _group(module: str) -> str:
    parts = module.split(".")[1:]  # without "loralens"
    if (
        parts[:1] == ["learn"]
        and len(parts) > 1
        and parts[1] in {"fitting", "trust", "runs", "training", "bench"}
    ):
        return ".".join(parts[:2])
    return parts[0] if parts else ""


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "loralens":  # from loralens import features: the module itself
                found += [f"loralens.{a.name}" for a in node.names]
            elif node.module.startswith("loralens."):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("loralens")]
    return found


def test_every_import_points_down_or_stays_in_its_package():
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mine = _group(module)
        assert mine in RANK, f"{module}: add its package to LAYERS (and to ARCHITECTURE.md)"
        for target in _imports(path):
            theirs = _group(target)
            if theirs == "__version__":  # the version string, not a module
                continue
            assert theirs in RANK, f"{target} (imported by {module}) is in no layer"
            if theirs != mine and RANK[theirs] >= RANK[mine]:
                upward.append(f"{module} imports {target}")
    assert not upward, "imports pointing up:\n" + "\n".join(upward)
