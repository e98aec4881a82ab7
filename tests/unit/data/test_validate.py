"""Tests of the Great Expectations data validation step (pipelines/data/validate.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.manifest import ManifestRow, read_manifest, write_manifest
from pipelines.data.profile import (
    PROFILE_NAME,
    ClassProfile,
    compute_profile,
    measure_image,
    read_profile,
    write_profile,
)
from pipelines.data.validate import MAX_LISTED, ValidationReport, format_report, validate_dataset
from pipelines.errors import DataValidationError, PipelineError
from pipelines.project import Project
from tests.support import class_image, make_source, png_bytes, write_params, write_tiny_dataset

ProjectFactory = Callable[..., Project]

DECODES = "expect_column_values_to_be_in_set (column decodes)"


@pytest.fixture(scope="module")
def valid_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Project, ValidationReport]:
    """One passing validation of a tiny dataset, shared by the read-only tests of this module."""
    root = tmp_path_factory.mktemp("valid") / "project"
    root.mkdir()
    project = Project.load(write_params(root))
    write_tiny_dataset(project, per_class_per_split=2)
    return project, validate_dataset(project)


def failure_message(project: Project) -> str:
    """Run validation, which must fail, and return the error message."""
    with pytest.raises(DataValidationError) as caught:
        validate_dataset(project)
    return str(caught.value)


def replace_image(project: Project, rows: list[ManifestRow], index: int, pixels: np.ndarray) -> str:
    """Overwrite row ``index``'s file with ``pixels`` and keep the manifest consistent (sha, size)."""
    data = png_bytes(pixels)
    row = rows[index]
    (project.dataset_dir / row.path).write_bytes(data)
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows[index] = replace(
        row,
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        width=width,
        height=height,
        channels=channels,
    )
    write_manifest(project.manifest_path, rows)
    return row.path


# --- passing dataset -------------------------------------------------------------------------------


def test_valid_dataset_passes_and_writes_data_docs(valid_run: tuple[Project, ValidationReport]) -> None:
    project, report = valid_run
    expected_dir = project.path(project.config.validation.report_dir)
    assert report.success, f"a valid dataset must pass: {report}"
    assert report.images == 18, f"3 classes x 3 splits x 2 images, got {report.images}"
    assert report.evaluated >= 10, f"the suite should evaluate every expectation, got {report.evaluated}"
    assert report.report_path == expected_dir / "index.html", f"Data Docs index at {report.report_path}"
    assert report.report_path.is_file(), f"Data Docs index.html not written at {report.report_path}"
    pages = list((expected_dir / "validations").rglob("*.html"))
    assert len(pages) == 3, f"one validation page per table (images, split_counts, classes), got {pages}"
    assert not report.drift_checked, "drift must be skipped without a reference profile"


def test_valid_dataset_writes_profile(valid_run: tuple[Project, ValidationReport]) -> None:
    project, report = valid_run
    assert report.profile_path == project.dataset_dir / PROFILE_NAME, f"profile at {report.profile_path}"
    document = json.loads(report.profile_path.read_text(encoding="utf-8"))
    assert sorted(document["classes"]) == ["a", "b", "c"], f"one entry per class: {document}"
    for label, stats in document["classes"].items():
        assert stats["count"] == 6, f"class {label}: 6 images expected, got {stats['count']}"
        assert 0.0 < stats["mean"] < 1.0, f"class {label}: mean must be in (0, 1), got {stats['mean']}"
        assert 0.0 < stats["std"] < 0.5, f"class {label}: std must be in (0, 0.5), got {stats['std']}"
        assert stats["mean"] == round(stats["mean"], 6), f"class {label}: mean must be rounded to 6 places"


def test_only_data_goes_under_data_dir(valid_run: tuple[Project, ValidationReport]) -> None:
    project, _ = valid_run
    written = {
        path.relative_to(project.data_dir).as_posix()
        for path in project.data_dir.rglob("*")
        if path.is_file() and not path.name.endswith(".png")
    }
    assert written == {"tiny/manifest.csv", "tiny/profile.json"}, f"unexpected files under data/: {written}"
    stray = [path for path in project.root.iterdir() if path.name in {"gx", "great_expectations"}]
    assert not stray, f"no GX project folder may be created in the project root: {stray}"


