"""`loralens serve` as a real uvicorn server on a free loopback port: token, a 413 sent before
the body arrives, a client that disconnects mid-upload, a slow upload (408), a full service
(503 + Retry-After), and a stop that leaves no temp folder and no worker behind."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from serve_support import Server, safetensors_file
from typer.testing import CliRunner

from loralens.cli import app

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIME_LIMIT = 3


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
    args = ["--max-concurrent", "1", "--max-queue", "0", "--max-upload-mb", "1"]
    args += ["--time-limit", str(TIME_LIMIT)]
    s = Server([runs["reg"], runs["cls"]], tmp_path_factory.mktemp("serve-tmp"), *args, token=TOKEN)
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
    assert server.stop() == 0, server.output()
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
