"""The packed dataset layout (pipelines/data/packs.py): deterministic packs, and the reader's refusals."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from pipelines.data import packs
from pipelines.data.packs import (
    PACK_DATE_TIME,
    DatasetReader,
    DatasetReadError,
    PackWriter,
    pack_path,
    unsafe_member_name,
    write_pack,
)
from pipelines.errors import PipelineError
from tests.support import class_image, png_bytes

MEMBERS = [
    (f"images/{label}/{index:016x}.png", png_bytes(class_image(position, index)))
    for position, label in enumerate("abc")
    for index in range(4)
]


def hostile_pack(path: Path, name: str, data: bytes = b"x", compression: int = zipfile.ZIP_STORED) -> None:
    """A pack written by another tool: a good member, then ``name``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr(MEMBERS[0][0], MEMBERS[0][1])
        archive.writestr(name, data)


# ------------------------------------------------------------------------------------------- writing


def test_same_members_give_a_byte_identical_pack_whatever_their_order(tmp_path: Path) -> None:
    first, second = tmp_path / "first.zip", tmp_path / "second.zip"
    write_pack(first, MEMBERS)
    write_pack(second, list(reversed(MEMBERS)))
    assert first.read_bytes() == second.read_bytes(), "the order members arrive in does not change the pack"
    with zipfile.ZipFile(first) as archive:
        infos = archive.infolist()
        assert [info.filename for info in infos] == sorted(name for name, _ in MEMBERS), "members sorted by name"
        assert archive.testzip() is None, "every member's CRC checks"
        for info in infos:
            assert info.compress_type == zipfile.ZIP_STORED, f"{info.filename}: stored, not compressed"
            assert info.date_time == PACK_DATE_TIME, f"{info.filename}: the fixed date, not the clock"
            assert info.external_attr >> 16 == 0o100644, f"{info.filename}: fixed permissions"
    assert not list(tmp_path.glob("*.spool")), "the spool file is removed once the pack is written"


def test_writer_refuses_unsafe_and_duplicate_names_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "images.zip"
    for name in ("../escape.png", "/etc/passwd", "images/../../x.png", "images\\a.png", "images//a.png"):
        with pytest.raises(PipelineError, match="refused"), PackWriter(target) as writer:
            writer.add(name, b"x")
        assert not list(tmp_path.iterdir()), f"{name!r}: no pack or spool is left"
    with PackWriter(target) as writer:
        writer.add("images/a/x.png", b"1")
        with pytest.raises(PipelineError, match="added twice"):
            writer.add("images/a/x.png", b"2")
        writer.abort()
    assert not list(tmp_path.iterdir()), "a refused pack leaves nothing behind"
    target.write_bytes(b"someone else's file")
    with pytest.raises(PipelineError, match="exists"):
        PackWriter(target)
    assert target.read_bytes() == b"someone else's file", "a writer never overwrites or removes a file it did not write"


def test_writer_checks_that_the_written_pack_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "images.zip"
    real = PackWriter._check_written

    def truncate_then_check(self: PackWriter) -> None:
        data = self.path.read_bytes()
        self.path.write_bytes(data[: len(data) - 30])  # the end of the central directory is lost
        real(self)

    monkeypatch.setattr(PackWriter, "_check_written", truncate_then_check)
    with pytest.raises(DatasetReadError, match=r"images\.zip: not a readable pack"):
        write_pack(target, MEMBERS)
    assert not target.exists(), "a pack that does not read back is removed"


def test_more_than_65535_members_use_zip64_and_read_back(tmp_path: Path) -> None:
    count = 65_600
    names = [f"images/a/{index:016x}.png" for index in range(count)]
    path = pack_path(tmp_path, "images")
    write_pack(path, ((name, index.to_bytes(3, "big")) for index, name in enumerate(names)))
    with DatasetReader(tmp_path) as reader:
        assert reader.members("images") == names, f"all {count} members are listed"
        assert reader.read(names[-1], 10) == (count - 1).to_bytes(3, "big"), "the last member reads back"


# ------------------------------------------------------------------------------------------- reading


def test_reader_reads_packed_members_and_falls_back_to_loose_files(tmp_path: Path) -> None:
    packed, loose = tmp_path / "packed", tmp_path / "loose"
    write_pack(pack_path(packed, "images"), MEMBERS)
    for name, data in MEMBERS:
        (loose / name).parent.mkdir(parents=True, exist_ok=True)
        (loose / name).write_bytes(data)
    with DatasetReader(packed) as from_pack, DatasetReader(loose) as from_files:
        for name, data in MEMBERS:
            assert from_pack.read(name, 10_000) == data, f"{name}: the pack's member"
            assert from_files.read(name, 10_000) == data, f"{name}: the loose file, without a pack"
        assert from_pack.layout("images") == "packed", "a dataset with images.zip is packed"
        assert from_files.layout("images") == "loose", "a dataset without it is loose"
        assert from_files.members("images") is None, "a loose dataset has no member list"
        with pytest.raises(DatasetReadError, match=r"not found in .*images\.zip") as missing:
            from_pack.read("images/a/absent.png", 10_000)
        assert missing.value.reason.startswith("not found in"), f"a short reason for validation: {missing.value}"
        with pytest.raises(DatasetReadError, match="file not found") as no_file:
            from_files.read("images/a/absent.png", 10_000)
        assert str(loose / "images/a/absent.png") in str(no_file.value), f"the file is named: {no_file.value}"


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "images/../../outside.png"])
def test_pack_with_a_member_named_with_dot_dot_or_an_absolute_path_is_refused_by_name(
    tmp_path: Path, name: str
) -> None:
    path = pack_path(tmp_path, "images")
    hostile_pack(path, name)
    with DatasetReader(tmp_path) as reader, pytest.raises(DatasetReadError) as caught:
        reader.read(MEMBERS[0][0], 10_000)  # even a good member: the pack as a whole is refused
    message = str(caught.value)
    assert str(path) in message, f"the pack is named: {message}"
    assert repr(name) in message, f"the member is named: {message}"
    assert "refused" in message, f"the message says it is refused: {message}"
    assert not (tmp_path / "outside.png").exists(), "nothing is extracted anywhere"