def test_format_report_says_drift_was_skipped(valid_run: tuple[Project, ValidationReport]) -> None:
    _, report = valid_run
    text = format_report(report)
    assert "passed" in text, f"the summary must say the validation passed:\n{text}"
    assert "drift: not checked" in text, f"the summary must say drift was skipped:\n{text}"
    assert str(report.report_path) in text, f"the summary must give the Data Docs path:\n{text}"


def test_profile_is_deterministic(valid_run: tuple[Project, ValidationReport], tmp_path: Path) -> None:
    project, report = valid_run
    limits = project.config.ingest
    rows = read_manifest(project.manifest_path)
    images = [measure_image(project.dataset_dir, row, limits.max_image_pixels, limits.max_file_bytes) for row in rows]
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    write_profile(first, compute_profile(images))
    write_profile(second, compute_profile(reversed(images)))
    assert first.read_bytes() == second.read_bytes(), "the profile must not depend on row order"
    assert first.read_bytes() == report.profile_path.read_bytes(), "helpers must reproduce validate's profile"
    assert read_profile(first) == {
        label: ClassProfile(mean=round(stats.mean, 6), std=round(stats.std, 6), count=stats.count)
        for label, stats in compute_profile(images).items()
    }, "read_profile must read back what write_profile wrote"


def test_drift_check_passes_against_matching_reference(
    valid_run: tuple[Project, ValidationReport], tmp_path: Path
) -> None:
    source, report = valid_run
    shutil.copytree(source.root, tmp_path / "project")
    project = Project.load(tmp_path / "project" / "params.yaml")
    reference = project.path(project.config.validation.reference_profile)
    reference.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(report.profile_path, reference)

    checked = validate_dataset(project)
    assert checked.drift_checked, "drift must be checked when the reference profile exists"
    assert checked.evaluated == report.evaluated + 2, "mean and std drift expectations must be added"
    assert "drift: checked" in format_report(checked), "the summary must say drift was checked"


# --- failure modes ---------------------------------------------------------------------------------


