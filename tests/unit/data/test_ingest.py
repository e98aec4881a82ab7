from __future__ import annotations

import errno
import hashlib
import io
import os
import signal
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.data.ingest import assign_splits, ingest, smallest_class_size, split_sizes
from pipelines.data.manifest import read_manifest
from pipelines.data.packs import PackWriter
from pipelines.errors import IngestError
from pipelines.project import Project
from tests.support import (
    class_image,
    make_source,
    manifest_matches_files,
    png_bytes,
    protected_state,
    read_image,
    run_mlops_killed,
    staging_leftovers,
    tree_digest,
)

ProjectFactory = Callable[..., Project]


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def assert_data_untouched(project: Project, before: dict[str, str]) -> None:
    after = tree_digest(project.data_dir) if project.data_dir.exists() else {}
    assert after == before, "a failed ingest must leave data/ exactly as it was"
    staging = project.root / "artifacts" / "staging"
    leftovers = list(staging.iterdir()) if staging.exists() else []
    assert leftovers == [], f"a failed ingest must not leave staging folders behind: {leftovers}"


def test_sample_export_is_deterministic(tiny_project: ProjectFactory, tmp_path: Path) -> None:
    overrides = {"dataset": {"name": "digits", "classes": [str(d) for d in range(10)], "image_size": [16, 16]}}
    first = tiny_project(overrides)
    result = ingest(first, "sample")
    digest_one = tree_digest(first.dataset_dir)
    ingest(first, "sample")
    assert tree_digest(first.dataset_dir) == digest_one, "re-ingesting the sample must give the same bytes"
    assert result.images == 1797, f"the digits sample has 1797 distinct images, got {result.images}"
    assert all(count > 0 for count in result.per_split.values()), f"every split is used: {result.per_split}"
    rows = read_manifest(first.manifest_path)
    assert {(row.width, row.height, row.channels) for row in rows} == {(16, 16, 1)}, "images normalised to config"
    assert sorted({row.label for row in rows}) == [str(d) for d in range(10)], "all ten digit classes present"


