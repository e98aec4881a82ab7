"""Seeded, deterministic augmentation of the train split.

Each train image of the manifest gets ``augment.copies`` (K) augmented copies, written as members
``augmented/<label>/<parent sha256[:16]>-<k>.png`` of the pack ``<dataset>/augmented.zip``
(:mod:`pipelines.data.packs`) and listed in the augmented manifest (``augmented.csv``, split ``train``,
with ``parent_sha256`` naming the source image). Val and test images are never augmented. Source images
are read through :class:`~pipelines.data.packs.DatasetReader`: from ``images.zip``, or from the loose files
of a dataset versioned before packs; a pack that is unreadable or refused stops augment, naming it.

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
byte-identical copies and a byte-identical pack. Copies keep the size and mode (``L`` or ``RGB``) of their
source. A large train split is augmented on every core (:mod:`pipelines.data.parallel`), results taken in
manifest order, so the output is the same as one process writes.

The output is staged in a folder of this run outside ``data/`` (``artifacts/staging/<dataset>/``) and
moved in only when complete, under the dataset's lock (:mod:`pipelines.data.staging`): a failure (a bad
image, a full disk) or a kill leaves the previous ``augmented.zip`` and manifest as they were, two
augments at once run one after the other, and the next run removes what a killed run left behind.
Publishing also removes an ``augmented/`` folder of loose copies left by a version before packs. Source
images are decoded as PNG only (ingest wrote them). Only numpy, Pillow and tqdm are imported, so this
module is cheap to import from a DAG file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import sys
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines.config import AugmentConfig
from pipelines.data import parallel
from pipelines.data.images import DATASET_FORMATS
from pipelines.data.manifest import ManifestRow, read_manifest, write_manifest
from pipelines.data.packs import PACK_KINDS, DatasetReader, DatasetReadError, PackWriter
from pipelines.data.staging import staging_area
from pipelines.errors import PipelineError
from pipelines.project import Project

AUGMENTED_DIR_NAME = "augmented"
"""First folder of the augmented copies' manifest paths (and the loose layout's folder, before packs)."""

AUGMENTED_PACK_NAME = PACK_KINDS[AUGMENTED_DIR_NAME]
"""The pack, inside the dataset folder, holding the augmented copies."""

_SUPPORTED_MODES = ("L", "RGB")


@dataclass(frozen=True)
class AugmentResult:
    """What :func:`augment_dataset` wrote."""

    images_written: int
    """Augmented images written (source images x copies; 0 when augmentation is off)."""
    source_images: int
    """Train images of the manifest that were augmented (or would have been, when off)."""
    output_path: Path
    """``<dataset>/augmented.zip``: the pack of augmented copies (absent when augmentation is off)."""
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


def _load_source(reader: DatasetReader, row: ManifestRow, limit: int) -> Image.Image:
    """Read a train image, check it against its manifest sha256 and return it in mode L or RGB."""
    try:
        data = reader.read(row.path, limit)
    except DatasetReadError as error:
        raise PipelineError(f"{error} (augment's source image {row.path})") from None
    where = reader.location(row.path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != row.sha256:
        raise PipelineError(
            f"{where}: sha256 {digest[:16]}... does not match the manifest ({row.sha256[:16]}...); "
            "the image changed since ingest (run `mlops ingest` again)"
        )
    try:
        with Image.open(io.BytesIO(data), formats=list(DATASET_FORMATS)) as opened:
            opened.load()
            image = opened.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise PipelineError(f"{where}: cannot decode source image: {error}") from None
    if image.mode not in _SUPPORTED_MODES:
        image = image.convert("RGB" if row.channels == 3 else "L")
    return image


def _check_label(row: ManifestRow, manifest_path: Path) -> None:
    """Refuse labels that cannot be a single folder name (they would escape ``augmented/`` in the pack)."""
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


def _augment_source(
    row: ManifestRow, reader: DatasetReader, config: AugmentConfig, limit: int
) -> list[tuple[ManifestRow, bytes]]:
    """The K copies of one train image: each one's manifest row and PNG bytes."""
    source = _load_source(reader, row, limit)
    channels = len(source.getbands())
    copies: list[tuple[ManifestRow, bytes]] = []
    for copy_index in range(config.copies):
        augmented = augment_image(source, config, copy_rng(config.seed, row.sha256, copy_index))
        data = _png_bytes(augmented)
        copies.append(
            (
                ManifestRow(
                    path=f"{AUGMENTED_DIR_NAME}/{row.label}/{row.sha256[:16]}-{copy_index}.png",
                    label=row.label,
                    split="train",
                    width=augmented.width,
                    height=augmented.height,
                    channels=channels,
                    bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                    parent_sha256=row.sha256,
                ),
                data,
            )
        )
    return copies