def test_corrupt_image_fails(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    rows = write_tiny_dataset(project, per_class_per_split=1)
    broken = rows[4].path
    (project.dataset_dir / broken).write_bytes(np.random.default_rng(0).bytes(200))
    message = failure_message(project)
    assert DECODES in message, f"the decode expectation must be named:\n{message}"
    assert f"      {broken} (" in message, f"the corrupt file must be listed:\n{message}"
    assert "1 of 9 rows failed" in message, f"the count of failed rows must be given:\n{message}"
    report = project.path(project.config.validation.report_dir) / "index.html"
    assert f"Data Docs: {report}" in message, f"the report path must be given:\n{message}"
    assert report.is_file(), f"Data Docs must be written on failure too: {report}"
    assert not (project.dataset_dir / PROFILE_NAME).exists(), "no profile may be written on failure"


def test_text_file_with_png_extension_fails(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    rows = write_tiny_dataset(project, per_class_per_split=1)
    fake = rows[0].path
    (project.dataset_dir / fake).write_text("this is not an image\n", encoding="utf-8")
    message = failure_message(project)
    assert DECODES in message, f"the decode expectation must be named:\n{message}"
    assert f"{fake} (not a recognised image format)" in message, f"the text file must be listed:\n{message}"


def test_missing_image_file_fails(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    rows = write_tiny_dataset(project, per_class_per_split=1)
    (project.dataset_dir / rows[2].path).unlink()
    message = failure_message(project)
    assert f"{rows[2].path} (file not found)" in message, f"the missing file must be listed:\n{message}"


def test_label_outside_classes_fails(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    rows = write_tiny_dataset(project, per_class_per_split=2)
    rows[0] = replace(rows[0], label="zebra")
    write_manifest(project.manifest_path, rows)
    message = failure_message(project)
    assert "expect_column_values_to_be_in_set (column label)" in message, f"label check missing:\n{message}"
    assert f"{rows[0].path} (label=zebra)" in message, f"the mislabelled file must be listed:\n{message}"


def test_too_few_images_in_a_split_fails(tiny_project: ProjectFactory) -> None:
    project = tiny_project({"validate": {"min_images_per_class_per_split": 2}})
    rows = write_tiny_dataset(project, per_class_per_split=2)
    dropped = next(row for row in rows if row.label == "b" and row.split == "val")
    write_manifest(project.manifest_path, [row for row in rows if row != dropped])
    message = failure_message(project)
    assert "split_counts: expect_column_values_to_be_between (column images)" in message, (
        f"the per-split minimum must be named:\n{message}"
    )
    assert "label=b split=val (images=1)" in message, f"the short class/split must be listed:\n{message}"
    assert "1 of 9 rows failed" in message, f"only b/val is short:\n{message}"


def test_missing_class_split_combination_counts_as_zero(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    rows = write_tiny_dataset(project, per_class_per_split=2)
    write_manifest(project.manifest_path, [row for row in rows if not (row.label == "c" and row.split == "test")])
    message = failure_message(project)
    assert "label=c split=test (images=0)" in message, f"an absent combination must count as 0:\n{message}"


def test_wrong_size_fails(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    rows = write_tiny_dataset(project, per_class_per_split=1)
    wrong = replace_image(project, rows, 3, np.full((8, 9), 100, dtype=np.uint8))
    message = failure_message(project)
    assert "expect_column_values_to_be_in_set (column width)" in message, f"width check missing:\n{message}"
    assert f"{wrong} (width=9)" in message, f"the wrong-size file must be listed:\n{message}"
    assert "(column height)" not in message, f"the height is right and must not fail:\n{message}"


def test_wrong_channels_fails(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    rows = write_tiny_dataset(project, per_class_per_split=1)
    wrong = replace_image(project, rows, 5, np.full((8, 8, 3), 100, dtype=np.uint8))
    message = failure_message(project)
    assert "expect_column_values_to_be_in_set (column channels)" in message, f"channels missing:\n{message}"
    assert f"{wrong} (channels=3)" in message, f"the RGB file must be listed:\n{message}"


def test_duplicate_image_across_splits_fails(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    rows = write_tiny_dataset(project, per_class_per_split=2)
    original = next(row for row in rows if row.split == "train")
    copy = replace(original, path=f"images/{original.label}/copy-in-test.png", split="test")
    shutil.copyfile(project.dataset_dir / original.path, project.dataset_dir / copy.path)
    write_manifest(project.manifest_path, [*rows, copy])
    message = failure_message(project)
    assert "expect_column_values_to_be_unique (column sha256)" in message, f"uniqueness missing:\n{message}"
    assert f"      {original.path} (" in message, f"the original must be listed:\n{message}"
    assert f"      {copy.path} (" in message, f"the duplicate must be listed:\n{message}"
    assert "2 of 19 rows failed" in message, f"both copies count as failures:\n{message}"


def test_class_imbalance_fails(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    rows = write_tiny_dataset(project, per_class_per_split=4)
    kept: list[ManifestRow] = []
    for row in rows:
        if row.label != "b" or sum(1 for k in kept if k.label == "b" and k.split == row.split) < 1:
            kept.append(row)
    write_manifest(project.manifest_path, kept)
    message = failure_message(project)
    assert "classes: expect_column_values_to_be_between (column imbalance_ratio)" in message, (
        f"the imbalance expectation must be named:\n{message}"
    )
    assert "      b (imbalance_ratio=4)" in message, f"class b (3 vs 12 images) must be listed:\n{message}"


def test_drift_against_reference_fails(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    write_tiny_dataset(project, per_class_per_split=1)
    reference = project.path(project.config.validation.reference_profile)
    far = {label: ClassProfile(mean=0.9, std=0.01, count=3) for label in project.config.dataset.classes}
    write_profile(reference, far)
    message = failure_message(project)
    assert "(column mean_drift): 3 of 3 rows failed" in message, f"mean drift must fail:\n{message}"
    assert "(column std_drift): 3 of 3 rows failed" in message, f"std drift must fail:\n{message}"
    assert "      a (mean_drift=" in message, f"the drifting class must be listed:\n{message}"


def test_decompression_bomb_is_refused_and_listing_is_capped(tiny_project: ProjectFactory) -> None:
    project = tiny_project({"ingest": {"max_image_pixels": 32}})
    write_tiny_dataset(project, per_class_per_split=2)
    message = failure_message(project)
    assert "18 of 18 rows failed" in message, f"every 8x8 image is over 32 pixels:\n{message}"
    assert "declares 8x8 pixels, over ingest.max_image_pixels=32" in message, f"reason missing:\n{message}"
    assert f"... and {18 - MAX_LISTED} more" in message, f"the file listing must be capped:\n{message}"


def test_empty_manifest_fails(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    project.dataset_dir.mkdir(parents=True)
    write_manifest(project.manifest_path, [])
    message = failure_message(project)
    assert "images: expect_table_row_count_to_be_between: observed 0, expected min_value=1" in message, (
        f"emptiness:\n{message}"
    )


# --- configuration and helper errors ---------------------------------------------------------------


def test_missing_manifest_names_the_file(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    with pytest.raises(PipelineError, match="manifest not found") as caught:
        validate_dataset(project)
    assert str(project.manifest_path) in str(caught.value), f"the manifest path must be named: {caught.value}"


def test_report_dir_inside_data_is_refused(tiny_project: ProjectFactory) -> None:
    project = tiny_project({"validate": {"report_dir": "data/reports"}})
    write_tiny_dataset(project, per_class_per_split=1)
    with pytest.raises(PipelineError, match="report_dir") as caught:
        validate_dataset(project)
    assert "DVC" in str(caught.value), f"the message must say why: {caught.value}"


def test_malformed_reference_profile_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "reference.json"
    path.write_text('{"classes": {"a": {"mean": "high"}}}', encoding="utf-8")
    with pytest.raises(PipelineError, match="class 'a'") as caught:
        read_profile(path)
    assert str(path) in str(caught.value), f"the profile path must be named: {caught.value}"


def test_measure_image_statistics_and_refusals(tmp_path: Path) -> None:
    pixels = class_image(1, 0)
    data = png_bytes(pixels)
    (tmp_path / "image.png").write_bytes(data)
    row = ManifestRow("image.png", "a", "train", 8, 8, 1, len(data), hashlib.sha256(data).hexdigest())
    measured = measure_image(tmp_path, row, 1_000, 1_000_000)
    expected = pixels.astype(np.float64) / 255.0
    assert measured.decodes, f"a good image must decode: {measured}"
    assert measured.sha256_matches, f"the manifest sha256 must match: {measured}"
    assert (measured.height, measured.width, measured.channels) == (8, 8, 1), f"shape: {measured}"
    assert measured.mean == pytest.approx(expected.mean()), f"mean of pixels/255: {measured.mean}"
    assert measured.std == pytest.approx(expected.std()), f"std of pixels/255: {measured.std}"

    missing = measure_image(tmp_path, replace(row, path="absent.png"), 1_000, 1_000_000)
    assert missing.error == "file not found", f"a missing file must be reported: {missing}"
    escaping = measure_image(tmp_path / "sub", replace(row, path="../image.png"), 1_000, 1_000_000)
    assert escaping.error == "path leaves the dataset folder", f"path traversal must be refused: {escaping}"
    too_big = measure_image(tmp_path, row, 1_000, 10)
    assert not too_big.decodes, f"a file over the size limit must not decode: {too_big}"
    assert "max_file_bytes" in too_big.error, f"the size limit must be named: {too_big}"


def test_forty_clean_images_per_class_pass_the_default_expectations(tmp_path: Path) -> None:
    from pipelines.data.ingest import ingest

    classes = ("a", "b", "c")
    source = make_source(tmp_path / "source", classes=classes, per_class=40)
    (tmp_path / "project").mkdir()
    project = Project.load(write_params(tmp_path / "project", {"validate": {"min_images_per_class_per_split": 5}}))
    ingest(project, f"folder:{source}")
    report = validate_dataset(project)
    assert report.success, "a clean folder of 40 images per class validates with the default per-split minimum"


def test_too_small_class_is_refused_with_the_size_it_needs(tmp_path: Path) -> None:
    from pipelines.data.ingest import ingest

    source = make_source(tmp_path / "source", per_class=20)
    (tmp_path / "project").mkdir()
    project = Project.load(write_params(tmp_path / "project", {"validate": {"min_images_per_class_per_split": 5}}))
    ingest(project, f"folder:{source}")
    with pytest.raises(DataValidationError, match=r"each class needs at least 32 images"):
        validate_dataset(project)


# --- the packed layout -----------------------------------------------------------------------------


def test_packed_dataset_passes_and_measures_as_the_loose_one(
    valid_run: tuple[Project, ValidationReport], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.data import parallel

    _, loose_report = valid_run
    (tmp_path / "packed").mkdir()
    project = Project.load(write_params(tmp_path / "packed"))
    write_tiny_dataset(project, per_class_per_split=2, packed=True)
    report = validate_dataset(project)
    assert report.success, f"a packed dataset validates: {report}"
    written = sorted(path.name for path in project.dataset_dir.iterdir())
    assert written == ["images.zip", "manifest.csv", "profile.json"], f"a pack, its manifest, the profile: {written}"
    assert report.profile_path.read_bytes() == loose_report.profile_path.read_bytes(), "same images, same profile"

    monkeypatch.setattr(parallel, "PARALLEL_MIN_ITEMS", 0)  # worker processes even for 18 images
    monkeypatch.setattr(parallel, "worker_count", lambda: 2)
    again = validate_dataset(project)
    assert again.success, "measured in two worker processes, the dataset still passes"
    assert again.profile_path.read_bytes() == loose_report.profile_path.read_bytes(), "and gives the same profile"


def test_truncated_pack_is_named_in_the_failure(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    write_tiny_dataset(project, per_class_per_split=1, packed=True)
    pack = project.dataset_dir / "images.zip"
    data = pack.read_bytes()
    pack.write_bytes(data[: len(data) - 40])
    message = failure_message(project)
    assert f"  {pack}: not a readable pack, truncated or corrupt" in message, f"the pack is named first:\n{message}"
    assert "9 of 9 rows failed" in message, f"no image of the pack can be read:\n{message}"
    assert f"({pack}: not a readable pack" in message, f"each listed image gives the pack as the reason:\n{message}"
    assert not (project.dataset_dir / PROFILE_NAME).exists(), "no profile may be written on failure"


def test_pack_member_with_dot_dot_is_refused_by_name(tiny_project: ProjectFactory) -> None:
    import zipfile

    project = tiny_project()
    write_tiny_dataset(project, per_class_per_split=1, packed=True)
    with zipfile.ZipFile(project.dataset_dir / "images.zip", "a") as archive:
        archive.writestr("../../escape.png", b"x")
    message = failure_message(project)
    assert "member '../../escape.png' holds '..'; the pack is refused" in message, f"refused by name:\n{message}"
    assert "9 of 9 rows failed" in message, f"nothing of a refused pack is read:\n{message}"
    assert not (project.root / "escape.png").exists(), "nothing is extracted"


def test_pack_member_over_the_size_limit_is_refused_before_reading(tiny_project: ProjectFactory) -> None:
    project = tiny_project({"ingest": {"max_file_bytes": 100}})
    rows = write_tiny_dataset(project, per_class_per_split=1, packed=True)
    large = [row for row in rows if row.bytes > 100]
    assert large, f"some images are over 100 bytes: {[row.bytes for row in rows]}"
    message = failure_message(project)
    expected = f"{large[0].path} (member of {project.dataset_dir / 'images.zip'} is {large[0].bytes} bytes, over"
    assert expected in message, f"the declared size is refused, the pack named:\n{message}"
    assert f"{len(large)} of 9 rows failed" in message, f"every image over the limit fails:\n{message}"
