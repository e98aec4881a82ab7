"""Seeded, deterministic augmentation of the train split.

Each train image of the manifest gets ``augment.copies`` (K) augmented copies, written as
``<dataset>/augmented/<label>/<parent sha256[:16]>-<k>.png`` and listed in the augmented manifest
(``augmented.csv``, split ``train``, with ``parent_sha256`` naming the source image). Val and test
images are never augmented.

The operations, each configured in ``params.yaml`` (``augment`` section) and off when its range is 0:

* geometry, composed into one affine transform about the image centre (bilinear, black fill):
  rotation by up to ``±rotation_degrees``, shift by up to ``±shift_fraction`` of the width and height,
  zoom by a factor in ``1 ± zoom_range``;
* horizontal flip with probability 1/2, only when ``horizontal_flip`` is true;
* photometric, on a [0, 1] scale: contrast by a factor in ``1 ± contrast`` about each channel's mean,
  brightness by an offset in ``±brightness``, Gaussian noise with ``noise_std``; then clipped.

Randomness: every (source image, copy) pair draws from its own ``numpy.random.default_rng`` seeded
from the configured seed, the source image's sha256 and the copy index, so an image's copies do not
depend on the order of the manifest or on the other images, and the same seed and data give
byte-identical files. Copies keep the size and mode (``L`` or ``RGB``) of their source.

The output is staged in ``<dataset>/.augmented.tmp`` and swapped in only when complete: a failure
leaves the previous ``augmented/`` folder and manifest as they were. Only numpy, Pillow and tqdm are
imported, so this module is cheap to import from a DAG file.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines.config import AugmentConfig
from pipelines.data.manifest import ManifestRow, read_manifest, write_manifest
from pipelines.errors import PipelineError
from pipelines.project import Project

AUGMENTED_DIR_NAME = "augmented"
"""Folder, inside the dataset folder, holding the augmented copies."""

STAGING_DIR_NAME = ".augmented.tmp"
"""Sibling folder where a run stages its output before swapping it in."""

_OLD_DIR_NAME = ".augmented.old"
_SUPPORTED_MODES = ("L", "RGB")


@dataclass(frozen=True)
class AugmentResult:
    """What :func:`augment_dataset` wrote."""

    images_written: int
    """Augmented images written (source images x copies; 0 when augmentation is off)."""
    source_images: int
    """Train images of the manifest that were augmented (or would have been, when off)."""
    output_dir: Path
    """``<dataset>/augmented``: the folder of augmented copies (absent when augmentation is off)."""
    manifest_path: Path
    """The augmented manifest (header only when augmentation is off)."""


def copy_rng(seed: int, parent_sha256: str, copy_index: int) -> np.random.Generator:
    """Return the random generator of copy ``copy_index`` of the image with sha256 ``parent_sha256``.

    Seeded from a hash of the three values, so it is independent of every other image and copy.
    """
    key = f"augment:{seed}:{parent_sha256}:{copy_index}".encode()
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest(), "big"))


def _affine_coefficients(
    size: tuple[int, int], angle_degrees: float, shift: tuple[float, float], zoom: float
) -> tuple[float, float, float, float, float, float]:
    """PIL ``AFFINE`` data (output pixel -> input pixel) for rotate + zoom about the centre, then shift.

    The forward map is ``out = centre + shift + zoom * R(angle) (in - centre)``; PIL wants its inverse.
    PIL samples at pixel centres, so the geometric centre is ``(width / 2, height / 2)``.
    """
    width, height = size
    centre_x, centre_y = width / 2.0, height / 2.0
    theta = math.radians(angle_degrees)
    cos, sin = math.cos(theta) / zoom, math.sin(theta) / zoom
    origin_x, origin_y = centre_x + shift[0], centre_y + shift[1]
    a, b, d, e = cos, sin, -sin, cos
    c = centre_x - a * origin_x - b * origin_y
    f = centre_y - d * origin_x - e * origin_y
    return (a, b, c, d, e, f)


def augment_image(image: Image.Image, config: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """One augmented copy of ``image`` (mode ``L`` or ``RGB``), with the same size and mode.

    Draws every random parameter from ``rng`` in a fixed order whatever is enabled, so switching one
    operation on or off does not change the parameters of the others.
    """
    if image.mode not in _SUPPORTED_MODES:
        raise ValueError(f"unsupported image mode {image.mode!r} (expected L or RGB)")
    width, height = image.size
    angle = float(rng.uniform(-config.rotation_degrees, config.rotation_degrees))
    shift_x = float(rng.uniform(-config.shift_fraction, config.shift_fraction)) * width
    shift_y = float(rng.uniform(-config.shift_fraction, config.shift_fraction)) * height
    zoom = 1.0 + float(rng.uniform(-config.zoom_range, config.zoom_range))
    brightness = float(rng.uniform(-config.brightness, config.brightness))
    contrast = 1.0 + float(rng.uniform(-config.contrast, config.contrast))
    flip = bool(rng.random() < 0.5)

    result = image
    coefficients = _affine_coefficients(image.size, angle, (shift_x, shift_y), zoom)
    if coefficients != (1.0, 0.0, 0.0, 0.0, 1.0, 0.0):
        fill: int | tuple[int, int, int] = 0 if image.mode == "L" else (0, 0, 0)
        result = image.transform(
            image.size,
            Image.Transform.AFFINE,
            coefficients,
            resample=Image.Resampling.BILINEAR,
            fillcolor=fill,
        )
    if config.horizontal_flip and flip:
        result = result.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    if contrast == 1.0 and brightness == 0.0 and config.noise_std == 0.0:
        return result.copy() if result is image else result
    pixels = np.asarray(result, dtype=np.float64) / 255.0
    mean = pixels.mean(axis=(0, 1), keepdims=True)
    pixels = (pixels - mean) * contrast + mean + brightness
    if config.noise_std > 0.0:
        pixels = pixels + rng.normal(0.0, config.noise_std, size=pixels.shape)
    out = np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(out)


def _load_source(dataset_dir: Path, row: ManifestRow) -> Image.Image:
    """Read a train image, check it against its manifest sha256 and return it in mode L or RGB."""
    path = dataset_dir / row.path
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PipelineError(f"{path}: cannot read source image: {error.strerror or error}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != row.sha256:
        raise PipelineError(
            f"{path}: sha256 {digest[:16]}... does not match the manifest ({row.sha256[:16]}...); "
            "the image changed since ingest (run `mlops ingest` again)"
        )
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image = opened.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise PipelineError(f"{path}: cannot decode source image: {error}") from None
    if image.mode not in _SUPPORTED_MODES:
        image = image.convert("RGB" if row.channels == 3 else "L")
    return image


def _check_label(row: ManifestRow, manifest_path: Path) -> None:
    """Refuse labels that cannot be a single folder name (they would escape ``augmented/``)."""
    label = row.label
    if label in ("", ".", "..") or "/" in label or "\\" in label or "\0" in label:
        raise PipelineError(f"{manifest_path}: label {label!r} of {row.path} cannot be a folder name")


def _stderr_is_tty() -> bool:
    """Whether stderr is a terminal (Airflow and pytest replace it with objects that may not say)."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):
        return False


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _augment_source(row: ManifestRow, dataset_dir: Path, staged_dir: Path, config: AugmentConfig) -> list[ManifestRow]:
    """Write the K copies of one train image under ``staged_dir`` and return their manifest rows."""
    source = _load_source(dataset_dir, row)
    channels = len(source.getbands())
    rows: list[ManifestRow] = []
    for copy_index in range(config.copies):
        augmented = augment_image(source, config, copy_rng(config.seed, row.sha256, copy_index))
        data = _png_bytes(augmented)
        name = f"{row.sha256[:16]}-{copy_index}.png"
        target = staged_dir / row.label / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        rows.append(
            ManifestRow(
                path=f"{AUGMENTED_DIR_NAME}/{row.label}/{name}",
                label=row.label,
                split="train",
                width=augmented.width,
                height=augmented.height,
                channels=channels,
                bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                parent_sha256=row.sha256,
            )
        )
    return rows


