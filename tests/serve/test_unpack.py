"""The archive rules for uploads: what is unpacked, what is refused (with which status), and
that nothing is ever written outside the request's folder."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest
from serve_support import peft, safetensors_file, tarred, zipped

from loralens.serve.errors import Refused
from loralens.serve.unpack import Limits, kind_of, local_adapter, prepare_adapter

LIMITS = Limits(max_members=8, max_unpacked_bytes=64 * 1024)


def _prepare(tmp_path: Path, data: bytes, name: str = "up.zip", limits: Limits = LIMITS):
    import shutil

    shutil.rmtree(tmp_path / "req", ignore_errors=True)
    upload = tmp_path / "req" / "upload"
    upload.parent.mkdir()
    upload.write_bytes(data)
    return prepare_adapter(upload, name, tmp_path / "req" / "in", limits)


def _refused(tmp_path: Path, data: bytes, status: int, words: str, **kw) -> None:
    before = {p for p in tmp_path.rglob("*") if "req" not in p.parts}
    with pytest.raises(Refused) as info:
        _prepare(tmp_path, data, **kw)
    assert info.value.status == status, info.value.message
    assert words in info.value.message, info.value.message
    after = {p for p in tmp_path.rglob("*") if "req" not in p.parts}
    assert after == before, "something was written outside the request folder"


def _zip(members: dict[str, bytes], attrs: dict[str, int] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if attrs and name in attrs:
                info.external_attr = attrs[name] << 16
            zf.writestr(info, data)
    return buf.getvalue()


def _tar(build) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        build(tf)
    return buf.getvalue()


def _member(
    tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = ""
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data), link
    tf.addfile(info, io.BytesIO(data) if data else None)


def test_kinds_come_from_the_bytes(tmp_path):
    st = safetensors_file(tmp_path / "x.safetensors")
    zp = tmp_path / "x.bin"
    zp.write_bytes(zipped(peft(tmp_path / "p")))
    tr = tmp_path / "x.zip"  # a tar, whatever its name says
    tr.write_bytes(tarred(tmp_path / "p"))
    txt = tmp_path / "x.txt"
    txt.write_text("hello world, not an adapter")
    assert [kind_of(p, p.name) for p in (st, zp, tr, txt)] == ["safetensors", "zip", "tar", None]


def test_a_named_pipe_is_refused_without_being_opened(tmp_path):
    pipe = tmp_path / "p.safetensors"
    os.mkfifo(pipe)  # opening it to read its first bytes would block until a writer came
    with pytest.raises(Refused, match=r"shown\.safetensors: a named pipe, not a regular file"):
        local_adapter(pipe, "shown.safetensors", tmp_path / "in", Limits())


def test_a_safetensors_upload_is_kept_under_its_name(tmp_path):
    data = safetensors_file(tmp_path / "a.safetensors").read_bytes()
    target, shown = _prepare(tmp_path, data, name="my lora.safetensors")
    assert target == tmp_path / "req" / "in" / "my lora.safetensors" and target.is_file()
    assert shown == "my lora.safetensors"


@pytest.mark.parametrize("pack", [zipped, tarred])
@pytest.mark.parametrize("prefix", ["", "adapter/"])
def test_a_peft_folder_archive_unpacks_to_its_folder(tmp_path, pack, prefix):
    data = pack(peft(tmp_path / "p"), prefix=prefix)
    target, shown = _prepare(tmp_path, data, name="up.x")
    assert (target / "adapter_config.json").is_file()
    assert shown == ("up.x" if not prefix else "up.x/adapter")
    assert not (tmp_path / "req" / "upload").exists(), "the archive is deleted once unpacked"


def test_gzipped_tar_is_accepted(tmp_path):
    folder = peft(tmp_path / "p")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(folder, "adapter")
    target, _ = _prepare(tmp_path, buf.getvalue())
    assert (target / "adapter_model.safetensors").is_file()


def test_unknown_bytes_are_refused_415(tmp_path):
    text = b"just some text, certainly no adapter"
    _refused(tmp_path, text, 415, "not a .safetensors", name="notes.txt")


JUNK = {
    "random.safetensors": bytes(range(256)) * 8,
    "text.safetensors": b"hello world\n",
    "header.safetensors": b'\x08\x00\x00\x00\x00\x00\x00\x00{"a": 1}',
    "fake.zip": b"not a zip",
    "fake.tar": b"not a tar either" * 40,
}


@pytest.mark.parametrize("name", sorted(JUNK))
def test_a_bad_file_gets_one_message_from_the_service_and_from_screen(tmp_path, name):
    """Uploaded (`serve`) or found in a folder (`screen`), a file is judged by the same rule:
    its bytes, else what its name claims; so the same junk gets the same status and message."""
    from loralens.serve.jobs import handle

    (tmp_path / "folder").mkdir()
    local = tmp_path / "folder" / name
    local.write_bytes(JUNK[name])
    (tmp_path / "up").mkdir()
    upload = tmp_path / "up" / "upload"
    upload.write_bytes(JUNK[name])
    served = handle([], ("upload", str(upload), name, str(tmp_path / "up"), LIMITS))
    screened = handle([], ("path", str(local), name, str(tmp_path / "folder"), LIMITS))
    assert served == screened, (served, screened)
    assert served[:2] == ("refused", 422) and served[2].startswith(f"{name}: not a readable")


@pytest.mark.parametrize("name", ["../evil", "/etc/evil", "a/../../evil", "C:/evil", "a\\..\\evil"])
def test_path_escapes_are_refused(tmp_path, name):
    _refused(tmp_path, _zip({name: b"x"}), 422, "points outside")
    _refused(tmp_path, _tar(lambda tf: _member(tf, name, data=b"x")), 422, "points outside")


def test_links_and_special_files_are_refused(tmp_path):
    _refused(tmp_path, _zip({"l": b"/etc/passwd"}, {"l": stat.S_IFLNK | 0o777}), 422, "is a link")
    _refused(tmp_path, _zip({"d": b""}, {"d": stat.S_IFCHR | 0o666}), 422, "device or special")
    _refused(
        tmp_path,
        _tar(lambda tf: _member(tf, "l", tarfile.SYMTYPE, link="/etc/passwd")),
        422,
        "is a link",
    )
    _refused(
        tmp_path, _tar(lambda tf: _member(tf, "h", tarfile.LNKTYPE, link="x")), 422, "is a link"
    )
    for kind in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
        _refused(tmp_path, _tar(lambda tf, k=kind: _member(tf, "d", k)), 422, "device or special")


def test_member_count_is_capped(tmp_path):
    many = {f"f{k}": b"x" for k in range(LIMITS.max_members + 1)}
    _refused(tmp_path, _zip(many), 413, f"more than {LIMITS.max_members} members")

    def build(tf):
        for k in range(LIMITS.max_members + 1):
            _member(tf, f"f{k}", data=b"x")

    _refused(tmp_path, _tar(build), 413, f"more than {LIMITS.max_members} members")


def test_zip_bomb_and_tar_bomb_stop_at_the_unpacked_cap(tmp_path):
    zeros = b"\0" * (LIMITS.max_unpacked_bytes + 1)
    bomb = _zip({"adapter_model.safetensors": zeros})
    assert len(bomb) < len(zeros) / 50
    _refused(tmp_path, bomb, 413, "unpacks to more than")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.size = len(zeros)
        tf.addfile(info, io.BytesIO(zeros))
    _refused(tmp_path, buf.getvalue(), 413, "unpacks to more than")


def test_a_zip_that_lies_about_sizes_is_refused(tmp_path):
    """The declared size says 1 byte; the data inflates to far more: never written past it."""
    zeros = b"\0" * (LIMITS.max_unpacked_bytes + 1)
    data = bytearray(_zip({"a": zeros}))
    for sig, at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size fields
        i = data.find(sig)
        data[i + at : i + at + 4] = struct.pack("<I", 1)
    _refused(tmp_path, bytes(data), 422, "not a readable zip")


def test_huge_central_directories_are_refused_before_parsing(tmp_path):
    data = bytearray(_zip({"a": b"x"}))
    i = data.rfind(b"PK\x05\x06")
    data[i + 10 : i + 12] = struct.pack("<H", 0xFFFF)
    _refused(tmp_path, bytes(data), 413, "zip64")
    data[i + 10 : i + 16] = struct.pack("<HI", 1, 10**8)
    _refused(tmp_path, bytes(data), 413, "members")


def test_encrypted_duplicate_and_broken_archives_are_refused(tmp_path):
    secret = bytearray(_zip({"secret": b"x"}))
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # general purpose flags: bit 0
        i = secret.find(sig)
        secret[i + at] |= 0x1
    _refused(tmp_path, bytes(secret), 422, "encrypted")
    dup = io.BytesIO()
    with zipfile.ZipFile(dup, "w") as zf, pytest.warns(UserWarning):
        zf.writestr("a", b"1")
        zf.writestr("a", b"2")
    _refused(tmp_path, dup.getvalue(), 422, "appears twice")
    good = _zip({"adapter_config.json": b"{}"})
    _refused(tmp_path, good[: len(good) // 2], 422, "not a readable zip")
    tar = _tar(lambda tf: _member(tf, "a", data=b"x" * 5000))
    _refused(tmp_path, tar[:1000], 422, "not a readable tar")


def test_archives_without_exactly_one_adapter_are_refused(tmp_path):
    _refused(tmp_path, _zip({"README.md": b"hi"}), 422, "holds no adapter_config.json")
    two = peft(tmp_path / "two" / "a")
    peft(tmp_path / "two" / "b", seed=1)
    _refused(tmp_path, zipped(two.parent), 422, "holds 2 adapters (a, b)")
