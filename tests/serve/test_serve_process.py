"""`loralens serve` as a real uvicorn server on a free loopback port: token, a 413 sent before
the body arrives, a client that disconnects mid-upload, a slow upload (408), a full service
(503 + Retry-After), and a stop that leaves no temp folder and no worker behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_support import safetensors_file
from typer.testing import CliRunner

from loralens.cli import app

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIME_LIMIT = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, runs, tmp: Path) -> None:
        self.port = _free_port()
        self.tmp = tmp
        self.url = f"http://127.0.0.1:{self.port}"
        src = str(Path(__file__).resolve().parents[2] / "src")
        env = {**os.environ, "TMPDIR": str(tmp), "LORALENS_SERVE_TOKEN": TOKEN}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        args = ["--runs", str(runs["reg"]), str(runs["cls"]), "--port", str(self.port)]
        args += ["--max-concurrent", "1", "--max-queue", "0", "--max-upload-mb", "1"]
        args += ["--time-limit", str(TIME_LIMIT)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loralens", "serve", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read().decode()
            try:
                if httpx.get(self.url + "/api/health", headers=AUTH, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise AssertionError("the server did not come up")

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


def _head(length: int, boundary: str = "b") -> bytes:
    return (
        f"POST /api/screen HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


PART = b'--b\r\nContent-Disposition: form-data; name="file"; filename="slow.safetensors"\r\n\r\n'


def _status(sock: socket.socket) -> int:
    data = sock.recv(4096)
    return int(data.split(b" ", 2)[1])


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    s = Server(runs, tmp_path_factory.mktemp("serve-tmp"))
    yield s
    s.stop()


def _until(check, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_every_api_call_needs_the_token(server):
    for path in ("/api/health", "/api/runs"):
        res = httpx.get(server.url + path)
        assert res.status_code == 401 and res.headers["www-authenticate"] == "Bearer"
        res = httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"})
        assert res.status_code == 401
        assert httpx.get(server.url + path, headers=AUTH).status_code == 200
    assert httpx.post(server.url + "/api/screen", files={"file": ("a", b"x")}).status_code == 401
    assert httpx.get(server.url + "/").status_code == 200  # the page holds no data


def test_screen_over_the_wire(server, tmp_path):
    data = safetensors_file(tmp_path / "x.safetensors").read_bytes()
    res = httpx.post(
        server.url + "/api/screen", files={"file": ("x.safetensors", data)}, headers=AUTH
    )
    assert res.status_code == 200, res.text
    assert [p["run"] for p in res.json()["predictions"]] == ["reg", "cls"]


def test_413_is_answered_before_the_body_is_sent(server):
    sock = server.raw(_head(10**12))  # a terabyte announced, nothing sent
    t0 = time.monotonic()
    assert _status(sock) == 413
    assert time.monotonic() - t0 < 5
    sock.close()


def test_a_client_that_disconnects_mid_upload_leaves_no_temp_file(server):
    sock = server.raw(_head(900_000), PART + b"\0" * 100_000)
    assert _until(lambda: any(server.root().iterdir()), 5), "the upload never started"
    sock.close()
    assert _until(lambda: not any(server.root().iterdir())), list(server.root().rglob("*"))
    assert httpx.get(server.url + "/api/health", headers=AUTH).json()["in_flight"] == 0


def test_a_slow_upload_gets_408_and_a_full_service_503(server, tmp_path):
    sock = server.raw(_head(900_000), PART + b"\0" * 1000)  # holds the only slot
    assert _until(lambda: any(server.root().iterdir()), 5)
    data = safetensors_file(tmp_path / "x.safetensors").read_bytes()
    res = httpx.post(
        server.url + "/api/screen", files={"file": ("x.safetensors", data)}, headers=AUTH
    )
    assert res.status_code == 503 and res.headers["retry-after"].isdigit()
    assert "busy" in res.json()["error"]
    t0 = time.monotonic()
    assert _status(sock) == 408
    assert time.monotonic() - t0 < TIME_LIMIT + 5
    sock.close()
    assert _until(lambda: not any(server.root().iterdir()))
    res = httpx.post(
        server.url + "/api/screen", files={"file": ("x.safetensors", data)}, headers=AUTH
    )
    assert res.status_code == 200


def test_stopping_removes_the_temp_folder_and_the_workers(server):
    import psutil

    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert children, "no worker processes"
    assert server.stop() == 0, server.proc.stdout.read().decode()
    assert list(server.tmp.glob("loralens-serve-*")) == []
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.org"])
def test_a_non_local_bind_needs_a_token(host, monkeypatch):
    monkeypatch.delenv("LORALENS_SERVE_TOKEN", raising=False)
    res = CliRunner().invoke(app, ["serve", "--runs", "r", "--host", host])
    assert res.exit_code == 2 and "set --token" in res.output


def test_loopback_names():
    from loralens.cli.serve import is_loopback

    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.org", "localhost.evil"]))
