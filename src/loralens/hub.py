"""Adapters named by a Hugging Face hub id (``owner/name``, ``owner/name@revision``): the adapter
files only (safetensors, PEFT's config and weights) fetched by ``huggingface_hub``.

Offline (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set, read at each call) only the local
cache is looked at; an id that is neither cached nor reachable is one clear error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loralens.formats import LoRAFormatError
from loralens.formats.tensor_file import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
#: what is downloaded: the adapter's weights and config, never pickles other than PEFT's
#: adapter_model.bin (read with weights_only=True), never images or model cards
ADAPTER_FILES = ["*.safetensors", "adapter_config.json", "adapter_model.bin"]
_TRUE = {"1", "ON", "YES", "TRUE"}


def is_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a hub id and is not a path on this machine (nor a missing
    weights file: ``loras/x.safetensors`` is a typo, not a repository)."""
    return (
        HUB_ID.fullmatch(text) is not None
        and not text.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
        and not os.path.lexists(text)
    )


def hub_offline() -> bool:
    """Whether the environment asks huggingface_hub to stay offline."""
    return any(
        os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def fetch_adapter(spec: str) -> Path:
    """The local folder holding the adapter files of hub id ``spec`` (downloaded or cached).

    Raises ``LoRAFormatError`` naming ``spec`` when huggingface_hub is missing, the hub is
    offline and the files are not cached, or the download fails."""
    m = HUB_ID.fullmatch(spec)
    if m is None:
        raise LoRAFormatError(spec, "not a Hugging Face hub id (expected owner/name[@revision])")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise LoRAFormatError(spec, "no such path, and huggingface_hub is not installed") from e
    offline = hub_offline()
    try:
        folder = snapshot_download(
            m["repo"],
            revision=m["revision"],
            allow_patterns=ADAPTER_FILES,
            local_files_only=offline,
        )
    except Exception as e:  # every hub failure (network, 404, gated) becomes one line
        if offline:
            raise LoRAFormatError(
                spec,
                "no such path; as a Hugging Face hub id it is not in the local cache and the hub "
                "is offline (HF_HUB_OFFLINE is set)",
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LoRAFormatError(
            spec,
            f"no such path, and fetching it from the Hugging Face hub failed: "
            f"{type(e).__name__}{': ' + first[:200] if first else ''}",
        ) from None
    return Path(folder)


__all__ = ["ADAPTER_FILES", "fetch_adapter", "hub_offline", "is_hub_id"]
