"""Load test of `loralens serve` on loopback: N concurrent clients upload real adapter files of a
few sizes; bounded in requests and in time, it stops by itself.

    python benchmarks/serve_load.py                         # 4 clients x 12 requests, 2 workers
    python benchmarks/serve_load.py --clients 8 --requests 20 --workers 2 --queue 2
    python benchmarks/serve_load.py --quick                 # the CI smoke test: tiny and short

It trains a small run, writes PEFT adapters (safetensors) of three sizes (one of them zipped),
starts the real server (uvicorn) in a subprocess on a free 127.0.0.1 port with its own TMPDIR,
and reports throughput, p50/p99 latency per size, the answers by status, the peak memory of the
server's process tree (PSS and RSS summed over the server and its workers, every 100 ms), that
every request got exactly one answer (client and server counts agree) and that no temp file is
left, neither after the load nor after the server stops. Writes ``--out`` (JSON) too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch

import loralens as ll

SIZES = {  # name -> (layers, width, rank); the run is trained on the "small" layout
    "small": (2, 64, 4),
    "medium": (32, 512, 8),
    "large": (64, 2048, 16),
}


def _lora(layers: int, width: int, rank: int, seed: int) -> ll.LoRA:
    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj" for i in range(layers)]
    return ll.LoRA(
        layers=[
            ll.LoRALayer(
                n, torch.randn(width, rank, generator=g), torch.randn(width, rank, generator=g)
            )
            for n in names
        ]
    )


def _train_run(root: Path) -> Path:
    """A run (mlp-svd, 2 epochs) on 24 adapters of the small layout: enough to predict with."""
    from typer.testing import CliRunner

    from loralens.cli import app

    layers, width, rank = SIZES["small"]
    lines = ["adapter,y"]
    for k in range(24):
        ll.save_lora(_lora(layers, width, rank, k), root / "adapters" / f"a{k}")
        lines.append(f"a{k},{k}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    args = ["pack", str(root / "adapters"), "--labels", str(root / "labels.csv")]
    assert runner.invoke(app, [*args, "--out", str(root / "store")]).exit_code == 0
    args = ["train", "--data", str(root / "store"), "--target", "y", "--model", "mlp-svd"]
    res = runner.invoke(app, [*args, "--out", str(root / "run"), "--epochs", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    return root / "run"


def _uploads(root: Path) -> dict[str, tuple[str, bytes]]:
    """size name -> (file name, bytes): a .safetensors file each, the medium one zipped too."""
    import io
    import zipfile

    out = {}
    for name, (layers, width, rank) in SIZES.items():
        folder = root / f"upload-{name}"
        ll.save_lora(_lora(layers, width, rank, 100), folder)
        out[name] = (f"{name}.safetensors", (folder / "adapter_model.safetensors").read_bytes())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted((root / "upload-medium").iterdir()):
            zf.write(p, f"adapter/{p.name}")
    out["medium-zip"] = ("medium.zip", buf.getvalue())
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _MemorySampler(threading.Thread):
    """Peak memory of a process and its children, summed, sampled every 100 ms: RSS (counts the
    pages that forked workers share with each other many times) and PSS (shares them out)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak_rss = self.peak_pss = 0
        self.stop = threading.Event()

    def sample(self) -> tuple[int, int]:
        rss = pss = 0
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except psutil.Error:
                continue
            rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
        return rss, pss

    def run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                rss, pss = self.sample()
            except psutil.Error:
                continue
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)


