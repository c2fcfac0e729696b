"""Fixtures of the service's tests: two small trained runs (regression with two targets, and
classification) shared by the whole session, and a TestClient over a running service."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_support import MAX_MEMBERS, MAX_UNPACKED, MAX_UPLOAD, train_run


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-runs")
    return {
        "reg": train_run(
            root / "r", "reg", {"y": list(range(90)), "z": [k % 5 for k in range(90)]}, n=90
        ),
        "cls": train_run(root / "c", "cls", {"c": [k % 2 for k in range(12)]}),
    }


@pytest.fixture(scope="session")
def client(runs):
    """A TestClient over a started service with one worker and small caps."""
    from fastapi.testclient import TestClient

    from loralens.serve.app import ServeConfig, Service, create_app
    from loralens.serve.unpack import Limits

    config = ServeConfig(
        runs=[str(runs["reg"]), str(runs["cls"])],
        max_upload_bytes=MAX_UPLOAD,
        max_concurrent=1,
        max_queue=1,
        time_limit_s=30,
        limits=Limits(max_members=MAX_MEMBERS, max_unpacked_bytes=MAX_UNPACKED),
        allowed_hosts=["testserver", "127.0.0.1"],
    )
    service = Service(config)
    with TestClient(create_app(service)) as c:
        c.service = service
        yield c