def _remove(path: Path) -> None:
    """Remove a file or folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _swap_in(staging: Path, output_dir: Path, manifest_path: Path) -> None:
    """Replace ``output_dir`` and ``manifest_path`` by the staged folder and manifest."""
    old = output_dir.with_name(_OLD_DIR_NAME)
    _remove(old)
    if output_dir.exists():
        os.replace(output_dir, old)
    try:
        os.replace(staging / AUGMENTED_DIR_NAME, output_dir)
        os.replace(staging / manifest_path.name, manifest_path)
    except OSError:
        # Put the previous folder back; the staged one is removed by the caller.
        if old.exists():
            if output_dir.exists():
                os.replace(output_dir, staging / AUGMENTED_DIR_NAME)
            os.replace(old, output_dir)
        raise
    _remove(old)
    _remove(staging)


def _train_sources(rows: list[ManifestRow], manifest_path: Path) -> list[ManifestRow]:
    """Train rows sorted by path, one per (label, sha256): duplicates would give the same copies."""
    sources: dict[tuple[str, str], ManifestRow] = {}
    for row in sorted(rows, key=lambda item: item.path):
        if row.split != "train":
            continue
        _check_label(row, manifest_path)
        sources.setdefault((row.label, row.sha256), row)
    return list(sources.values())


def augment_dataset(project: Project) -> AugmentResult:
    """Write ``augment.copies`` augmented copies of every train image and the augmented manifest.

    When augmentation is disabled or ``copies`` is 0, removes any previous augmented output and
    writes an augmented manifest with its header only, so training uses the originals alone.
    Raises :class:`PipelineError` when the manifest is missing or malformed, or a source image is
    unreadable or changed since ingest; the previous augmented output is then left as it was.
    """
    config = project.config.augment
    dataset_dir = project.dataset_dir
    output_dir = dataset_dir / AUGMENTED_DIR_NAME
    manifest_path = project.augmented_manifest_path
    sources = _train_sources(read_manifest(project.manifest_path), project.manifest_path)
    staging = dataset_dir / STAGING_DIR_NAME
    _remove(staging)

    if not config.enabled or config.copies == 0:
        _remove(output_dir)
        write_manifest(manifest_path, [], augmented=True)
        return AugmentResult(0, len(sources), output_dir, manifest_path)

    staged_dir = staging / AUGMENTED_DIR_NAME
    try:
        staged_dir.mkdir(parents=True)
        written: list[ManifestRow] = []
        progress = tqdm(
            sources,
            desc="augment",
            unit="img",
            file=sys.stderr,
            disable=not _stderr_is_tty(),
        )
        with progress:
            for row in progress:
                written.extend(_augment_source(row, dataset_dir, staged_dir, config))
        write_manifest(staging / manifest_path.name, written, augmented=True)
        _swap_in(staging, output_dir, manifest_path)
    except BaseException:
        _remove(staging)
        raise
    return AugmentResult(len(written), len(sources), output_dir, manifest_path)