@pytest.mark.parametrize("path", ["images/../../outside.png", "images//a.png", "images/a/./b.png"])
def test_manifest_path_with_dot_dot_is_refused_before_any_lookup(tmp_path: Path, path: str) -> None:
    write_pack(pack_path(tmp_path, "images"), MEMBERS)
    with DatasetReader(tmp_path) as reader, pytest.raises(DatasetReadError, match="refused") as caught:
        reader.read(path, 10_000)
    assert path in str(caught.value), f"the path is named: {caught.value}"


def test_member_declaring_more_than_the_limit_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = pack_path(tmp_path, "images")
    write_pack(path, [("images/a/big.png", b"\0" * 5000), *MEMBERS])
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def recording_open(self: zipfile.ZipFile, name: object, *args: object, **kwargs: object) -> object:
        opened.append(getattr(name, "filename", str(name)))
        return real_open(self, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(zipfile.ZipFile, "open", recording_open)
    with DatasetReader(tmp_path) as reader:
        with pytest.raises(DatasetReadError, match=r"5000 bytes, over ingest\.max_file_bytes=4000") as caught:
            reader.read("images/a/big.png", 4000)
        assert str(path) in str(caught.value), f"the pack is named: {caught.value}"
        assert opened == [], f"the member was not opened, let alone read: {opened}"
        assert reader.read("images/a/big.png", 5000) == b"\0" * 5000, "at the limit it is read"


def test_compressed_member_is_refused(tmp_path: Path) -> None:
    hostile_pack(pack_path(tmp_path, "images"), "images/a/bomb.png", b"\0" * 100_000, zipfile.ZIP_DEFLATED)
    with DatasetReader(tmp_path) as reader, pytest.raises(DatasetReadError, match="compressed or encrypted"):
        reader.read(MEMBERS[0][0], 10_000)


def test_truncated_pack_is_named(tmp_path: Path) -> None:
    path = pack_path(tmp_path, "images")
    write_pack(path, MEMBERS)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with DatasetReader(tmp_path) as reader:
        for _ in range(2):  # refused on every read, not only the first
            with pytest.raises(DatasetReadError, match=r"images\.zip: not a readable pack, truncated or corrupt"):
                reader.read(MEMBERS[0][0], 10_000)


def test_corrupt_member_bytes_fail_their_crc(tmp_path: Path) -> None:
    path = pack_path(tmp_path, "images")
    write_pack(path, MEMBERS)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(MEMBERS[0][0])
        start = info.header_offset + 30 + len(info.filename.encode())
    data = bytearray(path.read_bytes())
    data[start + 20] ^= 0xFF
    path.write_bytes(bytes(data))
    with DatasetReader(tmp_path) as reader:
        with pytest.raises(
            DatasetReadError, match=r"cannot be read from .*images\.zip, truncated or corrupt"
        ) as caught:
            reader.read(MEMBERS[0][0], 10_000)
        assert "CRC" in str(caught.value), f"the CRC check caught it: {caught.value}"
        assert reader.read(MEMBERS[1][0], 10_000) == MEMBERS[1][1], "the other members still read"


def test_pack_that_is_a_link_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.zip"
    write_pack(real, MEMBERS)
    (tmp_path / "dataset").mkdir()
    pack_path(tmp_path / "dataset", "images").symlink_to(real)
    with DatasetReader(tmp_path / "dataset") as reader, pytest.raises(DatasetReadError, match="symbolic link"):
        reader.read(MEMBERS[0][0], 10_000)


def test_loose_files_are_read_safely(tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    (dataset / "images" / "a").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"secret")
    (dataset / "images" / "a" / "leak.png").symlink_to(tmp_path / "secret.png")
    os.mkfifo(dataset / "images" / "a" / "fifo.png")
    (dataset / "images" / "a" / "big.png").write_bytes(b"\0" * 101)
    with DatasetReader(dataset) as reader:
        with pytest.raises(DatasetReadError, match="path leaves the dataset folder"):
            reader.read("images/a/leak.png", 1000)
        with pytest.raises(DatasetReadError, match="path leaves the dataset folder"):
            reader.read("../secret.png", 1000)
        with pytest.raises(DatasetReadError, match="not a regular file"):
            reader.read("images/a/fifo.png", 1000)  # refused without blocking on the FIFO
        with pytest.raises(DatasetReadError, match=r"101 bytes, over ingest\.max_file_bytes=100"):
            reader.read("images/a/big.png", 100)


def test_read_errors_survive_pickling_from_worker_processes() -> None:
    import pickle

    error = DatasetReadError("/data/images.zip", "not a readable pack")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.where, copy.reason, str(copy)) == (error.where, error.reason, str(error)), "the same error"


def test_unsafe_member_name_rules() -> None:
    assert unsafe_member_name("images/a/0123.png") == "", "a manifest path is a safe name"
    assert unsafe_member_name("augmented/a/0123-1.png") == "", "so is an augmented path"
    for name in ("", "../x", "a/../b", "/x", "C:/x", "a\\b", "a/\0", "a//b", "./a"):
        assert unsafe_member_name(name), f"{name!r} is unsafe"
    assert set(packs.PACK_KINDS) == {"images", "augmented"}, "one pack per kind of image"
