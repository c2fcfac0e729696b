"""Hypothesis strategies for hostile reader input, and the property every reader must keep.

A case is a set of files (relative path -> bytes) and the path to load: safetensors files with
broken headers (random JSON, offsets overlapping or out of range, huge lengths, random bytes),
PEFT folders with random adapter_config.json values (wrong types, NaN, deep nesting, huge
numbers, hostile patterns), state dicts of random shapes, dtypes and values in every key style,
and random pickles. :func:`outcome` loads a case: it must come back as a LoRA whose every factor
is finite float32, or as a LoRAFormatError; anything else is a crash. Used by
tests/formats/test_formats_fuzz.py (small budget, in CI) and benchmarks/fuzz_readers.py (long).
"""

from __future__ import annotations

import io
import json
import math
import signal
import struct
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st
from safetensors.torch import save

import loralens as ll

#: Seconds one case may take before it counts as a hang.
CASE_TIMEOUT_S = 10.0

PREFIX = "base_model.model."
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "a" * 40 + "!"]
DTYPES = [  # floating types mostly, so that many cases load
    torch.float32,
    torch.float32,
    torch.float16,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.float8_e4m3fn,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]
SPECIAL = [math.nan, math.inf, -math.inf, 1e38, -3e38, 1e308, 0.0, 5e-324]
PATTERN_KEYS = [
    "q_proj",
    r"layers\.0\.self_attn\.q_proj",
    r"layers\.\d+\..*",
    "(.*.*)*X",
    "(a|aa)*",
    "a{99999}",
    "(",
    "[[:alpha:]]",
    "q{e<=1}",
    "",
    "$",
    "\\",
]

CONFIG_FIELDS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out"]
CONFIG_FIELDS += [
    "lora_bias",
    "use_dora",
    "modules_to_save",
    "peft_type",
    "base_model_name_or_path",
]
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.sampled_from([0, 1, 2, 4, 8, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(SPECIAL),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def config_texts(draw) -> str:
    """adapter_config.json text: plausible values, hostile ones, or not JSON at all."""
    kind = draw(
        st.sampled_from(["fields"] * 3 + ["one_field"] * 3 + ["raw", "deep", "huge_number"])
    )
    if kind == "one_field":  # a valid config with one hostile value
        field = draw(st.sampled_from(CONFIG_FIELDS))
        value = draw(st.sampled_from([*SPECIAL, 10**400, "2", True, None, [], {}]) | json_values)
        if field.endswith("_pattern"):
            value = {draw(st.sampled_from(PATTERN_KEYS)): value}
        return json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, field: value})
    if kind == "raw":
        return draw(st.text(max_size=40))
    if kind == "deep":
        return (
            '{"r": 2, "lora_alpha": 4, "x": '
            + _deep(draw(st.sampled_from([50, 5000, 10**5])))
            + "}"
        )
    if kind == "huge_number":
        number = draw(
            st.sampled_from(["1e999", "-1e999", "9" * 5000, "1" + "0" * 400, "NaN", "Infinity"])
        )
        field = draw(st.sampled_from(["r", "lora_alpha", "rank_pattern", "alpha_pattern"]))
        value = number if field in ("r", "lora_alpha") else '{"q_proj": ' + number + "}"
        return '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "' + field + '": ' + value + "}"
    cfg: dict[str, Any] = {"peft_type": draw(st.sampled_from(["LORA"] * 6 + ["lora", "IA3", 7]))}
    for field, plausible in [
        ("r", st.sampled_from([2, 2, 2, 1, 4])),
        ("lora_alpha", st.floats(0.5, 16) | st.sampled_from([1e38, 1e308, 5e-324])),
        ("use_rslora", st.booleans()),
        ("fan_in_fan_out", st.booleans()),
        ("lora_bias", st.booleans()),
        ("use_dora", st.booleans()),
        ("modules_to_save", st.just(["lm_head"])),
        ("target_modules", st.just(["q_proj"])),
        ("base_model_name_or_path", st.just("tiny")),
        (
            "rank_pattern",
            st.dictionaries(
                st.sampled_from(PATTERN_KEYS), st.sampled_from([2, 2, 1, 4]), max_size=3
            ),
        ),
        (
            "alpha_pattern",
            st.dictionaries(
                st.sampled_from(PATTERN_KEYS), st.floats(0.5, 8) | json_scalars, max_size=3
            ),
        ),
    ]:
        choice = draw(st.sampled_from(["absent", "absent", "plausible", "plausible", "random"]))
        if choice == "plausible":
            cfg[field] = draw(plausible)
        elif choice == "random":
            cfg[field] = draw(json_values)
    return json.dumps(cfg)  # writes NaN and Infinity as JSON does not allow


