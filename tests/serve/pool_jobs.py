"""Jobs for the worker-pool tests (stdlib only, so workers start fast)."""

from __future__ import annotations

import os
import time


def init(tag: str) -> dict:
    return {"tag": tag, "pid": os.getpid()}


def job(state: dict, payload: tuple):
    what, arg = payload
    if what == "echo":
        return (state["tag"], arg, state["pid"])
    if what == "sleep":
        time.sleep(arg)
        return "slept"
    if what == "die":
        os._exit(3)
    if what == "raise":
        raise RuntimeError(arg)
    if what == "allocate":  # more than the address-space limit
        return len(bytearray(arg))
    raise ValueError(what)


def broken_init(tag: str) -> dict:
    raise FileNotFoundError(f"{tag} is not a run")
