"""Where images come from: each source yields ``RawImage`` (origin, label, bytes) for ingest to normalise.

* ``sample`` – scikit-learn's bundled digits, written deterministically (no network);
* ``folder:PATH`` – one sub-folder per class, PNG/JPEG/BMP/GIF/WebP in any case of extension;
* ``s3://bucket/prefix`` – the same layout under an S3 prefix, through boto3 (endpoint and credentials
  from the environment, so any S3-compatible store works).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from pipelines.config import Config
from pipelines.data.images import RawImage
from pipelines.errors import IngestError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})


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
