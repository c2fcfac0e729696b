"""Parse LoRA state-dict keys (PEFT, kohya, diffusers, XLabs, LyCORIS styles) into module paths
and roles.

Every format reduces to: for each module path, a down factor ``A`` (r x in, or r x in x k... for
conv, or r x num_embeddings for embeddings), an up factor ``B`` (out x r, ...), an optional
``alpha``, DoRA magnitude and lora_B bias; or LyCORIS roles (``mid`` for LoCon's Tucker core,
``hada_*`` for LoHa, ``lokr_*`` for LoKr). Pairing is by parsed module path, never by position;
keys of adapter families that are not low rank (OFT, IA3, ...) and two keys for one role are
refused, and a key that is not understood is returned as unparsed for the reader to judge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from loralens.formats.errors import LoRAFormatError

# PEFT: <module>.lora_A[.<adapter>].weight, <module>.lora_embedding_A[.<adapter>], ...
PEFT_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?!(?:weight|bias)$)(?P<adapter>[^.]+))?(?:\.(?P<param>weight|bias))?$"
)
# kohya (and kohya-like): <module>.lora_down.weight, <module>.lora_up.weight, <module>.alpha
KOHYA_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_down|lora_up)\.weight$")
# old diffusers: <module>.lora.down.weight, <attn>.processor.to_q_lora.down.weight,
# <module>.lora_linear_layer.down.weight
DIFFUSERS_KEY = re.compile(
    r"^(?P<module>.+?)(?P<sep>\.lora|_lora|\.lora_linear_layer)\.(?P<kind>down|up)\.weight$"
)
# XLabs Flux: (diffusion_model.)double_blocks.<n>.processor.qkv_lora1.down.weight, proj_lora2, ...
XLABS_KEY = re.compile(
    r"^(?P<module>(?:diffusion_model\.)?(?:double|single)_blocks\.\d+\.processor\."
    r"(?:qkv|proj)_lora\d?)\.(?P<kind>down|up)\.weight$"
)
# LyCORIS: <module>.hada_w1_a, <module>.lokr_w2, <module>.lora_mid.weight (LoCon's Tucker core)
LYCORIS_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<role>hada_(?:w[12]_[ab]|t[12])|lokr_(?:w[12](?:_[ab])?|t2))$"
)
LORA_MID_KEY = re.compile(r"^(?P<module>.+?)\.lora_mid\.weight$")
ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")
DORA_SCALE_KEY = re.compile(r"^(?P<module>.+)\.dora_scale$")
#: Full (not low-rank) weight differences saved beside LoRA factors: ComfyUI / LyCORIS "full"
#: ``.diff`` and ``.diff_b``, ``.set_weight``, LyCORIS norm modules' ``w_norm`` / ``b_norm``.
FULL_WEIGHT_KEY = re.compile(r"^(?P<module>.+)\.(?:diff|diff_b|set_weight|w_norm|b_norm)$")
#: Parts and endings of keys of adapter families that are not low-rank products -> their names.
FOREIGN_PARTS = {".oft_": "OFT/BOFT (LyCORIS or PEFT)", ".boft_": "PEFT BOFT"}
FOREIGN_ENDINGS = {
    ".on_input": "LyCORIS IA3",
    ".lambda_layer": "LyCORIS T-LoRA",
    ".a1.weight": "LyCORIS GLoRA",
}


def natural_key(name: str) -> tuple:
    """Sort key that compares digit runs as integers: layers.2 < layers.10."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


@dataclass
class ModuleParts:
    """The keys found for one module path, by role (A, B, alpha, mag, ...)."""

    keys: dict[str, str] = field(default_factory=dict)
    adapters: set[str] = field(default_factory=set)


ROLE_OF_PEFT = {
    ("lora_A", "weight"): "A",
    ("lora_B", "weight"): "B",
    ("lora_B", "bias"): "B_bias",
    ("lora_embedding_A", None): "eA",
    ("lora_embedding_B", None): "eB",
    ("lora_magnitude_vector", None): "mag",
    ("lora_magnitude_vector", "weight"): "mag",
}


