"""Tests of the seeded augmentation of the train split."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipelines.config import AugmentConfig
from pipelines.data import augment
from pipelines.data.augment import STAGING_DIR_NAME, AugmentResult, augment_dataset, augment_image, copy_rng
from pipelines.data.manifest import ManifestRow, read_manifest, write_manifest
from pipelines.errors import PipelineError
from pipelines.project import Project
from tests.support import png_bytes, write_tiny_dataset

ProjectFactory = Callable[..., Project]

ZERO_STRENGTH: dict[str, Any] = {
    "rotation_degrees": 0.0,
    "shift_fraction": 0.0,
    "zoom_range": 0.0,
    "brightness": 0.0,
    "contrast": 0.0,
    "noise_std": 0.0,
    "horizontal_flip": False,
}


def pixels_of(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).copy()


def output_files(project: Project) -> dict[str, bytes]:
    """Every file under ``augmented/``, keyed by its path relative to the dataset folder."""
    folder = project.dataset_dir / "augmented"
    return {
        path.relative_to(project.dataset_dir).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def sources_by_sha(rows: list[ManifestRow]) -> dict[str, ManifestRow]:
    return {row.sha256: row for row in rows}


def write_rgb_dataset(project: Project, per_class: int = 2) -> list[ManifestRow]:
    """Write RGB train/val images and a manifest for a 3-channel project."""
    rows: list[ManifestRow] = []
    size = project.config.dataset.image_size[0]
    for label_index, label in enumerate(project.config.dataset.classes):
        for split in ("train", "val"):
            for number in range(per_class):
                rng = np.random.default_rng(label_index * 100 + number + (50 if split == "val" else 0))
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                data = png_bytes(pixels)
                digest = hashlib.sha256(data).hexdigest()
                relative = f"images/{label}/{digest[:16]}.png"
                target = project.dataset_dir / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                rows.append(ManifestRow(relative, label, split, size, size, 3, len(data), digest))
    write_manifest(project.manifest_path, rows)
    return rows


def test_only_train_images_get_k_copies_and_manifest_matches_files(tiny_project: ProjectFactory) -> None:
    project = tiny_project({"augment": {"copies": 3}})
    rows = write_tiny_dataset(project)
    train = [row for row in rows if row.split == "train"]

    result = augment_dataset(project)

    assert isinstance(result, AugmentResult), "augment_dataset returns an AugmentResult"
    assert result.source_images == len(train), "every train image is a source, nothing else"
    assert result.images_written == 3 * len(train), "K=3 copies of each train image"
    assert result.output_dir == project.dataset_dir / "augmented", "copies live in <dataset>/augmented"
    assert result.manifest_path == project.augmented_manifest_path, "the augmented manifest path"
    augmented = read_manifest(project.augmented_manifest_path)
    assert len(augmented) == result.images_written, "one manifest row per written image"
    parents = {row.parent_sha256 for row in augmented}
    assert parents == {row.sha256 for row in train}, "parents are exactly the train images"
    by_sha = sources_by_sha(rows)
    for parent in parents:
        copies = sorted(row.path for row in augmented if row.parent_sha256 == parent)
        expected = [f"augmented/{by_sha[parent].label}/{parent[:16]}-{k}.png" for k in range(3)]
        assert copies == expected, f"copies of {parent[:16]} are named <sha[:16]>-<k>.png"
    for row in augmented:
        path = project.dataset_dir / row.path
        data = path.read_bytes()
        source = by_sha[row.parent_sha256]
        assert row.split == "train", f"{row.path}: augmented rows are train rows"
        assert row.label == source.label, f"{row.path}: keeps the label of its source"
        assert row.sha256 == hashlib.sha256(data).hexdigest(), f"{row.path}: sha256 matches the file"
        assert row.bytes == len(data), f"{row.path}: size in bytes matches the file"
        with Image.open(path) as image:
            assert image.size == (row.width, row.height) == (8, 8), f"{row.path}: size kept (8x8)"
            assert image.mode == "L", f"{row.path}: grayscale stays grayscale"
            assert row.channels == 1, f"{row.path}: channels recorded as 1"
    on_disk = set(output_files(project))
    assert on_disk == {row.path for row in augmented}, "files on disk are exactly the manifest rows"
    assert not (project.dataset_dir / STAGING_DIR_NAME).exists(), "no staging folder is left"


def test_default_operations_change_the_images(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    rows = write_tiny_dataset(project, per_class_per_split=1)
    augment_dataset(project)
    by_sha = sources_by_sha(rows)
    for row in read_manifest(project.augmented_manifest_path):
        source = pixels_of(project.dataset_dir / by_sha[row.parent_sha256].path)
        copy = pixels_of(project.dataset_dir / row.path)
        assert not np.array_equal(copy, source), f"{row.path}: default config alters the pixels"


def test_same_seed_gives_byte_identical_output_also_in_a_fresh_copy(
    tiny_project: ProjectFactory, tmp_path: Path
) -> None:
    project = tiny_project()
    write_tiny_dataset(project)
    augment_dataset(project)
    first_files = output_files(project)
    first_manifest = project.augmented_manifest_path.read_bytes()

    augment_dataset(project)
    assert output_files(project) == first_files, "a second run writes byte-identical images"
    assert project.augmented_manifest_path.read_bytes() == first_manifest, "and an identical manifest"

    copy_root = tmp_path / "copy"
    shutil.copytree(project.root, copy_root)
    shutil.rmtree(copy_root / "data" / "tiny" / "augmented")
    (copy_root / "data" / "tiny" / "augmented.csv").unlink()
    fresh = Project.load(copy_root / "params.yaml")
    augment_dataset(fresh)
    assert output_files(fresh) == first_files, "a fresh copy of the project gives byte-identical images"
    assert fresh.augmented_manifest_path.read_bytes() == first_manifest, "and an identical manifest"


def test_different_seed_gives_different_output(tiny_project: ProjectFactory) -> None:
    project = tiny_project({"augment": {"seed": 7}})
    write_tiny_dataset(project)
    augment_dataset(project)
    seed_7 = output_files(project)

    other = tiny_project({"augment": {"seed": 8}})
    augment_dataset(other)
    seed_8 = output_files(other)
    assert set(seed_7) == set(seed_8), "the same file names whatever the seed"
    differing = [name for name in seed_7 if seed_7[name] != seed_8[name]]
    assert len(differing) == len(seed_7), "every copy differs when the seed changes"


def test_copies_do_not_depend_on_order_or_on_other_images(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    rows = write_tiny_dataset(project)
    augment_dataset(project)
    everything = output_files(project)

    # Keep every other train image and move the files so that they are processed in reverse order.
    kept = [row for row in rows if row.split == "train"][::2]
    moved: list[ManifestRow] = []
    for index, row in enumerate(kept):
        relative = f"moved/{len(kept) - index:03d}.png"
        target = project.dataset_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        (project.dataset_dir / row.path).rename(target)
        moved.append(replace(row, path=relative))
    write_manifest(project.manifest_path, moved)
    augment_dataset(project)
    subset = output_files(project)
    assert len(subset) == 2 * len(kept), "only the kept images are augmented"
    for name, data in subset.items():
        assert everything[name] == data, f"{name}: identical whatever the order and the other images"


def test_zero_strength_copies_equal_the_source_pixels(tiny_project: ProjectFactory) -> None:
    project = tiny_project({"augment": ZERO_STRENGTH})
    rows = write_tiny_dataset(project)
    augment_dataset(project)
    by_sha = sources_by_sha(rows)
    augmented = read_manifest(project.augmented_manifest_path)
    assert augmented, "zero-strength augmentation still writes copies"
    for row in augmented:
        source = pixels_of(project.dataset_dir / by_sha[row.parent_sha256].path)
        copy = pixels_of(project.dataset_dir / row.path)
        assert np.array_equal(copy, source), f"{row.path}: zero-strength copy equals its source"


def test_flip_flips_when_enabled(tiny_project: ProjectFactory) -> None:
    project = tiny_project({"augment": {**ZERO_STRENGTH, "horizontal_flip": True, "copies": 8}})
    rows = write_tiny_dataset(project, per_class_per_split=1)
    augment_dataset(project)
    by_sha = sources_by_sha(rows)
    flipped = unchanged = 0
    for row in read_manifest(project.augmented_manifest_path):
        source = pixels_of(project.dataset_dir / by_sha[row.parent_sha256].path)
        copy = pixels_of(project.dataset_dir / row.path)
        if np.array_equal(copy, source[:, ::-1]):
            flipped += 1
        elif np.array_equal(copy, source):
            unchanged += 1
        else:
            pytest.fail(f"{row.path}: with only flip on, a copy is the source or its mirror")
    assert flipped > 0, "some copies are mirrored when horizontal_flip is on"
    assert unchanged > 0, "flip happens with probability 1/2, so some copies are not mirrored"


def test_rgb_images_stay_rgb(tiny_project: ProjectFactory) -> None:
    project = tiny_project({"dataset": {"channels": 3}})
    rows = write_rgb_dataset(project)
    result = augment_dataset(project)
    assert result.images_written == 2 * sum(row.split == "train" for row in rows), "K copies per image"
    for row in read_manifest(project.augmented_manifest_path):
        with Image.open(project.dataset_dir / row.path) as image:
            assert image.mode == "RGB", f"{row.path}: RGB stays RGB"
            assert image.size == (8, 8), f"{row.path}: size kept"
        assert row.channels == 3, f"{row.path}: channels recorded as 3"


def test_augment_image_keeps_size_and_mode_under_strong_geometry() -> None:
    config = AugmentConfig.model_validate(
        {"rotation_degrees": 180.0, "shift_fraction": 0.5, "zoom_range": 0.9, "noise_std": 0.5}
    )
    for mode, shape in (("L", (12, 20)), ("RGB", (12, 20, 3))):
        source = Image.fromarray(np.full(shape, 128, dtype=np.uint8))
        assert source.mode == mode, "test image has the intended mode"
        for copy_index in range(5):
            copy = augment_image(source, config, copy_rng(1, "ab" * 32, copy_index))
            assert copy.mode == mode, f"{mode}: mode kept"
            assert copy.size == (20, 12), f"{mode}: size kept (width 20, height 12)"


def test_copy_rng_is_deterministic_and_distinct() -> None:
    first = copy_rng(3, "cd" * 32, 0).random(4)
    assert np.array_equal(first, copy_rng(3, "cd" * 32, 0).random(4)), "same key, same stream"
    assert not np.array_equal(first, copy_rng(3, "cd" * 32, 1).random(4)), "copy index changes it"
    assert not np.array_equal(first, copy_rng(4, "cd" * 32, 0).random(4)), "seed changes it"
    assert not np.array_equal(first, copy_rng(3, "ce" * 32, 0).random(4)), "source image changes it"


def test_failure_midway_keeps_previous_output(tiny_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tiny_project()
    write_tiny_dataset(project)
    augment_dataset(project)
    before_files = output_files(project)
    before_manifest = project.augmented_manifest_path.read_bytes()

    other = tiny_project({"augment": {"seed": 99}})
    real = augment.augment_image
    calls = {"count": 0}

    def failing(image: Image.Image, config: AugmentConfig, rng: np.random.Generator) -> Image.Image:
        calls["count"] += 1
        if calls["count"] == 3:
            raise RuntimeError("injected failure on the 3rd image")
        return real(image, config, rng)

    monkeypatch.setattr(augment, "augment_image", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        augment_dataset(other)

    assert calls["count"] == 3, "the run stopped at the injected failure"
    assert output_files(project) == before_files, "previous augmented images are untouched"
    assert project.augmented_manifest_path.read_bytes() == before_manifest, "previous manifest untouched"
    leftovers = sorted(path.name for path in project.dataset_dir.iterdir() if path.name.startswith("."))
    assert leftovers == [], f"no staging or backup folder is left behind: {leftovers}"


def test_unreadable_source_image_names_the_file_and_keeps_previous_output(
    tiny_project: ProjectFactory,
) -> None:
    project = tiny_project()
    rows = write_tiny_dataset(project)
    augment_dataset(project)
    before_files = output_files(project)

    broken = next(row for row in rows if row.split == "train")
    broken_path = project.dataset_dir / broken.path
    broken_path.write_bytes(b"not a png")
    broken_row = replace(broken, sha256=hashlib.sha256(b"not a png").hexdigest(), bytes=9)
    fixed = [broken_row if row == broken else row for row in rows]
    write_manifest(project.manifest_path, fixed)
    with pytest.raises(PipelineError, match=broken_path.name) as caught:
        augment_dataset(project)
    assert "cannot decode" in str(caught.value), "the message says the image cannot be decoded"
    assert output_files(project) == before_files, "previous augmented output is untouched"
    assert not (project.dataset_dir / STAGING_DIR_NAME).exists(), "no staging folder is left"


def test_missing_source_image_raises_pipeline_error(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    rows = write_tiny_dataset(project)
    missing = next(row for row in rows if row.split == "train")
    (project.dataset_dir / missing.path).unlink()
    with pytest.raises(PipelineError, match=Path(missing.path).name):
        augment_dataset(project)


def test_changed_source_image_raises_pipeline_error(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    rows = write_tiny_dataset(project)
    changed = next(row for row in rows if row.split == "train")
    target = project.dataset_dir / changed.path
    target.write_bytes(png_bytes(np.zeros((8, 8), dtype=np.uint8)))
    with pytest.raises(PipelineError, match="does not match the manifest"):
        augment_dataset(project)


def test_missing_manifest_raises_pipeline_error(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    with pytest.raises(PipelineError, match="manifest not found"):
        augment_dataset(project)


@pytest.mark.parametrize("overrides", [{"enabled": False}, {"copies": 0}], ids=["disabled", "zero-copies"])
def test_disabled_removes_output_and_writes_empty_manifest(
    tiny_project: ProjectFactory, overrides: dict[str, Any]
) -> None:
    project = tiny_project()
    rows = write_tiny_dataset(project)
    augment_dataset(project)
    assert output_files(project), "a first, enabled run wrote copies"

    off = tiny_project({"augment": overrides})
    result = augment_dataset(off)
    assert result.images_written == 0, "nothing is written when augmentation is off"
    assert result.source_images == sum(row.split == "train" for row in rows), "train images counted"
    assert not result.output_dir.exists(), "the previous augmented folder is removed"
    text = off.augmented_manifest_path.read_text(encoding="utf-8")
    assert text.splitlines() == ["path,label,split,width,height,channels,bytes,sha256,parent_sha256"], (
        "the augmented manifest holds its header only"
    )
    assert read_manifest(off.augmented_manifest_path) == [], "and reads back as no rows"


def test_stale_staging_folder_from_a_crash_is_cleared(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    write_tiny_dataset(project)
    stale = project.dataset_dir / STAGING_DIR_NAME / "augmented" / "a" / "junk.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"junk")
    augment_dataset(project)
    assert not (project.dataset_dir / STAGING_DIR_NAME).exists(), "the stale staging folder is removed"
    assert "augmented/a/junk.png" not in output_files(project), "stale staged files are not published"
