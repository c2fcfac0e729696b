"""Hostile cases run the way an attacker's input meets loralens: the command line, in a child
process of its own session, under a memory limit, each command under a time limit, with what
each case leaves behind (files, processes) checked afterwards.

One child runs a batch of commands (importing torch once): before the first it sets its
address-space limit to what it holds with the commands' code imported plus :data:`BOUND`; each
command gets an alarm that interrupts even a blocking ``open``; after each, every process left in
the child's session (a screening worker, say) is reported, and after the child exits, its whole
session must be gone. A command that hangs, crashes or grows past the bound fails its case.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: Memory a hostile input may cost a command, above the interpreter with its code imported.
BOUND = 2**30
SRC = Path(__file__).resolve().parents[2] / "src"

_RUNNER = r"""
import gc, json, os, resource, signal, sys, time, traceback, warnings
warnings.simplefilter("ignore")
from typer.testing import CliRunner
from loralens.cli import app
# the code the commands import (libraries map hundreds of MB): the base, not the bound
import loralens.inspection, loralens.resize, loralens.screening, loralens.search.index
import loralens.serve.batch, loralens.serve.report, safetensors.numpy

def vm(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

def leftovers():
    # processes of this session but this one and the forkserver multiprocessing keeps for its
    # life (with its resource tracker): a screening worker still alive, say
    me, out = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid, sid = int(stat[1]), int(stat[3])
        helper = ppid == me and ("forkserver" in cmd or "resource_tracker" in cmd)
        if sid == me and int(pid) != me and not helper:
            out.append(f"{pid}: {cmd[:200]}")
    return out

def invoke(args):
    res = CliRunner().invoke(app, args, catch_exceptions=True)
    output, exc = res.output, res.exception
    if exc is not None and not isinstance(exc, SystemExit):
        output += "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return res.exit_code, output

class Hung(BaseException):
    pass

def alarm(*_):
    raise Hung()

signal.signal(signal.SIGALRM, alarm)
limit = vm("VmSize") + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
for case in json.loads(sys.stdin.read()):
    print(json.dumps({"start": case["name"]}), flush=True)
    os.chdir(case["cwd"])
    t = time.perf_counter()
    signal.alarm(case["timeout"])
    try:
        code, output = invoke(case["args"])
    except Hung:
        code, output = "hung", ""
    finally:
        signal.alarm(0)
    gc.collect()  # what the command held is gone before the next one starts
    time.sleep(0.2)  # a worker killed just now leaves /proc a moment later
    result = {"name": case["name"], "code": code, "output": output,
              "seconds": time.perf_counter() - t, "left_running": leftovers()}
    print(json.dumps(result), flush=True)
"""


@dataclass
class Result:
    """What one command did: exit code ('hung' past its time limit), output, seconds, the
    processes it left running."""

    code: int | str
    output: str
    seconds: float
    left_running: list[str] = field(default_factory=list)


def run_batch(cases: list[dict], timeout: float) -> dict[str, Result]:
    """Run ``cases`` ({name, cwd, args, timeout}) in one bounded child; fails naming the case
    that was running if the child itself dies or outlives ``timeout``, or if any process of its
    session is still alive after it."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUNNER, str(BOUND)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(json.dumps(cases), timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the batch outlived {timeout} s, in {_started(out)[-1:]}")
    lines = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    results = {r.pop("name"): Result(**r) for r in lines if "code" in r}
    if proc.returncode != 0 or len(results) != len(cases):
        pytest.fail(f"the batch died in {_started(out)[-1:]}: {err[-3000:]}")
    assert _session_gone(proc.pid), f"processes of the batch still run: {_session(proc.pid)}"
    return results


def _started(out: str) -> list[str]:
    return [json.loads(ln)["start"] for ln in out.splitlines() if ln.startswith('{"start"')]


def _session(sid: int) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[3]) == sid and stat[0] != "Z":
            found.append(int(pid))
    return found


def _session_gone(sid: int, wait_s: float = 10.0) -> bool:
    deadline = time.monotonic() + wait_s
    while _session(sid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): its kind and, but for folders (whose
    entries speak for them), its size, mtime and link target."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        found.update({str(Path(dirpath, d).relative_to(root)): ("folder",) for d in dirnames})
        for name in filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            target = os.readlink(p) if p.is_symlink() else None
            found[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, target)
    return found


def changed(before: dict[str, tuple], after: dict[str, tuple]) -> set[str]:
    """Entries created, removed or changed between two snapshots."""
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
