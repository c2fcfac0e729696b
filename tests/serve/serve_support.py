"""Adapters, runs and archives for the service's tests (built at test time)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import torch
from typer.testing import CliRunner

import loralens as ll
from loralens.cli import app

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
#: the test service's caps: small, so the size tests send little
MAX_UPLOAD = 256 * 1024
MAX_MEMBERS = 8
MAX_UNPACKED = 512 * 1024
runner = CliRunner()


def lora(seed: int = 0, rank: int = 2, width: int = 8, layers=LAYERS) -> ll.LoRA:
    """A valid LoRA with PEFT module names."""
    g = torch.Generator().manual_seed(seed)
    return ll.LoRA(
        layers=[
            ll.LoRALayer(
                n, torch.randn(width, rank, generator=g), torch.randn(width, rank, generator=g)
            )
            for n in layers
        ]
    )


def peft(folder: Path, seed: int = 0, **kw) -> Path:
    ll.save_lora(lora(seed, **kw), folder)
    return folder


def safetensors_file(path: Path, seed: int = 0, **kw) -> Path:
    """A single-file PEFT adapter (``base_model.model.*.lora_A.weight`` keys)."""
    folder = peft(path.parent / f"{path.stem}-folder", seed, **kw)
    (folder / "adapter_model.safetensors").rename(path)
    return path


def train_run(
    root: Path, name: str, labels: dict[str, list[float]], model: str = "mlp-svd", n: int = 12
) -> Path:
    """``root/name``: a run trained for 2 epochs on ``n`` adapters of LAYERS' layout with the
    given label columns."""
    adapters = root / "adapters"
    adapters.mkdir(parents=True)
    cols = list(labels)
    lines = ["adapter," + ",".join(cols)]
    for k in range(n):
        peft(adapters / f"a{k}", seed=k)
        lines.append(f"a{k}," + ",".join(str(labels[c][k]) for c in cols))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    res = runner.invoke(
        app, ["pack", str(adapters), "--labels", str(root / "labels.csv"), "--out", str(root / "s")]
    )
    assert res.exit_code == 0, res.output
    args = ["train", "--data", str(root / "s"), "--target", ",".join(cols), "--model", model]
    res = runner.invoke(app, [*args, "--out", str(root / name), "--epochs", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    return root / name


def zipped(folder: Path, prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, prefix + p.relative_to(folder).as_posix())
    return buf.getvalue()


def tarred(folder: Path, prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for p in sorted(folder.rglob("*")):
            tf.add(p, prefix + p.relative_to(folder).as_posix(), recursive=False)
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`loralens serve` in a subprocess on a free loopback port, its TMPDIR ``tmp``."""

    def __init__(self, runs, tmp: Path, *args: str, token: str | None = None) -> None:
        self.port = _free_port()
        self.tmp = tmp
        self.url = f"http://127.0.0.1:{self.port}"
        src = str(Path(__file__).resolve().parents[2] / "src")
        env = {**os.environ, "TMPDIR": str(tmp)}
        env.pop("LORALENS_SERVE_TOKEN", None)
        if token:
            env["LORALENS_SERVE_TOKEN"] = token
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        runs = ["--runs", *map(str, runs), "--port", str(self.port)]
        self.log = tmp / "server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loralens", "serve", *runs, *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                health = httpx.get(self.url + "/api/health", headers=self.auth, timeout=2)
                if health.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the server did not come up:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def root(self) -> Path:
        (root,) = self.tmp.glob("loralens-serve-*")
        return root

    def raw(self, head: bytes, body: bytes = b"") -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.sendall(head + body)
        return sock

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
