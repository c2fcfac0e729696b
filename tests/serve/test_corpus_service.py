"""The hostile corpus (tests/hostile) uploaded to the service: each entry answered 4xx naming the
file, or screened (a correct result), never 5xx; no payload runs; the service keeps serving and
keeps no temp file. Folders go up as archives (tar where they hold a FIFO, zip otherwise)."""

from __future__ import annotations

import io
import stat
import tarfile
from pathlib import Path

import pytest
from serve_support import zipped

from hostile import corpus

#: entries whose weights overflow: the screening reads with allow_nonfinite to show them, so it
#: answers 200 with an error-severity ``nonfinite`` flag instead of refusing
FLAGGED = {"alpha-huge", "kohya-alpha-huge", "kohya-alpha-overflow"}


@pytest.fixture(scope="module")
def corpus_client(runs):
    """A service with a short time limit, so that an entry that makes the reader hang (the
    regex bomb, before the hardening) costs seconds."""
    from fastapi.testclient import TestClient

    from loralens.serve.app import ServeConfig, Service, create_app

    service = Service(ServeConfig(runs=[str(runs["reg"])], max_concurrent=1, time_limit_s=3))
    with TestClient(create_app(service)) as c:
        c.service = service
        yield c


def _upload(path: Path) -> tuple[str, bytes]:
    if path.is_file():
        return path.name, path.read_bytes()
    if path.is_dir() and not any(stat.S_ISFIFO(p.lstat().st_mode) for p in path.iterdir()):
        return path.name + ".zip", zipped(path)
    buf = io.BytesIO()  # a FIFO, or a folder holding one: tar records it as a FIFO member
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(path, path.name)
    return path.name + ".tar", buf.getvalue()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(corpus.ADAPTERS))
def test_hostile_corpus_through_the_service(corpus_client, tmp_path, case):
    name, data = _upload(corpus.ADAPTERS[case](tmp_path))
    res = corpus_client.post("/api/screen", files={"file": (name, data)})
    assert res.status_code < 500, res.text
    assert not (tmp_path / corpus.MARKER).exists(), "a payload ran"
    assert corpus_client.get("/api/health").json()["in_flight"] == 0
    assert list(corpus_client.service.tmp_root.iterdir()) == []
    if case in corpus.VALID:
        assert res.status_code == 200 and not res.json()["flags"], res.text
        return
    if case in FLAGGED:
        assert res.status_code == 200, res.text
        flags = {f["kind"]: f["severity"] for f in res.json()["flags"]}
        assert flags.get("nonfinite") == "error", res.text
        return
    assert 400 <= res.status_code < 500, res.text
    assert name.split(".")[0] in res.json()["error"]
