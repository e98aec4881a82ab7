"""What validation measures of every image, and the per-class pixel profile drift is checked against.

:func:`measure_image` reads (through :class:`~pipelines.data.packs.DatasetReader`: from the dataset's pack,
or its loose file), decodes and measures one manifest row's image without ever raising for a bad image;
:func:`measure_images` does it for every row, on every core for a large dataset; :func:`compute_profile`
pools the measurements into a per-class mean and std of pixel values in [0, 1]. The profile of a passing
dataset is written next to its manifest (versioned with the data); the champion's becomes the reference
that the next validation, and production monitoring, compare against.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipelines.data import parallel
from pipelines.data.images import DATASET_FORMATS
from pipelines.data.manifest import ManifestRow
from pipelines.data.packs import DatasetReader, DatasetReadError
from pipelines.errors import PipelineError
from pipelines.files import write_atomic
from pipelines.project import Project

PROFILE_NAME = "profile.json"
"""File name of the per-class pixel profile written next to the manifest when validation passes."""


@dataclass(frozen=True)
class ImageStats:
    """What validation measured of one manifest row's file.

    ``decodes`` is False when the file is missing, too large, declares too many pixels or does not decode;
    ``error`` then says why, and the measured fields are None.
    """

    path: str
    label: str
    split: str
    sha256: str
    decodes: bool
    error: str = ""
    sha256_matches: bool = False
    width: int | None = None
    height: int | None = None
    channels: int | None = None
    mean: float | None = None
    std: float | None = None
    values: int = 0
    """Number of pixel values (height x width x channels) behind ``mean`` and ``std``."""


@dataclass(frozen=True)
class ClassProfile:
    """Pixel statistics of one class: mean and std of all its pixel values in [0, 1], and image count."""

    mean: float
    std: float
    count: int


def profile_path(project: Project) -> Path:
    """Where :func:`validate_dataset` writes the dataset's profile: ``data/<name>/profile.json``."""
    return project.dataset_dir / PROFILE_NAME