def _client(url, uploads, names, n, deadline, results, lock) -> None:
    with httpx.Client(timeout=120) as client:
        for k in range(n):
            if time.monotonic() > deadline:
                return
            size = names[k % len(names)]
            fname, data = uploads[size]
            t0 = time.perf_counter()
            try:
                res = client.post(url + "/api/screen", files={"file": (fname, data)})
                status = res.status_code
            except httpx.HTTPError as e:
                status = f"transport error: {type(e).__name__}"
            with lock:
                results.append((size, status, time.perf_counter() - t0))


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        return _load(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _load(args: argparse.Namespace, work: Path) -> dict:
    run_dir = _train_run(work / "train")
    uploads = _uploads(work)
    tmp = work / "server-tmp"
    tmp.mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TMPDIR": str(tmp)}
    cmd = [sys.executable, "-m", "loralens", "serve", "--runs", str(run_dir), "--port", str(port)]
    cmd += ["--max-concurrent", str(args.workers), "--max-queue", str(args.queue)]
    log = open(work / "server.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        t_start = time.monotonic()
        while True:
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() - t_start > 180:
                raise SystemExit("the server did not start:\n" + (work / "server.log").read_text())
            time.sleep(0.3)
        startup_s = time.monotonic() - t_start
        sampler = _MemorySampler(server.pid)
        idle_rss, idle_pss = sampler.sample()
        sampler.start()
        results: list[tuple[str, object, float]] = []
        lock = threading.Lock()
        names = [s for s in args.sizes.split(",") if s]
        deadline = time.monotonic() + args.duration
        t0 = time.perf_counter()
        threads = [
            threading.Thread(
                target=_client,
                args=(
                    url,
                    uploads,
                    names[i % len(names) :] + names[: i % len(names)],
                    args.requests,
                    deadline,
                    results,
                    lock,
                ),
            )
            for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        health = httpx.get(url + "/api/health").json()
        (root,) = tmp.glob("loralens-serve-*")
        left_during = sorted(str(p.relative_to(root)) for p in root.iterdir())
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    left_after = sorted(p.name for p in tmp.iterdir())
    statuses: dict[str, int] = {}
    for _, status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    ok = [(s, t) for s, st, t in results if st == 200]
    per_size = {}
    for name in names:
        times = np.array([t for s, t in ok if s == name])
        if len(times):
            per_size[name] = {
                "bytes": len(uploads[name][1]),
                "n": len(times),
                "p50_ms": float(np.percentile(times, 50) * 1e3),
                "p99_ms": float(np.percentile(times, 99) * 1e3),
            }
    all_ok = np.array([t for _, t in ok]) if ok else np.zeros(1)
    return {
        "clients": args.clients,
        "requests_per_client": args.requests,
        "workers": args.workers,
        "queue": args.queue,
        "server_startup_s": startup_s,
        "sent": len(results),
        "answered_by_server": health["answered"],
        "statuses": statuses,
        "wall_s": wall,
        "throughput_per_s": len(ok) / wall,
        "p50_ms": float(np.percentile(all_ok, 50) * 1e3),
        "p99_ms": float(np.percentile(all_ok, 99) * 1e3),
        "per_size": per_size,
        "idle_rss_mib": idle_rss / 2**20,
        "idle_pss_mib": idle_pss / 2**20,
        "peak_rss_mib": sampler.peak_rss / 2**20,
        "peak_pss_mib": sampler.peak_pss / 2**20,
        "temp_left_during": left_during,
        "temp_left_after_stop": left_after,
        "server_exit_code": server.returncode,
        "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"load average {os.getloadavg()[0]:.1f}",
    }


def to_markdown(r: dict) -> str:
    lines = [
        f"{r['clients']} clients x {r['requests_per_client']} requests, {r['workers']} workers, "
        f"queue {r['queue']} ({r['machine']}); server up in {r['server_startup_s']:.1f} s",
        "",
        "| upload | bytes | n | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in r["per_size"].items():
        lines.append(
            f"| {name} | {s['bytes']:,} | {s['n']} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} |"
        )
    lines += [
        f"| all | | {sum(s['n'] for s in r['per_size'].values())} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |",
        "",
        f"throughput {r['throughput_per_s']:.1f} screenings/s over {r['wall_s']:.1f} s; answers by "
        f"status {r['statuses']}; sent {r['sent']}, answered by the server {r['answered_by_server']}; "
        f"peak memory of server + workers: PSS {r['peak_pss_mib']:.0f} MiB (idle "
        f"{r['idle_pss_mib']:.0f}), RSS summed {r['peak_rss_mib']:.0f} MiB (idle {r['idle_rss_mib']:.0f}); "
        f"temp files left: {len(r['temp_left_during'])} after the load, "
        f"{len(r['temp_left_after_stop'])} after the stop (exit code {r['server_exit_code']})",
    ]
    return "\n".join(lines)


def check(r: dict) -> list[str]:
    """What must hold whatever the machine: one answer per request, no temp file left."""
    problems = []
    if r["sent"] != r["answered_by_server"]:
        problems.append(f"sent {r['sent']} requests, the server answered {r['answered_by_server']}")
    if any(k.startswith("transport") or (k.startswith("5") and k != "503") for k in r["statuses"]):
        problems.append(f"unexpected answers {r['statuses']}")
    if r["temp_left_during"] or r["temp_left_after_stop"]:
        problems.append(f"temp files left: {r['temp_left_during']} {r['temp_left_after_stop']}")
    if r["server_exit_code"] != 0:
        problems.append(f"server exit code {r['server_exit_code']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=12, help="per client")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--queue", type=int, default=2, help="uploads waiting beyond the workers")
    p.add_argument("--sizes", default="small,medium,large,medium-zip")
    p.add_argument("--duration", type=float, default=300, help="stop sending after this many s")
    p.add_argument("--out", default=None, help="also write the numbers as JSON here")
    p.add_argument("--quick", action="store_true", help="2 clients x 2 small requests")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.requests, args.workers, args.queue, args.sizes = 2, 2, 1, 1, "small"
    result = run(args)
    print(to_markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    problems = check(result)
    for line in problems:
        print("FAILED:", line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
