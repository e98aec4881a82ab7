"""Hostile image sources: special files, links leaving the folder, oversized reads, decoders off the allowlist.

Each test builds the hostile input itself, runs ``mlops ingest`` (in a fresh process, with a timeout, when a
regression could block or exhaust memory), and checks the exit status, that the message names the problem
and the file, and that the versioned data, ``data.dvc``, the version log and the registry are unchanged.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from pipelines.cli import main
from pipelines.data.images import RawImage, normalise_image, to_channels
from pipelines.data.ingest import ingest
from pipelines.data.manifest import read_manifest
from pipelines.data.sources import read_bounded, read_regular_file
from pipelines.errors import IngestError
from pipelines.project import Project
from tests.support import class_image, make_source, png_bytes, protected_state, run_mlops, staging_leftovers

ProjectFactory = Callable[..., Project]


@pytest.fixture
def ingested(tiny_project: ProjectFactory, tmp_path: Path) -> Callable[..., Project]:
    """Factory: a project that already holds a good dataset, a data.dvc and a version log."""

    def factory(overrides: dict[str, dict[str, Any]] | None = None) -> Project:
        project = tiny_project(overrides)
        ingest(project, f"folder:{make_source(tmp_path / 'good')}")
        (project.root / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data\n")
        log = project.path(project.config.version.log)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text('{"version": "0123456789abcdef0123456789abcdef"}\n', encoding="utf-8")
        return project

    return factory


def assert_refused(project: Project, before: dict[str, str], status: int, stderr: str, *expected: str) -> None:
    """The command failed with ``error: ...`` naming every ``expected`` text, and nothing changed."""
    assert status == 1, f"the command should exit 1, got {status}: {stderr}"
    assert stderr.startswith("error: "), f"the message is a one-line error, not a traceback: {stderr}"
    assert "Traceback" not in stderr, f"no traceback is printed: {stderr}"
    for text in expected:
        assert text in stderr, f"the message should name {text!r}: {stderr}"
    assert protected_state(project) == before, "data/, data.dvc, the version log and the registry are unchanged"
    assert staging_leftovers(project) == [], f"no staging folder is left: {staging_leftovers(project)}"


def cli_ingest(project: Project, source: Path | str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``mlops ingest --source ...`` in this process: (exit status, stderr)."""
    capsys.readouterr()
    status = main(["--params", str(project.params_path), "ingest", "--source", f"folder:{source}"])
    return status, capsys.readouterr().err


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------- special files


def test_fifo_named_png_is_refused_without_being_opened(ingested: ProjectFactory, tmp_path: Path) -> None:
    project = ingested()
    before = protected_state(project)
    source = make_source(tmp_path / "source")
    os.mkfifo(source / "a" / "x.png")
    # A fresh process with a timeout: a regression blocks on the FIFO and fails here instead of hanging.
    run = run_mlops(project, "ingest", "--source", f"folder:{source}", timeout=60)
    assert_refused(project, before, run.returncode, run.stderr, "a/x.png", "FIFO", "not a regular file")


def test_link_to_dev_zero_named_png_is_refused_without_being_read(ingested: ProjectFactory, tmp_path: Path) -> None:
    project = ingested()
    before = protected_state(project)
    source = make_source(tmp_path / "source")
    (source / "b" / "y.png").symlink_to("/dev/zero")
    run = run_mlops(project, "ingest", "--source", f"folder:{source}", timeout=60)
    assert_refused(project, before, run.returncode, run.stderr, "b/y.png", "character device")


def test_socket_named_png_is_refused(
    ingested: ProjectFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    project = ingested()
    before = protected_state(project)
    source = make_source(tmp_path / "source")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(source / "c" / "s.png"))
        status, stderr = cli_ingest(project, source, capsys)
    assert_refused(project, before, status, stderr, "c/s.png", "socket")


# -------------------------------------------------------------------------------------------- links


