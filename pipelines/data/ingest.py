"""Ingest: read images from a source, normalise them and write a dataset folder with a manifest.

Sources (``ingest.source`` in params.yaml, or ``mlops ingest --source``):

* ``sample`` – scikit-learn's bundled digits, written deterministically (no network);
* ``folder:PATH`` – one sub-folder per class, PNG/JPEG/BMP/GIF/WebP in any case of extension;
* ``s3://bucket/prefix`` – the same layout under an S3 prefix, through boto3 (endpoint and
  credentials from the environment, so any S3-compatible store works).

Every image is converted to the configured channels and size and re-encoded as PNG, so the same
pixels always give the same bytes. The split (train/val/test) is derived from the sha256 of those
bytes: an image keeps its split as the dataset grows and identical images can never sit in two splits.
Everything is written to a staging folder and renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines.config import SPLITS, Config
from pipelines.data.manifest import ManifestRow, write_manifest
from pipelines.errors import IngestError
from pipelines.project import MANIFEST_NAME, Project

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
LAST_INGEST_NAME = "last_ingest.json"


@dataclass(frozen=True)
class RawImage:
    """One source image before normalisation: where it came from, its class, its bytes."""

    origin: str
    label: str
    data: bytes


@dataclass(frozen=True)
class IngestResult:
    """What ingest wrote: the dataset folder, how many images per split, what it dropped."""

    dataset_dir: Path
    source: str
    images: int
    per_split: dict[str, int] = field(default_factory=dict)
    duplicates_dropped: int = 0


def assign_split(sha256: str, fractions: Mapping[str, float]) -> str:
    """The split of an image, a pure function of its content hash and the split fractions."""
    position = int(sha256[:16], 16) / 2**64
    cumulative = 0.0
    for split in SPLITS:
        cumulative += fractions[split]
        if position < cumulative:
            return split
    return SPLITS[-1]


def normalise_image(raw: RawImage, config: Config) -> bytes:
    """Decode ``raw``, convert it to the configured channels and size, and return PNG bytes.

    Refuses, with an :class:`IngestError` naming the file: oversized files, undecodable or truncated
    data, and headers declaring more pixels than ``ingest.max_image_pixels`` (decompression bombs).
    """
    limits = config.ingest
    if len(raw.data) > limits.max_file_bytes:
        raise IngestError(f"{raw.origin}: file is {len(raw.data)} bytes, over ingest.max_file_bytes")
    try:
        # The pixel limit is checked from the header, before anything is decoded. (No
        # warnings.catch_warnings() here: images are normalised in threads and it is not thread-safe.)
        image = Image.open(io.BytesIO(raw.data))
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise IngestError(
                f"{raw.origin}: header declares {width}x{height} pixels, more than "
                f"ingest.max_image_pixels={limits.max_image_pixels} (possible decompression bomb)"
            )
        image.seek(0)
        image.load()
    except IngestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise IngestError(f"{raw.origin}: refused as a decompression bomb: {error}") from None
    except Exception as error:  # Pillow raises many types for bad data
        raise IngestError(f"{raw.origin}: not a readable image ({type(error).__name__}: {error})") from None
    pixels = _to_channels(image, config.dataset.channels)
    target_height, target_width = config.dataset.image_size
    if pixels.size != (target_width, target_height):
        pixels = pixels.resize((target_width, target_height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    pixels.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Grayscale, RGB, RGBA, palette or 16-bit images as 8-bit ``L`` (1 channel) or ``RGB`` (3)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I") and array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("P", "PA", "LA", "RGBA", "La") or "transparency" in image.info:
        # Transparent pixels become black, the background of the built-in sample.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def _sample_images(config: Config) -> Iterator[RawImage]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        grey = np.clip(np.rint(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(grey, mode="L").save(buffer, format="PNG", optimize=False)
        yield RawImage(origin=f"sample:digits[{index}]", label=str(int(target)), data=buffer.getvalue())


def _read_local(path: Path, limit: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise IngestError(f"{path}: file is {size} bytes, over ingest.max_file_bytes={limit}")
        return path.read_bytes()
    except IngestError:
        raise
    except OSError as error:
        raise IngestError(f"{path}: cannot read file ({error.strerror or error})") from None


def _folder_images(root: Path, config: Config) -> tuple[list[tuple[Path, str]], list[str]]:
    """The image files under ``root`` as (path, label), validated; also the labels found."""
    if not root.exists():
        raise IngestError(f"{root}: source folder does not exist")
    if not root.is_dir():
        raise IngestError(f"{root}: source is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise IngestError(f"{root}: folder is empty (expected one sub-folder per class)")
    classes = set(config.dataset.classes)
    files: list[tuple[Path, str]] = []
    for class_dir in class_dirs:
        if class_dir.name not in classes:
            raise IngestError(
                f"{class_dir}: label {class_dir.name!r} is not in dataset.classes {list(config.dataset.classes)}"
            )
        images = sorted(
            p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not images:
            raise IngestError(f"{class_dir}: class folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        files.extend((path, class_dir.name) for path in images)
    return files, [d.name for d in class_dirs]


def _s3_images(url: str, config: Config) -> Iterator[RawImage]:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise IngestError(f"{url}: no bucket in S3 source")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = boto3.client("s3")
    classes = set(config.dataset.classes)
    keys: list[tuple[str, str, int]] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                key = item["Key"]
                relative = PurePosixPath(key[len(prefix) :])
                if ".." in relative.parts or key.startswith("/"):
                    raise IngestError(f"s3://{bucket}/{key}: key contains '..' and is refused")
                if relative.suffix.lower() not in IMAGE_EXTENSIONS or key.endswith("/"):
                    continue
                if len(relative.parts) < 2:
                    continue
                label = relative.parts[0]
                if label not in classes:
                    raise IngestError(
                        f"s3://{bucket}/{key}: label {label!r} is not in dataset.classes {list(config.dataset.classes)}"
                    )
                keys.append((key, label, int(item.get("Size", 0))))
    except (BotoCoreError, ClientError) as error:
        raise IngestError(f"{url}: cannot list S3 objects: {error}") from None
    if not keys:
        raise IngestError(f"{url}: no images under this S3 prefix")
    for key, label, size in sorted(keys):
        if size > config.ingest.max_file_bytes:
            raise IngestError(f"s3://{bucket}/{key}: object is {size} bytes, over ingest.max_file_bytes")
        try:
            data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as error:
            raise IngestError(f"s3://{bucket}/{key}: cannot read object: {error}") from None
        yield RawImage(origin=f"s3://{bucket}/{key}", label=label, data=data)


def read_source(source: str, config: Config) -> tuple[Iterator[RawImage], int | None]:
    """The raw images of ``source`` and, when known up front, how many there are."""
    if source == "sample":
        return _sample_images(config), 1797
    if source.startswith("folder:"):
        root = Path(source.removeprefix("folder:")).expanduser()
        files, _ = _folder_images(root, config)
        limit = config.ingest.max_file_bytes
        iterator = (RawImage(str(path), label, _read_local(path, limit)) for path, label in files)
        return iterator, len(files)
    if source.startswith("s3://"):
        return _s3_images(source, config), None
    raise IngestError(f"ingest.source: unknown source {source!r} (expected sample, folder:PATH or s3://bucket/prefix)")


def _collect(
    raw_images: Iterator[RawImage], total: int | None, project: Project, staging: Path
) -> tuple[list[ManifestRow], int]:
    config = project.config
    classes = set(config.dataset.classes)
    seen: dict[str, tuple[str, str]] = {}
    rows: list[ManifestRow] = []
    duplicates = 0
    height, width = config.dataset.image_size
    # Sequential on purpose: with small images Pillow's per-call Python overhead dominates, and a thread
    # pool measured slower on two cores (see benchmarks/results.md).
    for raw in tqdm(raw_images, total=total, desc="ingest", unit="img", file=sys.stderr, disable=None):
        if raw.label not in classes:
            raise IngestError(f"{raw.origin}: label {raw.label!r} is not in dataset.classes")
        data = normalise_image(raw, config)
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            first_origin, first_label = seen[digest]
            if first_label != raw.label:
                raise IngestError(
                    f"{raw.origin}: same image as {first_origin} but labelled {raw.label!r} instead of {first_label!r}"
                )
            duplicates += 1
            continue
        seen[digest] = (raw.origin, raw.label)
        relative = f"images/{raw.label}/{digest[:16]}.png"
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        split = assign_split(digest, config.ingest.split_fractions)
        rows.append(ManifestRow(relative, raw.label, split, width, height, config.dataset.channels, len(data), digest))
    return rows, duplicates


def _swap_into_place(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging`` with renames, so readers see the old or the new folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    retired = staging.with_name(staging.name + ".old")
    if target.exists():
        os.replace(target, retired)
    try:
        os.replace(staging, target)
    except OSError:
        if retired.exists():
            os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def ingest(project: Project, source: str | None = None) -> IngestResult:
    """Ingest ``source`` (default: ``ingest.source``) into ``data/<dataset>/`` with its manifest.

    Raises :class:`IngestError` naming the problem and the file; on any error ``data/`` is unchanged.
    """
    source = source or project.config.ingest.source
    staging_root = project.root / "artifacts" / "staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = staging_root / f"ingest-{project.config.dataset.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        raw_images, total = read_source(source, project.config)
        rows, duplicates = _collect(raw_images, total, project, staging)
        if not rows:
            raise IngestError(f"{source}: no images found")
        write_manifest(staging / MANIFEST_NAME, rows)
        _swap_into_place(staging, project.dataset_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    per_split = Counter(row.split for row in rows)
    result = IngestResult(
        dataset_dir=project.dataset_dir,
        source=source,
        images=len(rows),
        per_split={split: per_split.get(split, 0) for split in SPLITS},
        duplicates_dropped=duplicates,
    )
    record = {
        "source": source,
        "images": result.images,
        "per_split": result.per_split,
        "duplicates_dropped": duplicates,
        "ingested_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (staging_root.parent / LAST_INGEST_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return result


def last_ingest_source(project: Project) -> str:
    """The source of the most recent ingest in this project, or ``""`` if none is recorded."""
    path = project.root / "artifacts" / LAST_INGEST_NAME
    try:
        return str(json.loads(path.read_text(encoding="utf-8")).get("source", ""))
    except (OSError, ValueError):
        return ""