@st.composite
def tensors(draw, shape=None) -> torch.Tensor:
    """A tensor of a random (or given) shape and dtype, values from N(0, 1) and specials (set in
    float64, then cast: 1e308 becomes inf in float32, NaN whatever an integer cast makes it)."""
    if shape is None:
        shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=4))
    dtype = draw(st.sampled_from(DTYPES))
    t = torch.randn(
        tuple(shape),
        generator=torch.Generator().manual_seed(draw(st.integers(0, 99))),
        dtype=torch.float64,
    )
    if t.numel() and draw(st.integers(0, 2)) == 0:
        flat = t.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(SPECIAL))
    return t.to(dtype)


@st.composite
def state_dicts(draw) -> dict[str, torch.Tensor]:
    """LoRA-like state dicts in PEFT, kohya or diffusers key style, shapes mostly paired."""
    style = draw(st.sampled_from(["peft", "kohya", "diffusers"]))
    sd: dict[str, torch.Tensor] = {}
    for i, module in enumerate(
        draw(st.lists(st.sampled_from(MODULES), min_size=1, max_size=3, unique=True))
    ):
        r, n, m = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
        paired = draw(st.integers(0, 4)) > 0
        a = draw(tensors((r, n) if paired else None))
        b = draw(tensors((m, r) if paired else None))
        if style == "peft":
            base = PREFIX + module
            sd[f"{base}.lora_A.weight"], sd[f"{base}.lora_B.weight"] = a, b
            extra = {"lora_magnitude_vector": m, "lora_B.bias": m}
        elif style == "kohya":
            base = f"lora_unet_m{i}"
            sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = a, b
            extra = {"alpha": None, "dora_scale": m}
        else:
            base = f"unet.m{i}.to_q"
            sd[f"{base}.lora.down.weight"], sd[f"{base}.lora.up.weight"] = a, b
            extra = {"alpha": None}
        for suffix, size in extra.items():
            if size is None and draw(st.booleans()):  # a scalar alpha: plausible or hostile
                value = draw(st.sampled_from([1.0, 4.0, 0.0, *SPECIAL]))
                sd[f"{base}.{suffix}"] = torch.tensor(value).to(draw(st.sampled_from(DTYPES)))
            elif draw(st.integers(0, 3)) == 0:
                shape = () if size is None else (size,)
                sd[f"{base}.{suffix}"] = draw(tensors(shape if draw(st.booleans()) else None))
    return sd


def _as_component(text: str) -> str:
    """A config's JSON as diffusers writes it into a header: keys prefixed "unet."."""
    try:
        cfg = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return json.dumps({f"unet.{k}": v for k, v in cfg.items()}) if isinstance(cfg, dict) else text


def _safetensors(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save(sd, metadata=metadata)


@st.composite
def broken_safetensors(draw) -> bytes:
    """safetensors bytes with a hostile header, length prefix or data section."""
    sd = {f"{PREFIX}{MODULES[0]}.lora_A.weight": torch.randn(2, 4)}
    sd[f"{PREFIX}{MODULES[0]}.lora_B.weight"] = torch.randn(3, 2)
    good = _safetensors(sd)
    (n,) = struct.unpack("<Q", good[:8])
    header, data = json.loads(good[8 : 8 + n]), good[8 + n :]
    kind = draw(st.sampled_from(["json", "entries", "bytes", "prefix", "data"]))
    if kind == "json":
        header = draw(json_values)
    elif kind == "entries":
        for entry in (v for k, v in header.items() if k != "__metadata__"):
            field = draw(st.sampled_from(["data_offsets", "shape", "dtype"]))
            entry[field] = draw(
                st.one_of(
                    json_values,
                    st.lists(
                        st.sampled_from([0, 1, 8, 16, 24, 2**31, 2**63, 2**64 + 1, -1]), max_size=3
                    ),
                    st.sampled_from(
                        ["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "C64", "F4", "XX"]
                    ),
                )
            )
    body = json.dumps(header).encode() if kind != "bytes" else draw(st.binary(max_size=64))
    prefix = len(body)
    if kind == "prefix":
        prefix = draw(st.sampled_from([0, 1, len(body) - 1, len(body) + 1, 2**32, 2**64 - 1]))
    if kind == "data":
        data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=16))
    return struct.pack("<Q", max(0, prefix) % 2**64) + body + data


