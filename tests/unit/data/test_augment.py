"""Tests of the seeded augmentation of the train split."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.config import AugmentConfig
from pipelines.data import augment
from pipelines.data.augment import AugmentResult, augment_dataset, augment_image, copy_rng
from pipelines.data.manifest import ManifestRow, read_manifest, write_manifest
from pipelines.data.packs import DatasetReader, PackWriter
from pipelines.errors import PipelineError
from pipelines.project import Project
from tests.support import (
    REPO_ROOT,
    image_pixels,
    manifest_matches_files,
    png_bytes,
    protected_state,
    read_image,
    run_mlops_killed,
    staging_leftovers,
    write_params,
    write_tiny_dataset,
)

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


def pixels_of(project: Project, path: str) -> np.ndarray:
    """The pixels of the dataset image at manifest path ``path`` (read from its pack or loose file)."""
    return image_pixels(project, path)


def output_files(project: Project) -> dict[str, bytes]:
    """Every augmented copy, from ``augmented.zip`` (or a loose ``augmented/`` folder), keyed by its path."""
    with DatasetReader(project.dataset_dir) as reader:
        members = reader.members("augmented")
        if members is not None:
            return {name: reader.read(name, 1 << 30) for name in members}
    folder = project.dataset_dir / "augmented"
    return {
        path.relative_to(project.dataset_dir).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def assert_no_staging_left(project: Project) -> None:
    """Nothing staged is left, neither in ``artifacts/staging`` nor as a hidden folder inside ``data/``."""
    left = staging_leftovers(project)
    assert left == [], f"no staging folder is left behind: {left}"


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
    assert result.output_path == project.dataset_dir / "augmented.zip", "copies live in <dataset>/augmented.zip"
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
        data = read_image(project, row.path)
        source = by_sha[row.parent_sha256]
        assert row.split == "train", f"{row.path}: augmented rows are train rows"
        assert row.label == source.label, f"{row.path}: keeps the label of its source"
        assert row.sha256 == hashlib.sha256(data).hexdigest(), f"{row.path}: sha256 matches the file"
        assert row.bytes == len(data), f"{row.path}: size in bytes matches the file"
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (row.width, row.height) == (8, 8), f"{row.path}: size kept (8x8)"
            assert image.mode == "L", f"{row.path}: grayscale stays grayscale"
            assert row.channels == 1, f"{row.path}: channels recorded as 1"
    on_disk = set(output_files(project))
    assert on_disk == {row.path for row in augmented}, "the pack's members are exactly the manifest rows"
    assert not (project.dataset_dir / "augmented").exists(), "no loose copies: the pack holds them"
    assert_no_staging_left(project)


def test_default_operations_change_the_images(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    rows = write_tiny_dataset(project, per_class_per_split=1)
    augment_dataset(project)
    by_sha = sources_by_sha(rows)
    for row in read_manifest(project.augmented_manifest_path):
        source = pixels_of(project, by_sha[row.parent_sha256].path)
        copy = pixels_of(project, row.path)
        assert not np.array_equal(copy, source), f"{row.path}: default config alters the pixels"


def test_same_seed_gives_byte_identical_output_also_in_a_fresh_copy(
    tiny_project: ProjectFactory, tmp_path: Path
) -> None:
    project = tiny_project()
    write_tiny_dataset(project)
    augment_dataset(project)
    first_files = output_files(project)
    first_pack = (project.dataset_dir / "augmented.zip").read_bytes()
    first_manifest = project.augmented_manifest_path.read_bytes()

    augment_dataset(project)
    assert output_files(project) == first_files, "a second run writes byte-identical images"
    assert (project.dataset_dir / "augmented.zip").read_bytes() == first_pack, "in a byte-identical pack"
    assert project.augmented_manifest_path.read_bytes() == first_manifest, "and an identical manifest"

    copy_root = tmp_path / "copy"
    shutil.copytree(project.root, copy_root)
    (copy_root / "data" / "tiny" / "augmented.zip").unlink()
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
        source = pixels_of(project, by_sha[row.parent_sha256].path)
        copy = pixels_of(project, row.path)
        assert np.array_equal(copy, source), f"{row.path}: zero-strength copy equals its source"


def test_flip_flips_when_enabled(tiny_project: ProjectFactory) -> None:
    project = tiny_project({"augment": {**ZERO_STRENGTH, "horizontal_flip": True, "copies": 8}})
    rows = write_tiny_dataset(project, per_class_per_split=1)
    augment_dataset(project)
    by_sha = sources_by_sha(rows)
    flipped = unchanged = 0
    for row in read_manifest(project.augmented_manifest_path):
        source = pixels_of(project, by_sha[row.parent_sha256].path)
        copy = pixels_of(project, row.path)
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
        with Image.open(io.BytesIO(read_image(project, row.path))) as image:
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
    assert_no_staging_left(project)


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
    assert_no_staging_left(project)


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
    assert not result.output_path.exists(), "the previous augmented pack is removed"
    text = off.augmented_manifest_path.read_text(encoding="utf-8")
    assert text.splitlines() == ["path,label,split,width,height,channels,bytes,sha256,parent_sha256"], (
        "the augmented manifest holds its header only"
    )
    assert read_manifest(off.augmented_manifest_path) == [], "and reads back as no rows"


def test_stale_staging_folder_inside_data_from_an_earlier_version_is_cleared(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    write_tiny_dataset(project)
    stale = project.dataset_dir / ".augmented.tmp" / "augmented" / "a" / "junk.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"junk")
    augment_dataset(project)
    assert not (project.dataset_dir / ".augmented.tmp").exists(), "the stale staging folder inside data/ is removed"
    assert "augmented/a/junk.png" not in output_files(project), "stale staged files are not published"
    assert_no_staging_left(project)


# ------------------------------------------------------------------ a full disk, a kill, two at once


def test_full_disk_during_augment_keeps_the_data_and_no_staging(
    tiny_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tiny_project()
    write_tiny_dataset(project)
    augment_dataset(project)
    before = protected_state(project)
    other = tiny_project({"augment": {"seed": 99}})
    real = PackWriter.add
    written = [0]

    def full_disk(self: PackWriter, name: str, data: bytes) -> None:
        written[0] += 1
        if written[0] > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.spool_path))
        real(self, name, data)

    monkeypatch.setattr(PackWriter, "add", full_disk)
    capsys.readouterr()
    status = main(["--params", str(other.params_path), "augment"])
    stderr = capsys.readouterr().err
    assert status == 1, f"a full disk fails the command with status 1: {stderr}"
    assert stderr.startswith(f"error: {project.staging_dir}"), f"the message names the staged file: {stderr}"
    assert "No space left on device" in stderr, f"the message says the disk is full: {stderr}"
    assert "previous augmented output is unchanged" in stderr, f"the message says the data was kept: {stderr}"
    assert protected_state(project) == before, "data/ is byte-identical to before"
    assert_no_staging_left(project)


def test_killed_augment_leaves_the_data_and_the_next_run_clears_its_staging(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    write_tiny_dataset(project)
    augment_dataset(project)
    before = protected_state(project)
    killed = run_mlops_killed(project, "augment", after_writes=5)
    assert killed.returncode == -signal.SIGKILL, f"the run was killed mid-way: {killed.returncode} {killed.stderr}"
    assert protected_state(project) == before, "a kill while staging leaves data/ byte-identical"
    stale = staging_leftovers(project)
    assert stale, "the dead run left its staging folder behind"
    assert all(str(project.staging_dir) in path for path in stale), f"staging happens outside data/: {stale}"

    augment_dataset(project)
    assert_no_staging_left(project)
    assert protected_state(project) == before, "the next run writes the same output (same seed and data)"


def test_augment_killed_while_publishing_is_finished_by_the_next_run(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    write_tiny_dataset(project)
    augment_dataset(project)
    expected = protected_state(project)
    other = tiny_project({"augment": {"seed": 5}})
    # Killed right after the new augmented.zip was moved in, before its manifest followed.
    output_path = str(project.dataset_dir / "augmented.zip")
    killed = run_mlops_killed(other, "augment", after_replace_to=output_path)
    assert killed.returncode == -signal.SIGKILL, f"the run was killed while publishing: {killed.stderr}"
    problems = manifest_matches_files(project.dataset_dir, project.augmented_manifest_path)
    assert problems, "the kill fell between moving the folder and its manifest"

    restored = tiny_project({"augment": {"seed": 7}})
    augment_dataset(restored)
    assert manifest_matches_files(project.dataset_dir, project.augmented_manifest_path) == [], "consistent again"
    assert protected_state(project) == expected, "the next run's output is complete (the same seed, the same bytes)"
    assert_no_staging_left(project)


def test_two_augments_at_once_both_succeed_with_a_consistent_result(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    write_tiny_dataset(project)
    augment_dataset(project)
    expected = protected_state(project)
    (project.dataset_dir / "augmented.zip").unlink()
    project.augmented_manifest_path.unlink()

    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "--params", str(project.params_path), "augment"],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    for run, (stdout, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, f"both augments succeed (the second waits for the first): {stderr}"
        assert "wrote" in stdout, f"each run reports what it wrote: {stdout}"
    problems = manifest_matches_files(project.dataset_dir, project.augmented_manifest_path)
    assert problems == [], f"the manifest matches the files: {problems}"
    assert protected_state(project) == expected, "the result is the complete output of one run"
    assert_no_staging_left(project)


def test_two_augments_in_threads_do_not_delete_each_others_output(
    tiny_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tiny_project({"augment": {"copies": 4}})
    write_tiny_dataset(project)
    errors: list[BaseException] = []
    callers: list[str] = []
    real = augment.augment_image
    start = threading.Barrier(2)

    def slow(image: Image.Image, config: AugmentConfig, rng: np.random.Generator) -> Image.Image:
        callers.append(threading.current_thread().name)
        time.sleep(0.005)  # long enough for the two runs to overlap without the lock
        return real(image, config, rng)

    def run() -> None:
        start.wait()
        try:
            augment_dataset(project)
        except BaseException as error:  # reported by the assert below
            errors.append(error)

    monkeypatch.setattr(augment, "augment_image", slow)
    threads = [threading.Thread(target=run, name=f"run-{index}") for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "both runs finish"
    assert errors == [], f"neither run fails: {errors}"
    assert len(callers) == 2 * 36, f"each run augments the 9 train images 4 times: {len(callers)} calls"
    first = callers[0]
    assert callers == [first] * 36 + [name for name in callers[36:] if name != first], (
        "the second run waited for the first one to finish (the dataset lock), they did not interleave"
    )
    assert len(read_manifest(project.augmented_manifest_path)) == 4 * 9, "4 copies of the 9 train images"
    problems = manifest_matches_files(project.dataset_dir, project.augmented_manifest_path)
    assert problems == [], f"the manifest matches the files: {problems}"
    assert_no_staging_left(project)


# ------------------------------------------------------------------------------------ the packed layout


def test_packed_and_loose_sources_give_the_same_pack_also_on_two_processes(
    tiny_project: ProjectFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.data import parallel

    loose = tiny_project()
    write_tiny_dataset(loose)
    augment_dataset(loose)
    expected = (loose.dataset_dir / "augmented.zip").read_bytes()

    (tmp_path / "packed").mkdir()
    packed = Project.load(write_params(tmp_path / "packed"))
    write_tiny_dataset(packed, packed=True)
    assert not (packed.dataset_dir / "images").exists(), "the sources are members of images.zip, not files"
    result = augment_dataset(packed)
    assert result.images_written == 2 * 9, "2 copies of the 9 train images"
    assert (packed.dataset_dir / "augmented.zip").read_bytes() == expected, "the same copies from a pack"
    assert manifest_matches_files(packed.dataset_dir, packed.augmented_manifest_path) == [], "manifest matches"

    monkeypatch.setattr(parallel, "PARALLEL_MIN_ITEMS", 0)  # worker processes even for 9 images
    monkeypatch.setattr(parallel, "worker_count", lambda: 2)
    augment_dataset(packed)
    assert (packed.dataset_dir / "augmented.zip").read_bytes() == expected, "two worker processes, the same pack"
    assert_no_staging_left(packed)


def test_corrupt_source_pack_is_named_and_previous_output_kept(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    write_tiny_dataset(project, packed=True)
    augment_dataset(project)
    before = protected_state(project)
    pack = project.dataset_dir / "images.zip"
    data = pack.read_bytes()
    pack.write_bytes(data[: len(data) // 2])
    before[str(pack.relative_to(project.root))] = hashlib.sha256(pack.read_bytes()).hexdigest()
    with pytest.raises(PipelineError, match=r"images\.zip: not a readable pack, truncated or corrupt") as caught:
        augment_dataset(project)
    assert str(pack) in str(caught.value), f"the pack is named in full: {caught.value}"
    assert protected_state(project) == before, "the previous augmented output is untouched"
    assert_no_staging_left(project)


def test_loose_copies_of_an_old_version_are_replaced_by_the_pack(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    write_tiny_dataset(project)
    stale = project.dataset_dir / "augmented" / "a" / "0123456789abcdef-0.png"  # augment before packs
    stale.parent.mkdir(parents=True)
    stale.write_bytes(png_bytes(np.zeros((8, 8), dtype=np.uint8)))
    augment_dataset(project)
    assert not (project.dataset_dir / "augmented").exists(), "the loose copies' folder is removed when published"
    assert (project.dataset_dir / "augmented.zip").is_file(), "the copies are in the pack"
    assert manifest_matches_files(project.dataset_dir, project.augmented_manifest_path) == [], "manifest matches"
    assert_no_staging_left(project)