_worker_reader: DatasetReader | None = None
"""In a worker process of a parallel augment: the reader of the dataset, opened once."""


def _open_worker_reader(dataset_dir: Path) -> None:
    global _worker_reader
    _worker_reader = DatasetReader(dataset_dir)


def _augment_chunk(config: AugmentConfig, limit: int, rows: list[ManifestRow]) -> list[list[tuple[ManifestRow, bytes]]]:
    """:func:`_augment_source` of each of ``rows``, in a worker process (its reader opened by the initializer)."""
    if _worker_reader is None:
        raise RuntimeError("_augment_chunk runs in a worker process whose initializer opened the dataset")
    return [_augment_source(row, _worker_reader, config, limit) for row in rows]


def _augmented(
    sources: list[ManifestRow], dataset_dir: Path, config: AugmentConfig, limit: int
) -> Generator[list[tuple[ManifestRow, bytes]], None, None]:
    """The copies of every source, in order: in this process, or on every core for a large train split."""
    workers = parallel.workers_for(len(sources))
    if workers:
        work = functools.partial(_augment_chunk, config, limit)
        yield from parallel.ordered_map(
            work, sources, workers=workers, initializer=_open_worker_reader, initargs=(dataset_dir,)
        )
        return
    with DatasetReader(dataset_dir) as reader:
        for row in sources:
            yield _augment_source(row, reader, config, limit)


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
    Raises :class:`PipelineError` when the manifest is missing or malformed, a source image is
    unreadable or changed since ingest, or the staged output cannot be written (a full disk); the
    previous augmented output is then left as it was. Holds the dataset's lock throughout, so a second
    augment (or an ingest) of the same dataset waits for this one.
    """
    config = project.config.augment
    limit = project.config.ingest.max_file_bytes
    dataset_dir = project.dataset_dir
    output_path = dataset_dir / AUGMENTED_PACK_NAME
    manifest_path = project.augmented_manifest_path
    written: list[ManifestRow] = []
    try:
        with staging_area(project, "augment") as area:
            sources = _train_sources(read_manifest(project.manifest_path), project.manifest_path)
            if config.enabled and config.copies > 0:
                progress = tqdm(
                    total=len(sources), desc="augment", unit="img", file=sys.stderr, disable=not _stderr_is_tty()
                )
                with (
                    progress,
                    contextlib.closing(_augmented(sources, dataset_dir, config, limit)) as augmented,
                    PackWriter(area.new / AUGMENTED_PACK_NAME) as pack,
                ):
                    for copies in augmented:
                        for row, data in copies:
                            pack.add(row.path, data)
                            written.append(row)
                        progress.update()
            # With augmentation off nothing is staged as augmented.zip: publishing removes the old pack.
            write_manifest(area.new / manifest_path.name, written, augmented=True)
            area.publish(
                [
                    (AUGMENTED_PACK_NAME, output_path),
                    (AUGMENTED_DIR_NAME, dataset_dir / AUGMENTED_DIR_NAME),  # loose copies of before packs: removed
                    (manifest_path.name, manifest_path),
                ]
            )
    except OSError as error:
        raise PipelineError(
            f"{error.filename or project.staging_dir}: cannot write the staged augmented copies "
            f"({error.strerror or error}); the previous augmented output is unchanged"
        ) from None
    return AugmentResult(len(written), len(sources), output_path, manifest_path)