def test_link_to_a_file_outside_the_folder_is_refused(
    ingested: ProjectFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = ingested()
    before = protected_state(project)
    outside = tmp_path / "elsewhere" / "secret.png"
    outside.parent.mkdir()
    outside.write_bytes(png_bytes(class_image(0, 400)))
    source = make_source(tmp_path / "source")
    (source / "a" / "leak.png").symlink_to(outside)
    status, stderr = cli_ingest(project, source, capsys)
    assert_refused(project, before, status, stderr, "a/leak.png", "outside the source folder")


def test_linked_class_folder_pointing_outside_is_refused(
    ingested: ProjectFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = ingested()
    before = protected_state(project)
    elsewhere = make_source(tmp_path / "elsewhere", classes=("c",))
    source = make_source(tmp_path / "source", classes=("a", "b"))
    (source / "c").symlink_to(elsewhere / "c")
    status, stderr = cli_ingest(project, source, capsys)
    assert_refused(project, before, status, stderr, f"{source / 'c'}:", "outside the source folder")


def test_class_entry_that_is_a_link_to_a_file_outside_is_refused(
    ingested: ProjectFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = ingested()
    before = protected_state(project)
    source = make_source(tmp_path / "source")
    (source / "notes").symlink_to("/etc/hostname")
    status, stderr = cli_ingest(project, source, capsys)
    assert_refused(project, before, status, stderr, f"{source / 'notes'}:", "outside the source folder")


def test_links_that_stay_inside_the_folder_are_followed(tiny_project: ProjectFactory, tmp_path: Path) -> None:
    project = tiny_project()
    source = make_source(tmp_path / "source", classes=("a", "b"))
    store = source / ".store"
    store.mkdir()
    (store / "shared.png").write_bytes(png_bytes(class_image(0, 500)))
    (source / "a" / "linked.png").symlink_to("../.store/shared.png")
    hidden_class = make_source(source / ".c-images", classes=("a", "b", "c"))
    (source / "c").symlink_to(hidden_class / "c")
    (source / "a" / "loop").symlink_to("..")  # a link back up: read once, never followed twice
    result = ingest(project, f"folder:{source}")
    labels = sorted(row.label for row in read_manifest(project.manifest_path))
    assert result.images == 6 + 7 + 6, f"a: 6 images + the linked one, b: 6, c (linked folder): 6; got {result.images}"
    assert labels.count("c") == 6, "the class folder linked inside the source folder is read"
    assert labels.count("a") == 7, "the file linked inside the source folder is read once, the loop is not followed"


# ----------------------------------------------------------------------------------- bounded reads


def test_read_is_bounded_whatever_stat_says(tmp_path: Path) -> None:
    limit = 1000
    exact = tmp_path / "exact.png"
    exact.write_bytes(b"x" * limit)
    assert len(read_regular_file(exact, limit)) == limit, "a file of exactly the limit is read whole"
    over = tmp_path / "over.png"
    over.write_bytes(b"x" * (limit + 1))
    with pytest.raises(IngestError, match=r"over\.png: .*over ingest\.max_file_bytes=1000"):
        read_regular_file(over, limit)
    # /proc files report a size of 0 and hold more: only the bounded read can catch them.
    lying = Path("/proc/self/maps")
    assert lying.stat().st_size == 0, "this file's stat says 0 bytes"
    with pytest.raises(IngestError, match=r"/proc/self/maps: holds more than 16 bytes, over ingest\.max_file_bytes"):
        read_regular_file(lying, 16)


def test_bounded_read_stops_an_endless_stream() -> None:
    class Endless:
        served = 0

        def read(self, size: int = -1, /) -> bytes:
            self.served += size
            return b"\0" * size

    stream = Endless()
    with pytest.raises(IngestError, match=r"s3://b/a/k\.png: holds more than 4096 bytes"):
        read_bounded(stream, 4096, "s3://b/a/k.png")
    assert stream.served <= 4097, f"at most limit + 1 bytes are read, {stream.served} were"


def test_s3_object_over_the_limit_is_refused(
    ingested: ProjectFactory, tmp_path: Path, s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import boto3

    project = ingested({"ingest": {"max_file_bytes": 4000}})
    before = protected_state(project)
    client = boto3.client("s3")
    source = make_source(tmp_path / "source")
    for path in sorted(source.rglob("*.png")):
        client.put_object(Bucket="mlops-data", Key=f"in/{path.relative_to(source).as_posix()}", Body=path.read_bytes())
    client.put_object(Bucket="mlops-data", Key="in/b/huge.png", Body=b"\0" * 5000)
    capsys.readouterr()
    status = main(["--params", str(project.params_path), "ingest", "--source", "s3://mlops-data/in"])
    stderr = capsys.readouterr().err
    assert_refused(project, before, status, stderr, "s3://mlops-data/in/b/huge.png", "ingest.max_file_bytes=4000")


# -------------------------------------------------------------------------------- decoder allowlist

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("tiff", "TIFF"), ("eps", "EPS"), ("psd", "PSD")],
)
def test_format_off_the_allowlist_is_refused_whatever_its_name(
    ingested: ProjectFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    fmt: str,
) -> None:
    project = ingested()
    before = protected_state(project)
    source = make_source(tmp_path / "source")
    data = {
        "tiff": encode(Image.fromarray(class_image(0, 600)), "TIFF"),
        "eps": EPS,
        "psd": b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x01" + (8).to_bytes(4, "big") * 2 + b"\x00\x08\x00\x01",
    }[name]
    (source / "a" / "disguised.png").write_bytes(data)
    reached: list[str] = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: reached.append("EPS"))
    status, stderr = cli_ingest(project, source, capsys)
    assert_refused(project, before, status, stderr, "a/disguised.png", fmt, "ingest.image_formats")
    assert reached == [], "the EPS decoder (which would start Ghostscript) is never reached"


def test_listed_extensions_follow_the_allowlist(tiny_project: ProjectFactory, tmp_path: Path) -> None:
    only_png = tiny_project({"ingest": {"image_formats": ["PNG"]}})
    source = make_source(tmp_path / "source")
    (source / "a" / "photo.jpg").write_bytes(encode(Image.fromarray(class_image(0, 700)), "JPEG"))
    (source / "a" / "scan.tif").write_bytes(encode(Image.fromarray(class_image(0, 701)), "TIFF"))
    assert ingest(only_png, f"folder:{source}").images == 18, "with [PNG] only the .png files are listed"

    with_tiff = tiny_project({"ingest": {"image_formats": ["PNG", "TIFF"]}})
    assert ingest(with_tiff, f"folder:{source}").images == 19, "TIFF, when allowed, lists .tif files too"


def rgb(variant: int) -> Image.Image:
    return Image.fromarray(np.stack([class_image(0, variant), class_image(1, variant), class_image(2, variant)], -1))


def palette_with_transparency() -> bytes:
    image = Image.fromarray(class_image(1, 800)).convert("P")
    return encode(image, "PNG", transparency=0)


UNUSUAL_FILES: dict[str, tuple[Callable[[], bytes], str, list[str]]] = {
    # case: (file bytes, the mode Pillow decodes it to, the allowlist it needs)
    "cmyk_jpeg": (lambda: encode(rgb(801).convert("CMYK"), "JPEG"), "CMYK", ["JPEG"]),
    "16_bit_png": (
        lambda: encode(Image.fromarray(class_image(0, 802).astype(np.uint16) * 257), "PNG"),
        "I;16",
        ["PNG"],
    ),
    "palette_with_transparency": (palette_with_transparency, "P", ["PNG"]),
    "grey_alpha_png": (lambda: encode(Image.fromarray(class_image(0, 803)).convert("LA"), "PNG"), "LA", ["PNG"]),
    "one_bit_bmp": (lambda: encode(Image.fromarray(class_image(0, 804)).convert("1"), "BMP"), "1", ["BMP"]),
    "float_tiff": (
        lambda: encode(Image.fromarray(class_image(0, 806).astype(np.float32) / 255.0, mode="F"), "TIFF"),
        "F",
        ["TIFF"],
    ),
    "lab_tiff": (lambda: encode(rgb(807).convert("LAB"), "TIFF"), "LAB", ["TIFF"]),
    "cmyk_tiff": (lambda: encode(rgb(808).convert("CMYK"), "TIFF"), "CMYK", ["TIFF"]),
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("case", sorted(UNUSUAL_FILES))
def test_unusual_colour_modes_are_converted(tiny_project: ProjectFactory, case: str, channels: int) -> None:
    build, mode, formats = UNUSUAL_FILES[case]
    data = build()
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.mode == mode, f"{case}: the test file decodes to mode {mode}, got {decoded.mode}"
    project = tiny_project({"dataset": {"channels": channels}, "ingest": {"image_formats": formats}})
    png = normalise_image(RawImage(f"source/a/{case}", "a", data), project.config)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG", f"{case}: normalised to PNG"
        assert image.mode == ("L" if channels == 1 else "RGB"), f"{case}: converted to {channels} channel(s)"
        assert image.size == (8, 8), f"{case}: resized to the configured size"


@pytest.mark.parametrize("mode", sorted(Image.MODES))
def test_every_pillow_mode_converts_without_a_traceback(mode: str) -> None:
    image = Image.new(mode, (5, 3))
    for channels, expected in ((1, "L"), (3, "RGB")):
        converted = to_channels(image, channels, f"x.png ({mode})")
        assert converted.mode == expected, f"{mode} -> {converted.mode}, expected {expected}"
        assert converted.size == (5, 3), f"{mode}: size kept"


def test_mode_pillow_cannot_convert_is_refused_by_name() -> None:
    class Strange(Image.Image):
        mode = "BGR;24"  # a mode older Pillows decoded and this code does not know

    with pytest.raises(IngestError, match=r"a/odd\.bmp: colour mode 'BGR;24' is not supported"):
        to_channels(Strange(), 1, "a/odd.bmp")
