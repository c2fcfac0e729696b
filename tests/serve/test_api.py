"""The HTTP API through a TestClient: every endpoint, and every hostile upload of the issue
answered 4xx with a clear message while the service keeps serving and keeps no temp file."""

from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import pytest
from serve_support import (
    LAYERS,
    MAX_MEMBERS,
    MAX_UNPACKED,
    MAX_UPLOAD,
    lora,
    peft,
    safetensors_file,
    tarred,
    zipped,
)

MARKER = "PWNED-by-upload"


@pytest.fixture(autouse=True)
def no_temp_files_left(client):
    yield
    assert list(client.service.tmp_root.iterdir()) == [], "a request left temp files"
    assert client.service.in_flight == 0


def _post(client, data: bytes, name: str = "a.safetensors", field: str = "file", **kw):
    return client.post("/api/screen", files={field: (name, data)}, **kw)


def _refused(res, status: int, *words: str) -> dict:
    assert res.status_code == status, res.text
    body = res.json()
    assert set(body) == {"error"}
    for w in words:
        assert w in body["error"], body["error"]
    return body


def _st(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# ---------------------------------------------------------------------------------- endpoints


def test_health(client):
    res = client.get("/api/health")
    assert res.status_code == 200
    body = res.json()
    assert body["status"] == "ok" and body["runs"] == 2 and body["in_flight"] == 0
    assert body["max_upload_bytes"] == MAX_UPLOAD
    assert res.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in res.headers["content-security-policy"]


def test_runs(client):
    reg, cls = client.get("/api/runs").json()
    assert (reg["name"], reg["task"], reg["targets"]) == ("reg", "regression", ["y", "z"])
    assert (cls["name"], cls["task"], cls["targets"]) == ("cls", "classification", ["c"])
    assert reg["trained_on"]["n"]["train"] > 0 and "r2" in reg["test"]
    assert "accuracy" in cls["test"] and reg["layout"] == {"num_layers": 2, "ranks": [2]}
    assert reg["interval_level"] == 0.9 and cls["interval_level"] == 0.9  # sets


def test_screen_a_safetensors_file(client, tmp_path):
    data = safetensors_file(tmp_path / "x.safetensors", seed=5).read_bytes()
    res = _post(client, data, name="../../etc/My LoRA.safetensors")
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["path"] == "My LoRA.safetensors"  # the client's name, never a path
    assert body["format"] == "peft" and body["num_layers"] == 2
    assert [r["name"] for r in body["layers"]] == list(LAYERS)
    assert set(body) >= {"base_model_guess", "flags", "predictions", "seconds", "warnings"}
    assert [p["run"] for p in body["predictions"]] == ["reg", "cls"]
    assert all("prediction" in p for p in body["predictions"])
    assert "interval" in body["predictions"][0] and "label" in body["predictions"][1]
    assert any("lora_alpha is unknown" in w for w in body["warnings"])
    assert str(client.service.tmp_root) not in res.text


@pytest.mark.parametrize("pack,name", [(zipped, "a.zip"), (tarred, "a.tar")])
def test_screen_an_archived_peft_folder(client, tmp_path, pack, name):
    data = pack(peft(tmp_path / "p", seed=6), prefix="my-adapter/")
    body = _post(client, data, name=name).json()
    assert body["path"] == f"{name}/my-adapter" and body["format"] == "peft"
    assert body["warnings"] == []
    assert all("prediction" in p for p in body["predictions"])


def test_a_layout_no_run_fits_gets_an_answer_per_run(client, tmp_path):
    import loralens as ll

    ll.save_lora(lora(seed=1, width=16), tmp_path / "wide")
    body = _post(client, zipped(tmp_path / "wide"), name="wide.zip").json()
    assert body["num_layers"] == 2
    assert [("error" in p, "does not fit" in p.get("error", "")) for p in body["predictions"]] == [
        (True, True),
        (True, True),
    ]


def test_the_page_and_its_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text and "http" not in page.text.replace("http-equiv", "")
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/../app.py").status_code == 404


def test_a_foreign_host_header_is_refused(client):
    """DNS rebinding: a page on another site must not reach the loopback service."""
    assert client.get("/api/health", headers={"host": "evil.example"}).status_code == 400


def test_unknown_routes_answer_json(client):
    _refused(client.get("/api/nothing"), 404, "Not Found")


# ---------------------------------------------------------------------------------- hostile


def test_wrong_content_type_is_415(client):
    _refused(client.post("/api/screen", json={"file": "x"}), 415, "multipart/form-data")
    _refused(client.post("/api/screen", content=b"abc"), 415, "multipart/form-data")


def test_empty_body_and_empty_file_are_400(client):
    headers = {"content-type": "multipart/form-data; boundary=x"}
    _refused(client.post("/api/screen", content=b"", headers=headers), 400, "empty")
    _refused(_post(client, b""), 400, "a.safetensors: the uploaded file is empty")


def test_missing_field_several_files_and_broken_bodies_are_400(client, tmp_path):
    data = safetensors_file(tmp_path / "x.safetensors").read_bytes()
    _refused(_post(client, data, field="upload"), 400, "no file in the form field 'file'")
    two = [("file", ("a.safetensors", data)), ("file", ("b.safetensors", data))]
    _refused(client.post("/api/screen", files=two), 400, "one file")
    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    body = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc'
    _refused(client.post("/api/screen", content=body, headers=headers), 400, "closing boundary")
    _refused(
        client.post("/api/screen", content=b"abc", headers={"content-type": "multipart/form-data"}),
        400,
        "boundary",
    )


def test_too_large_is_413_by_length_and_while_streaming(client):
    big = b"\0" * (MAX_UPLOAD + 1)
    _refused(_post(client, big), 413, "larger than the limit")

    def chunks():  # no Content-Length: counted while streaming
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
        for _ in range(MAX_UPLOAD // 4096 + 2):
            yield b"\0" * 4096

    headers = {"content-type": "multipart/form-data; boundary=b"}
    _refused(client.post("/api/screen", content=chunks(), headers=headers), 413, "larger than")


def test_unknown_file_type_is_415(client):
    _refused(_post(client, b"MZ\x90\x00 certainly not a LoRA", name="x.exe"), 415, "x.exe: not a")


def test_malicious_pickle_is_refused_and_never_run(client, tmp_path):
    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / MARKER}",))

    folder = peft(tmp_path / "evil")
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": Payload()}))
    res = _post(client, zipped(folder), name="evil.zip")
    _refused(res, 422, "evil.zip/adapter_model.bin")
    assert not (tmp_path / MARKER).exists(), "the pickle ran"


@pytest.mark.parametrize(
    "header,data,words",
    [
        ({}, None, "header"),  # length field far beyond the file
        (
            {"a.lora_A.weight": {"dtype": "F32", "shape": [2, 8], "data_offsets": [0, 10**12]}},
            b"\0" * 64,
            "",
        ),
        (
            {
                "m.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                "m.lora_B.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]},
            },
            b"\0" * 24,
            "",
        ),
        (
            {"m.lora_A.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "",
        ),
        ({"m.lora_A.weight": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, ""),
    ],
    ids=["huge-length", "out-of-range", "overlapping", "wrong-shape", "wrong-dtype"],
)
def test_malformed_safetensors_headers_are_422(client, header, data, words):
    raw = struct.pack("<Q", 2**60) + b"{}" if data is None else _st(header, data)
    _refused(_post(client, raw, name="bad.safetensors"), 422, "bad.safetensors", words)


def test_truncated_file_is_422(client, tmp_path):
    data = safetensors_file(tmp_path / "x.safetensors").read_bytes()
    _refused(_post(client, data[: len(data) // 2], name="cut.safetensors"), 422, "cut.safetensors")


def test_archive_bombs_escapes_links_and_counts(client, tmp_path):
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_model.safetensors", b"\0" * (MAX_UNPACKED + 1))
    _refused(_post(client, buf.getvalue(), name="bomb.zip"), 413, "bomb.zip: unpacks to more")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../escape.txt", b"x")
    _refused(_post(client, buf.getvalue(), name="esc.zip"), 422, "points outside")
    assert not (Path(client.service.tmp_root).parent / "escape.txt").exists()
    folder = peft(tmp_path / "linked")
    (folder / "link").symlink_to("/etc/passwd")
    _refused(_post(client, tarred(folder), name="l.tar"), 422, "is a link")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k in range(MAX_MEMBERS + 1):
            zf.writestr(f"f{k}", b"x")
    _refused(_post(client, buf.getvalue(), name="many.zip"), 413, "more than")


def test_a_full_service_answers_503_with_retry_after(client, tmp_path):
    service = client.service
    service.in_flight = service.config.capacity
    try:
        res = _post(client, safetensors_file(tmp_path / "x.safetensors").read_bytes())
    finally:
        service.in_flight = 0
    _refused(res, 503, "busy")
    assert res.headers["retry-after"] == str(service.config.retry_after_s)


def test_still_serving_after_all_that(client, tmp_path):
    health = client.get("/api/health").json()
    assert health["status"] == "ok"
    res = _post(client, safetensors_file(tmp_path / "x.safetensors").read_bytes())
    assert res.status_code == 200
    _refused(_post(client, b"junk", name="junk.txt"), 415)
    _refused(_post(client, b"junk"), 422, "a.safetensors: not a readable safetensors file")
    assert client.get("/api/health").json()["answered"] == health["answered"] + 3