@st.composite
def cases(draw) -> tuple[str, dict[str, bytes], str]:
    """(what the case is, files by relative path, the relative path to load)."""
    kind = draw(st.sampled_from(["header", "config", "tensors", "pickle"]))
    if kind == "header":
        where = draw(st.sampled_from(["folder", "file"]))
        data = draw(broken_safetensors())
        if where == "file":
            return "header", {"lora.safetensors": data}, "lora.safetensors"
        return "header", {"a/adapter_model.safetensors": data, "a/adapter_config.json": b"{}"}, "a"
    if kind == "config":
        sd = {
            f"{PREFIX}{m}.{f}.weight": torch.randn(s, generator=torch.Generator().manual_seed(0))
            for m in MODULES[:2]
            for f, s in (("lora_A", (2, 4)), ("lora_B", (3, 2)))
        }
        files = {"a/adapter_model.safetensors": _safetensors(sd)}
        files["a/adapter_config.json"] = draw(config_texts()).encode()
        return "config", files, "a"
    sd = draw(state_dicts())
    if kind == "pickle":
        buf = io.BytesIO()
        if draw(st.booleans()):
            torch.save(
                {k: draw(st.sampled_from([v] * 6 + [v.tolist(), 3, "x"])) for k, v in sd.items()},
                buf,
            )
            data = buf.getvalue()
        else:
            data = draw(st.binary(max_size=128))
        return "pickle", {"lora.bin": data}, "lora.bin"
    metadata = None
    if draw(st.integers(0, 3)) == 0:  # diffusers' per-component configs in the header
        metadata = {"lora_adapter_metadata": _as_component(draw(config_texts()))}
    files = {"lora.safetensors": _safetensors(sd, metadata)}
    if draw(st.booleans()) and next(iter(sd)).startswith(PREFIX):
        files = {"a/adapter_model.safetensors": files["lora.safetensors"]}
        files["a/adapter_config.json"] = draw(config_texts()).encode()
        return "tensors", files, "a"
    return "tensors", files, "lora.safetensors"


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Hang


def outcome(case: tuple[str, dict[str, bytes], str]) -> tuple[str, str]:
    """("loaded" | "refused" | "crash" | "hang", detail) of load_lora on the case's files.

    "loaded" only when every factor, magnitude and bias is finite float32 and every scale
    finite; a LoRA that is not is a "crash" too. Hangs are caught with SIGALRM (main thread,
    POSIX); elsewhere a hang blocks.
    """
    _, files, target = case
    with tempfile.TemporaryDirectory() as d:
        for rel, data in files.items():
            (Path(d) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(d) / rel).write_bytes(data)
        timer = (
            hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
        )
        if timer:
            old = signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lora = ll.load_lora(Path(d) / target)
        except ll.LoRAFormatError as e:
            return "refused", str(e)[:300]
        except _Hang:
            return "hang", f"still running after {CASE_TIMEOUT_S} s"
        except Exception as e:  # the property: nothing else ever escapes
            return "crash", f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            if timer:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
    problems = []
    for la in lora.layers:
        for what, t in [
            ("U", la.U),
            ("V", la.V),
            *[(k, la.meta[k]) for k in ("magnitude", "lora_bias") if k in la.meta],
        ]:
            if t.dtype != torch.float32 or not bool(torch.isfinite(t).all()):
                problems.append(
                    f"{la.name} {what}: {t.dtype}, finite={bool(torch.isfinite(t).all())}"
                )
        if not math.isfinite(la.meta["scale"]):
            problems.append(f"{la.name} scale {la.meta['scale']}")
    if problems:
        return "crash", "loaded a LoRA that is not finite float32: " + "; ".join(problems[:3])
    return "loaded", f"{len(lora.layers)} layers"