def test_the_same_images_give_a_byte_identical_pack_whatever_their_order_or_the_process_count(
    tiny_project: ProjectFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.data import parallel

    source = make_source(tmp_path / "source", per_class=6)
    first = tiny_project()
    ingest(first, f"folder:{source}")
    expected = tree_digest(first.dataset_dir)
    assert set(expected) == {"images.zip", "manifest.csv"}, f"a pack and its manifest: {sorted(expected)}"

    renamed = tmp_path / "renamed"  # the same images under other names: read in another order
    for path in sorted(source.rglob("*.png")):
        target = renamed / path.parent.name / f"z-{99 - int(path.stem.removeprefix('img')):02d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    ingest(first, f"folder:{renamed}")
    assert tree_digest(first.dataset_dir) == expected, "the pack depends on the images, not on their order"

    monkeypatch.setattr(parallel, "PARALLEL_MIN_ITEMS", 0)  # worker processes even for 18 images
    monkeypatch.delenv(parallel.WORKERS_ENV, raising=False)
    monkeypatch.setattr(parallel, "worker_count", lambda: 2)
    ingest(first, f"folder:{source}")
    assert tree_digest(first.dataset_dir) == expected, "two worker processes write the same bytes as one process"


def test_a_pack_that_does_not_read_back_is_refused_and_data_untouched(
    tiny_project: ProjectFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tiny_project()
    ingest(project, f"folder:{make_source(tmp_path / 'good')}")
    before = tree_digest(project.data_dir)
    real = PackWriter._check_written

    def truncated(self: PackWriter) -> None:
        data = self.path.read_bytes()
        self.path.write_bytes(data[: len(data) - 100])  # a write that lost its end
        real(self)

    monkeypatch.setattr(PackWriter, "_check_written", truncated)
    with pytest.raises(IngestError, match=r"images\.zip: not a readable pack.*data/ is unchanged"):
        ingest(project, f"folder:{make_source(tmp_path / 'new', per_class=7)}")
    assert_data_untouched(project, before)


def test_splits_are_stratified_per_class_and_independent_of_order() -> None:
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    images = {hashlib.sha256(f"{label}{i}".encode()).hexdigest(): label for label in "abc" for i in range(40)}
    splits = assign_splits(images, {}, fractions)
    for label in "abc":
        counts = Counter(splits[digest] for digest, owner in images.items() if owner == label)
        assert counts == {"train": 28, "val": 6, "test": 6}, f"class {label} is split 28/6/6, got {dict(counts)}"
    reordered = dict(reversed(list(images.items())))
    assert assign_splits(reordered, {}, fractions) == splits, "the split depends on content, not on reading order"


def test_split_sizes_round_by_largest_remainder_and_name_the_smallest_class() -> None:
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    assert split_sizes(6, fractions) == {"train": 4, "val": 1, "test": 1}, "6 images: 4.2/0.9/0.9 rounded"
    assert sum(split_sizes(1797, fractions).values()) == 1797, "the sizes always add up to the count"
    assert smallest_class_size(5, fractions) == 32, "32 x 0.15 = 4.8 rounds up: the fewest images giving 5 per split"


def test_new_images_fill_what_each_class_lacks() -> None:
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    old = {hashlib.sha256(f"a{i}".encode()).hexdigest(): "a" for i in range(20)}
    previous = {digest: "train" for digest in old}  # an earlier version put every image in train
    new = {hashlib.sha256(f"a-new{i}".encode()).hexdigest(): "a" for i in range(20)}
    splits = assign_splits({**old, **new}, previous, fractions)
    assert all(splits[digest] == "train" for digest in old), "images already placed never move"
    counts = Counter(splits[digest] for digest in new)
    assert counts == {"train": 8, "val": 6, "test": 6}, f"the new images go where the class lacks: {dict(counts)}"


def test_splits_are_stable_as_the_dataset_grows(tiny_project: ProjectFactory, tmp_path: Path) -> None:
    project = tiny_project()
    source = make_source(tmp_path / "source", per_class=6)
    ingest(project, f"folder:{source}")
    before = {row.sha256: row.split for row in read_manifest(project.manifest_path)}
    (source / "a" / "extra.png").write_bytes(png_bytes(class_image(0, 999)))
    ingest(project, f"folder:{source}")
    after = {row.sha256: row.split for row in read_manifest(project.manifest_path)}
    assert len(after) == len(before) + 1, "the new image is added"
    assert all(after[digest] == split for digest, split in before.items()), "existing images keep their split"


def test_folder_formats_modes_and_extension_case(tiny_project: ProjectFactory, tmp_path: Path) -> None:
    project = tiny_project({"dataset": {"channels": 3}})
    source = tmp_path / "source"

    def grey(variant: int) -> Image.Image:
        return Image.fromarray(class_image(0, variant))

    def rgb(variant: int) -> Image.Image:
        return Image.fromarray(
            np.stack([class_image(1, variant), class_image(2, variant), class_image(0, variant)], -1)
        )

    files = {
        "a/one.PNG": encode(grey(1), "PNG"),
        "a/two.JPG": encode(rgb(2), "JPEG"),
        "a/three.jpeg": encode(rgb(3).resize((20, 12)), "JPEG"),
        "b/four.bmp": encode(rgb(4), "BMP"),
        "b/five.GIF": encode(grey(5).convert("P"), "GIF"),
        "b/six.WebP": encode(rgb(6), "WEBP"),
        "c/seven.png": encode(rgb(7).convert("RGBA"), "PNG"),
        "c/eight.png": encode(rgb(8).convert("P"), "PNG"),
        "c/notes.txt": b"not an image and not an image extension: ignored",
    }
    for relative, data in files.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_bytes(data)
    result = ingest(project, f"folder:{source}")
    rows = read_manifest(project.manifest_path)
    assert result.images == 8, f"eight images in six formats are ingested, got {result.images}"
    assert sorted(path.name for path in project.dataset_dir.iterdir()) == ["images.zip", "manifest.csv"], (
        "the dataset is one pack and its manifest"
    )
    for row in rows:
        data = read_image(project, row.path)
        with Image.open(io.BytesIO(data)) as image:
            assert image.mode == "RGB", f"{row.path} normalised to RGB, got {image.mode}"
            assert image.size == (8, 8), f"{row.path} resized to 8x8, got {image.size}"
        assert hashlib.sha256(data).hexdigest() == row.sha256, f"manifest sha256 matches {row.path}"
        assert len(data) == row.bytes, f"manifest byte count matches {row.path}"


def test_identical_images_are_kept_once(tiny_project: ProjectFactory, tmp_path: Path) -> None:
    project = tiny_project()
    source = make_source(tmp_path / "source", per_class=3)
    (source / "a" / "copy.png").write_bytes((source / "a" / "img0.png").read_bytes())
    result = ingest(project, f"folder:{source}")
    assert result.duplicates_dropped == 1, "the byte-identical copy is dropped"
    digests = [row.sha256 for row in read_manifest(project.manifest_path)]
    assert len(digests) == len(set(digests)), "no sha256 appears twice in the manifest"


def test_same_image_with_two_labels_is_refused(tiny_project: ProjectFactory, tmp_path: Path) -> None:
    project = tiny_project()
    source = make_source(tmp_path / "source", per_class=3)
    (source / "b" / "copy.png").write_bytes((source / "a" / "img0.png").read_bytes())
    with pytest.raises(IngestError, match=r"copy\.png.*labelled 'b' instead of 'a'"):
        ingest(project, f"folder:{source}")


def png_with_declared_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR header declares ``width`` x ``height`` but whose data is tiny."""
    valid = png_bytes(np.zeros((1, 1), dtype=np.uint8))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    return valid[:8] + ihdr + valid[8 + 25 :]


BAD_FILES: dict[str, tuple[bytes | None, str]] = {
    "truncated": (None, r"a/bad\.png: not a readable image"),
    "text_with_image_extension": (b"hello, I am a text file\n", r"a/bad\.png: not a readable image"),
    "decompression_bomb": (png_with_declared_size(50_000, 50_000), r"a/bad\.png: .*decompression bomb"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_image_is_refused_and_data_untouched(tiny_project: ProjectFactory, tmp_path: Path, case: str) -> None:
    project = tiny_project()
    ingest(project, f"folder:{make_source(tmp_path / 'good')}")
    before = tree_digest(project.data_dir)
    source = make_source(tmp_path / "source")
    data, message = BAD_FILES[case]
    if data is None:
        whole = encode(Image.fromarray(class_image(0, 50, size=64)), "PNG")
        data = whole[: len(whole) // 2]
    (source / "a" / "bad.png").write_bytes(data)
    with pytest.raises(IngestError, match=message):
        ingest(project, f"folder:{source}")
    assert_data_untouched(project, before)


def test_unreadable_file_is_refused(tiny_project: ProjectFactory, tmp_path: Path) -> None:
    project = tiny_project()
    source = make_source(tmp_path / "source")
    target = source / "a" / "locked.png"
    target.write_bytes(png_bytes(class_image(0, 77)))
    if os.geteuid() == 0:
        # root reads any file whatever its mode: a dangling link is unreadable for everyone.
        target.unlink()
        target.symlink_to(tmp_path / "missing.png")
    else:
        target.chmod(0)
    with pytest.raises(IngestError, match=r"locked\.png: cannot read file"):
        ingest(project, f"folder:{source}")
    assert not project.data_dir.exists(), "nothing is written under data/"


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", r"source folder does not exist"),
        ("empty", r"folder is empty"),
        ("class_without_images", r"/b: class folder holds no images"),
        ("label_outside_classes", r"/zebra: label 'zebra' is not in dataset.classes"),
    ],
)
def test_bad_folder_layout_is_refused(tiny_project: ProjectFactory, tmp_path: Path, layout: str, message: str) -> None:
    project = tiny_project()
    source = tmp_path / "source"
    if layout == "empty":
        source.mkdir()
    elif layout == "class_without_images":
        make_source(source)
        for path in (source / "b").iterdir():
            path.unlink()
        (source / "b" / "readme.txt").write_text("no images here")
    elif layout == "label_outside_classes":
        make_source(source)
        (source / "zebra").mkdir()
        (source / "zebra" / "z.png").write_bytes(png_bytes(class_image(2, 3)))
    with pytest.raises(IngestError, match=message):
        ingest(project, f"folder:{source}")
    assert not project.data_dir.exists(), "nothing is written under data/"


def test_unknown_source_is_refused(tiny_project: ProjectFactory) -> None:
    with pytest.raises(IngestError, match=r"ingest.source: unknown source 'ftp://x'"):
        ingest(tiny_project(), "ftp://x")


def upload_folder(bucket: str, prefix: str, folder: Path) -> None:
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(
                Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes()
            )


def test_s3_source_matches_folder_source(tiny_project: ProjectFactory, tmp_path: Path, s3_endpoint: str) -> None:
    source = make_source(tmp_path / "source")
    upload_folder("images", "incoming/v1", source)
    from_s3 = tiny_project()
    ingest(from_s3, "s3://images/incoming/v1")
    s3_tree = tree_digest(from_s3.dataset_dir)
    ingest(from_s3, f"folder:{source}")
    assert tree_digest(from_s3.dataset_dir) == s3_tree, "S3 and folder sources of the same images agree byte for byte"


def test_s3_key_with_dot_dot_is_refused(tiny_project: ProjectFactory, tmp_path: Path, s3_endpoint: str) -> None:
    import boto3

    upload_folder("images", "incoming", make_source(tmp_path / "source"))
    boto3.client("s3").put_object(Bucket="images", Key="incoming/a/../../escape.png", Body=b"x")
    project = tiny_project()
    with pytest.raises(IngestError, match=r"escape\.png: key contains '\.\.'"):
        ingest(project, "s3://images/incoming")
    assert not project.data_dir.exists(), "nothing is written under data/"


# ------------------------------------------------------------------------ a full disk, a kill


def disk_fills_after(count: int) -> Callable[[PackWriter, str, bytes], None]:
    """A ``PackWriter.add`` that fails like a full disk once ``count`` images are written to the staged pack."""
    real = PackWriter.add
    written = [0]

    def add(self: PackWriter, name: str, data: bytes) -> None:
        written[0] += 1
        if written[0] > count:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.spool_path))
        real(self, name, data)

    return add


def test_full_disk_during_ingest_keeps_the_data_and_no_staging(
    tiny_project: ProjectFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tiny_project()
    ingest(project, f"folder:{make_source(tmp_path / 'good')}")
    before = protected_state(project)
    source = make_source(tmp_path / "new", per_class=9)
    monkeypatch.setattr(PackWriter, "add", disk_fills_after(5))
    capsys.readouterr()
    status = main(["--params", str(project.params_path), "ingest", "--source", f"folder:{source}"])
    stderr = capsys.readouterr().err
    assert status == 1, f"a full disk fails the command with status 1: {stderr}"
    assert stderr.startswith(f"error: {project.staging_dir}"), f"the message names the staged file: {stderr}"
    assert "No space left on device" in stderr, f"the message says the disk is full: {stderr}"
    assert "data/ is unchanged" in stderr, f"the message says the data was kept: {stderr}"
    assert protected_state(project) == before, "data/ is byte-identical to before"
    assert staging_leftovers(project) == [], f"no staging folder is left: {staging_leftovers(project)}"


def test_killed_ingest_leaves_the_data_and_the_next_run_clears_its_staging(
    tiny_project: ProjectFactory, tmp_path: Path
) -> None:
    project = tiny_project()
    ingest(project, f"folder:{make_source(tmp_path / 'good')}")
    before = protected_state(project)
    killed = run_mlops_killed(project, "ingest", "--source", f"folder:{make_source(tmp_path / 'new')}", after_writes=4)
    assert killed.returncode == -signal.SIGKILL, f"the run was killed mid-way: {killed.returncode} {killed.stderr}"
    assert protected_state(project) == before, "a kill while staging leaves data/ byte-identical"
    stale = staging_leftovers(project)
    assert stale, "the killed run left its staging folder (removed by the next run)"
    assert all(str(project.staging_dir) in path for path in stale), f"staging happens outside data/: {stale}"

    result = ingest(project, f"folder:{tmp_path / 'good'}")
    assert result.images == 18, "the next run works"
    assert staging_leftovers(project) == [], (
        f"the next run removed the dead run's staging: {staging_leftovers(project)}"
    )


def test_ingest_killed_while_publishing_is_finished_by_the_next_run(
    tiny_project: ProjectFactory, tmp_path: Path
) -> None:
    project = tiny_project()
    ingest(project, f"folder:{make_source(tmp_path / 'good')}")
    new_source = make_source(tmp_path / "new", per_class=8)
    # Killed right after the old dataset was moved aside, before the new one was moved in.
    killed = run_mlops_killed(project, "ingest", "--source", f"folder:{new_source}", after_replace_to="/old/dataset")
    assert killed.returncode == -signal.SIGKILL, f"the run was killed while publishing: {killed.stderr}"
    assert not project.dataset_dir.exists(), "the kill fell between the two renames of the publication"

    status = main(["--params", str(project.params_path), "augment"])
    assert status == 0, "the next run (any step on the dataset) works"
    assert staging_leftovers(project) == [], f"and leaves no staging folder: {staging_leftovers(project)}"
    problems = manifest_matches_files(project.dataset_dir, project.manifest_path)
    assert problems == [], f"the finished publication is complete and consistent: {problems}"
    expected = tiny_project_copy(tmp_path / "expected", project)
    ingest(expected, f"folder:{new_source}")
    published = {row.sha256 for row in read_manifest(project.manifest_path)}
    assert published == {row.sha256 for row in read_manifest(expected.manifest_path)}, (
        "the dataset is the one the killed run had staged completely"
    )


def tiny_project_copy(root: Path, project: Project) -> Project:
    """A fresh project with the same params.yaml as ``project``."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_bytes(project.params_path.read_bytes())
    return Project.load(root / "params.yaml")