def measure_image(
    dataset_dir: Path,
    row: ManifestRow,
    max_pixels: int,
    max_bytes: int,
    formats: Sequence[str] = DATASET_FORMATS,
    *,
    reader: DatasetReader | None = None,
) -> ImageStats:
    """Read and decode the image of ``row`` and measure it; never raises for a bad image.

    The image is read through ``reader`` (default: a reader of ``dataset_dir`` opened for this call; pass
    one to measure many rows): from the dataset's pack, or its loose file when there is no pack
    (:mod:`pipelines.data.packs`). A path leaving the dataset folder, a missing file or member, more than
    ``max_bytes`` bytes, a pack that is unreadable or refused, more than ``max_pixels`` declared pixels
    (decompression bomb), a format not in ``formats`` (only Pillow's decoders of ``formats`` are used: PNG,
    what ingest writes, by default) or a failure to decode gives ``decodes=False`` with the reason in
    ``error``. Pixel ``mean`` and ``std`` are over all channels of the 8-bit image scaled to [0, 1].
    """

    def failed(reason: str, sha256_matches: bool = False) -> ImageStats:
        return ImageStats(row.path, row.label, row.split, row.sha256, False, reason, sha256_matches=sha256_matches)

    try:
        if reader is None:
            with DatasetReader(dataset_dir) as own:
                data = own.read(row.path, max_bytes)
        else:
            data = reader.read(row.path, max_bytes)
    except DatasetReadError as error:
        return failed(error.reason)
    except Exception as error:  # never raise for one image (e.g. a path the OS refuses)
        return failed(f"cannot read file: {type(error).__name__}: {error}")
    matches = hashlib.sha256(data).hexdigest() == row.sha256
    try:
        # No warnings.catch_warnings() here: it is not thread-safe, and the explicit pixel limit below is
        # checked from the header before anything is decoded.
        with Image.open(io.BytesIO(data), formats=list(formats)) as image:
            width, height = image.size
            if width * height > max_pixels:
                return failed(
                    f"declares {width}x{height} pixels, over ingest.max_image_pixels={max_pixels}",
                    matches,
                )
            image.load()
            channels = len(image.getbands())
            pixels = _pixel_values(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return failed(f"decompression bomb: {error}", matches)
    except UnidentifiedImageError:
        return failed("not a recognised image format", matches)
    except Exception as error:  # Pillow raises many exception types for malformed data
        return failed(f"does not decode: {type(error).__name__}: {error}", matches)
    return ImageStats(
        path=row.path,
        label=row.label,
        split=row.split,
        sha256=row.sha256,
        decodes=True,
        sha256_matches=matches,
        width=width,
        height=height,
        channels=channels,
        mean=float(pixels.mean()) if pixels.size else 0.0,
        std=float(pixels.std()) if pixels.size else 0.0,
        values=int(pixels.size),
    )


_worker_reader: DatasetReader | None = None
"""In a worker process of :func:`measure_images`: the reader of the dataset, opened once."""


def _open_worker_reader(dataset_dir: Path) -> None:
    global _worker_reader
    _worker_reader = DatasetReader(dataset_dir)


def _measure_chunk(dataset_dir: Path, max_pixels: int, max_bytes: int, rows: list[ManifestRow]) -> list[ImageStats]:
    """:func:`measure_image` of each of ``rows`` in a worker process, through the worker's reader."""
    return [measure_image(dataset_dir, row, max_pixels, max_bytes, reader=_worker_reader) for row in rows]


def measure_images(dataset_dir: Path, rows: Sequence[ManifestRow], max_pixels: int, max_bytes: int) -> list[ImageStats]:
    """:func:`measure_image` of every row, in order, each pack opened once; on every core for a large dataset.

    Below :data:`pipelines.data.parallel.PARALLEL_MIN_ITEMS` rows the work stays in this process; above,
    chunks of rows go to worker processes (each opening the dataset's packs once) and the results come back
    in row order, the same as measured here.
    """
    workers = parallel.workers_for(len(rows))
    if not workers:
        with DatasetReader(dataset_dir) as reader:
            return [measure_image(dataset_dir, row, max_pixels, max_bytes, reader=reader) for row in rows]
    work = functools.partial(_measure_chunk, dataset_dir, max_pixels, max_bytes)
    return list(
        parallel.ordered_map(work, rows, workers=workers, initializer=_open_worker_reader, initargs=(dataset_dir,))
    )


def _pixel_values(image: Image.Image) -> np.ndarray[Any, np.dtype[np.float64]]:
    """The image's 8-bit pixel values (all channels) scaled to [0, 1]."""
    if image.mode not in ("L", "LA", "RGB", "RGBA"):
        colour = image.mode == "P" or len(image.getbands()) >= 3
        image = image.convert("RGB" if colour else "L")
    return np.asarray(image, dtype=np.float64) / 255.0


def compute_profile(images: Iterable[ImageStats]) -> dict[str, ClassProfile]:
    """Per-class pixel mean and std over all pixel values of the class's decodable images.

    The std is pooled (it includes the spread between images), weighted by each image's pixel count.
    Classes without a decodable image are left out.
    """
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for image in images:
        if not image.decodes or image.mean is None or image.std is None or image.values == 0:
            continue
        total = totals[image.label]
        total[0] += 1
        total[1] += image.values
        total[2] += image.mean * image.values
        total[3] += (image.std**2 + image.mean**2) * image.values
    profile: dict[str, ClassProfile] = {}
    for label in sorted(totals):
        count, values, summed, squared = totals[label]
        mean = summed / values
        std = math.sqrt(max(squared / values - mean**2, 0.0))
        profile[label] = ClassProfile(mean=mean, std=std, count=int(count))
    return profile


def write_profile(path: Path, profile: Mapping[str, ClassProfile]) -> None:
    """Write ``profile`` as deterministic JSON (sorted keys, floats to 6 decimals), atomically.

    Format: ``{"classes": {label: {"count": int, "mean": float, "std": float}}}``.
    """
    document = {
        "classes": {
            label: {"count": stats.count, "mean": round(stats.mean, 6), "std": round(stats.std, 6)}
            for label, stats in profile.items()
        }
    }
    write_atomic(path, json.dumps(document, indent=2, sort_keys=True) + "\n")


def read_profile(path: Path) -> dict[str, ClassProfile]:
    """Read a profile written by :func:`write_profile`; a malformed file raises :class:`PipelineError`."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: profile not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PipelineError(f"{path}: cannot read profile: {error}") from None
    classes = document.get("classes") if isinstance(document, dict) else None
    if not isinstance(classes, dict):
        raise PipelineError(f'{path}: malformed profile: expected {{"classes": {{label: {{...}}}}}}')
    profile: dict[str, ClassProfile] = {}
    for label, stats in classes.items():
        try:
            mean, std, count = stats["mean"], stats["std"], stats["count"]
            if not all(isinstance(value, int | float) for value in (mean, std, count)):
                raise TypeError("mean, std and count must be numbers")
            profile[str(label)] = ClassProfile(mean=float(mean), std=float(std), count=int(count))
        except (KeyError, TypeError) as error:
            raise PipelineError(f"{path}: malformed profile entry for class {label!r}: {error}") from None
    return profile
