"""What an adapter file says about its own training: kohya's ``ss_*`` header keys (base model,
network, epochs, steps, learning rates, dataset and tag counts), the SAI model spec
(``modelspec.*``) and PEFT's adapter config. Read from the file's metadata as written; nothing
is inferred here (the layout's base model is :mod:`loralens.families`' job).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

#: kohya sd-scripts header keys reported (the file's own names)
KOHYA_KEYS = (
    "ss_base_model_version",
    "ss_sd_model_name",
    "ss_v2",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_num_epochs",
    "ss_epoch",
    "ss_steps",
    "ss_max_train_steps",
    "ss_learning_rate",
    "ss_unet_lr",
    "ss_text_encoder_lr",
    "ss_lr_scheduler",
    "ss_optimizer",
    "ss_num_train_images",
    "ss_num_reg_images",
    "ss_batch_size_per_device",
    "ss_resolution",
    "ss_mixed_precision",
    "ss_seed",
    "ss_clip_skip",
    "ss_output_name",
    "ss_training_comment",
    "ss_training_started_at",
    "ss_training_finished_at",
)
#: PEFT config keys reported
PEFT_KEYS = (
    "peft_type",
    "base_model_name_or_path",
    "task_type",
    "r",
    "lora_alpha",
    "alpha",
    "target_modules",
    "use_dora",
    "use_rslora",
    "modules_to_save",
)
#: how many of the most frequent dataset tags are reported
TOP_TAGS = 10
#: longest string value reported (header values can be megabytes)
MAX_VALUE_CHARS = 200


def _value(text: str) -> Any:
    """A header string as the number it spells, else the string (cut to MAX_VALUE_CHARS)."""
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        if math.isfinite(value):
            return value
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "..."


def _json(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _tags(meta: dict[str, str]) -> dict[str, Any] | None:
    """The datasets' caption tags (kohya ``ss_tag_frequency``: dataset -> tag -> count)."""
    freq = _json(meta.get("ss_tag_frequency"))
    if not isinstance(freq, dict):
        return None
    counts: Counter[str] = Counter()
    for tags in freq.values():
        if isinstance(tags, dict):
            counts.update({str(t).strip(): int(n) for t, n in tags.items() if isinstance(n, int)})
    return {
        "datasets": [str(d)[:MAX_VALUE_CHARS] for d in freq],
        "distinct_tags": len(counts),
        "top_tags": [[t[:MAX_VALUE_CHARS], n] for t, n in counts.most_common(TOP_TAGS)],
    }


def _dataset_dirs(meta: dict[str, str]) -> dict[str, Any] | None:
    """kohya ``ss_dataset_dirs``: folder -> images and repeats."""
    dirs = _json(meta.get("ss_dataset_dirs"))
    if not isinstance(dirs, dict):
        return None
    return {
        str(d)[:MAX_VALUE_CHARS]: {k: v for k, v in info.items() if k in ("img_count", "n_repeats")}
        for d, info in dirs.items()
        if isinstance(info, dict)
    }


def training_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The training facts a file records, from its LoRA's ``metadata`` (``lora.metadata``):
    ``kohya`` (its ``ss_*`` keys), ``tags`` (datasets, distinct and most frequent caption tags),
    ``dataset_dirs``, ``modelspec`` and ``peft`` (the adapter config's keys); only the parts
    the file has."""
    meta = metadata.get("safetensors_metadata") or {}
    out: dict[str, Any] = {}
    kohya = {k: _value(meta[k]) for k in KOHYA_KEYS if meta.get(k) not in (None, "", "None")}
    if kohya:
        out["kohya"] = kohya
    for key, part in (("tags", _tags(meta)), ("dataset_dirs", _dataset_dirs(meta))):
        if part:
            out[key] = part
    spec = {k: _value(v) for k, v in meta.items() if k.startswith("modelspec.")}
    if spec:
        out["modelspec"] = spec
    cfg = metadata.get("peft_config")
    if isinstance(cfg, dict):
        out["peft"] = {k: cfg[k] for k in PEFT_KEYS if cfg.get(k) is not None}
    return out


def training_summary(training: dict[str, Any]) -> str:
    """One line for a table: the base model, network, epochs, steps, learning rate, images and
    top tags the file records ("" when it records none)."""
    parts: list[str] = []
    k = training.get("kohya", {})
    base = k.get("ss_sd_model_name") or k.get("ss_base_model_version")
    if base is not None:
        parts.append(f"base {base}")
    if "ss_network_dim" in k:
        parts.append(f"dim {k['ss_network_dim']} alpha {k.get('ss_network_alpha', '?')}")
    for key, label in (
        ("ss_num_epochs", "epochs"),
        ("ss_steps", "steps"),
        ("ss_learning_rate", "lr"),
        ("ss_num_train_images", "images"),
    ):
        if key in k:
            parts.append(f"{label} {k[key]}")
    tags = training.get("tags", {}).get("top_tags")
    if tags:
        parts.append("tags " + ", ".join(t for t, _ in tags[:3]))
    p = training.get("peft", {})
    if p:
        alpha = p.get("lora_alpha", p.get("alpha"))
        targets = p.get("target_modules")
        if isinstance(targets, list):
            targets = ",".join(map(str, targets))
        parts.append(
            " ".join(
                str(x)
                for x in (
                    p.get("peft_type", "PEFT"),
                    f"r {p['r']}" if "r" in p else None,
                    f"alpha {alpha}" if alpha is not None else None,
                    f"targets {targets}" if targets else None,
                    f"base {p['base_model_name_or_path']}"
                    if p.get("base_model_name_or_path")
                    else None,
                )
                if x
            )
        )
    title = training.get("modelspec", {}).get("modelspec.title")
    if title:
        parts.append(f"title {title}")
    return "; ".join(parts)


__all__ = ["KOHYA_KEYS", "PEFT_KEYS", "training_metadata", "training_summary"]