def parse_keys(
    keys: list[str], path: Path, *, strip_prefix: str = ""
) -> tuple[dict[str, ModuleParts], list[str]]:
    """Group a state dict's keys by module path and role; return (modules, unparsed keys)."""
    modules: dict[str, ModuleParts] = {}
    unparsed: list[str] = []

    def put(module: str, role: str, key: str, adapter: str | None = None) -> None:
        if strip_prefix and module.startswith(strip_prefix):
            module = module[len(strip_prefix) :]
        parts = modules.setdefault(module, ModuleParts())
        if role in parts.keys:
            raise LoRAFormatError(
                path,
                f"two tensors for the same {role!r} of module {module!r}: "
                f"{parts.keys[role]!r} and {key!r}",
            )
        parts.keys[role] = key
        if adapter is not None:
            parts.adapters.add(adapter)

    for key in keys:
        refuse_foreign(key, path)
        m = PEFT_KEY.match(key)
        if m:
            role = ROLE_OF_PEFT.get((m["kind"], m["param"]))
            if role is None:
                unparsed.append(key)
                continue
            put(m["module"], role, key, m["adapter"])
            continue
        m = KOHYA_KEY.match(key)
        if m:
            put(m["module"], "A" if m["kind"] == "lora_down" else "B", key)
            continue
        m = XLABS_KEY.match(key)
        if m:
            put(m["module"], "A" if m["kind"] == "down" else "B", key)
            continue
        m = LYCORIS_KEY.match(key)
        if m:
            put(m["module"], m["role"], key)
            continue
        m = LORA_MID_KEY.match(key)
        if m:
            put(m["module"], "mid", key)
            continue
        m = DIFFUSERS_KEY.match(key)
        if m:
            module = m["module"]
            if m["sep"] == "_lora":  # attention-processor style: attn1.processor.to_q_lora
                module = module.replace(".processor.", ".")
                if module.endswith(".to_out"):
                    module += ".0"
            put(module, "A" if m["kind"] == "down" else "B", key)
            continue
        m = ALPHA_KEY.match(key)
        if m:
            put(m["module"], "alpha", key)
            continue
        m = DORA_SCALE_KEY.match(key)
        if m:
            put(m["module"], "mag", key)
            continue
        unparsed.append(key)

    adapters = set().union(*(p.adapters for p in modules.values())) if modules else set()
    if len(adapters) > 1:
        raise LoRAFormatError(
            path,
            f"keys carry several adapter names {sorted(adapters)}; save one adapter per file",
        )
    return modules, unparsed


def foreign_family(key: str) -> str | None:
    """The adapter family of ``key`` if it is one loralens cannot read as low rank."""
    for part, family in FOREIGN_PARTS.items():
        if part in key:
            return family
    for ending, family in FOREIGN_ENDINGS.items():
        if key.endswith(ending):
            return family
    return None


def refuse_foreign(key: str, path: Path) -> None:
    """Raise naming ``key``'s adapter family if it is not a low-rank product."""
    family = foreign_family(key)
    if family is not None:
        raise LoRAFormatError(
            path,
            f"key {key!r} belongs to a {family} adapter, which is not a low-rank product "
            "U V^T; loralens reads LoRA, LoCon, LoHa and LoKr adapters",
        )


def refuse_not_low_rank(keys: list[str], path: Path) -> None:
    """For a file with no readable LoRA keys: raise naming what it holds where its keys are of
    an adapter family that is not low rank (OFT, IA3, ...) or full weight differences only."""
    for key in keys:
        refuse_foreign(key, path)
    full = [k for k in keys if FULL_WEIGHT_KEY.match(k)]
    if full:
        raise LoRAFormatError(
            path,
            f"holds only full weight differences ({len(full)} key(s) like {full[0]!r}: "
            "LyCORIS 'full' / ComfyUI .diff, .diff_b), which are not low rank; loralens reads "
            "LoRA, LoCon, LoHa and LoKr adapters",
        )


def refuse_unknown(keys: list[str], path: Path, expected: str) -> None:
    """Raise naming the first few ``keys`` (if any) as not being ``expected``."""
    if keys:
        shown = ", ".join(repr(k) for k in keys[:5])
        raise LoRAFormatError(
            path,
            f"{len(keys)} key(s) are not {expected}: {shown}{' ...' if len(keys) > 5 else ''}",
        )
