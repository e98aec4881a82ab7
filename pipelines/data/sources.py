"""Where images come from: each source yields ``RawImage`` (origin, label, bytes) for ingest to normalise.

* ``sample`` – scikit-learn's bundled digits, written deterministically (no network);
* ``folder:PATH`` – one sub-folder per class, with images of the formats in ``ingest.image_formats``
  (PNG/JPEG/BMP/GIF/WebP by default) in any case of extension;
* ``s3://bucket/prefix`` – the same layout under an S3 prefix, through boto3 (endpoint and credentials
  from the environment, so any S3-compatible store works).

What a folder source may hold. Only regular files are read: a FIFO, socket or device file named like an
image (or a link to one) is refused by name while the folder is listed, before anything is opened. A
symbolic link (to a file, a class folder or a sub-folder) is followed only when its target lies inside
the source folder; a link leaving the folder is refused by name, whatever it points to. A linked
sub-folder is read once, and a link to a folder holding the link (a loop) is not followed. Hidden
entries (``.name``) are skipped.

Every read is bounded by ``ingest.max_file_bytes`` whatever the file system or the S3 listing reports:
a file is opened without following links (``O_NOFOLLOW``, the link already resolved and checked),
checked to be a regular file on the open descriptor, and at most limit + 1 bytes are read; an S3 object
is refused from its listed size and its ``ContentLength``, and its body is read the same bounded way.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Protocol

import numpy as np
from PIL import Image

from pipelines.config import Config
from pipelines.data.images import RawImage, image_extensions
from pipelines.errors import IngestError
from pipelines.tracking import redact

_CHUNK_BYTES = 1 << 20


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


def _sample_images(config: Config) -> Iterator[RawImage]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        grey = np.clip(np.rint(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(grey, mode="L").save(buffer, format="PNG", optimize=False)
        yield RawImage(origin=f"sample:digits[{index}]", label=str(int(target)), data=buffer.getvalue())


def _kind(mode: int) -> str:
    """What a file of ``mode`` is, in words, for the messages refusing it."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def read_bounded(stream: _Readable, limit: int, origin: str) -> bytes:
    """Read ``stream`` to its end, but never more than ``limit`` + 1 bytes; refuse it if it holds more."""
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        chunk = stream.read(min(_CHUNK_BYTES, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > limit:
        raise IngestError(f"{origin}: holds more than {limit} bytes, over ingest.max_file_bytes={limit}")
    return b"".join(chunks)


class _Descriptor:
    """``read`` over an open file descriptor (for :func:`read_bounded`)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, size: int = _CHUNK_BYTES, /) -> bytes:
        return os.read(self.fd, size)


def read_regular_file(path: Path, limit: int, origin: str | None = None) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them, whatever ``stat`` reports.

    ``path`` is opened without following a final symbolic link and without blocking (a FIFO put in its
    place after listing neither blocks nor is read), then checked to be a regular file on the descriptor.
    Errors are :class:`IngestError` naming ``origin`` (default: ``path``).
    """
    name = origin or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if os.path.islink(path):
            raise IngestError(f"{name}: became a symbolic link while being ingested; refused") from None
        raise IngestError(f"{name}: cannot read file ({error.strerror or error})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IngestError(f"{name}: is {_kind(info.st_mode)}, not a regular file; refused")
        if info.st_size > limit:
            raise IngestError(f"{name}: file is {info.st_size} bytes, over ingest.max_file_bytes={limit}")
        return read_bounded(_Descriptor(fd), limit, name)
    except OSError as error:
        raise IngestError(f"{name}: cannot read file ({error.strerror or error})") from None
    finally:
        os.close(fd)


def _outside(path: Path, real: Path, root: Path) -> IngestError:
    return IngestError(
        f"{path}: symbolic link to {real}, outside the source folder {root}; refused "
        "(links may only point inside the source folder)"
    )


def _class_images(class_dir: Path, root: Path, root_real: Path, extensions: frozenset[str]) -> list[tuple[Path, Path]]:
    """(path as listed, real path) of every image file under ``class_dir``, checked by the module's rules."""
    found: list[tuple[Path, Path]] = []
    visited: set[str] = set()
    pending = [class_dir]
    while pending:
        directory = pending.pop()
        real_dir = os.path.realpath(directory)
        if real_dir in visited:
            continue
        visited.add(real_dir)
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            raise IngestError(f"{directory}: cannot list folder ({error.strerror or error})") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            is_image = path.suffix.lower() in extensions
            if not entry.is_symlink():
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                elif not is_image:
                    continue
                elif entry.is_file(follow_symlinks=False):
                    found.append((path, Path(real_dir) / entry.name))
                else:
                    mode = entry.stat(follow_symlinks=False).st_mode
                    raise IngestError(f"{path}: is {_kind(mode)}, not a regular file; refused")
                continue
            try:
                mode = os.stat(path).st_mode  # the link's target, inspected without opening it
            except OSError as error:
                if is_image:
                    raise IngestError(f"{path}: cannot read file ({error.strerror or error})") from None
                continue
            if not (is_image or stat.S_ISDIR(mode)):
                continue
            if is_image and not stat.S_ISREG(mode):
                raise IngestError(f"{path}: symbolic link to {_kind(mode)}, not a regular file; refused")
            real = Path(os.path.realpath(path))
            if not real.is_relative_to(root_real):
                raise _outside(path, real, root)
            if stat.S_ISDIR(mode):
                if not Path(real_dir).is_relative_to(real):  # a link to an ancestor is a loop: not followed
                    pending.append(path)
            else:
                found.append((path, real))
    return sorted(found)


def _folder_images(root: Path, config: Config) -> tuple[list[tuple[Path, Path, str]], list[str]]:
    """The image files under ``root`` as (path as listed, real path, label), checked; also the labels found."""
    if not root.exists():
        raise IngestError(f"{root}: source folder does not exist")
    if not root.is_dir():
        raise IngestError(f"{root}: source is not a folder")
    root_real = Path(os.path.realpath(root))
    extensions = image_extensions(config.ingest.image_formats)
    class_dirs: list[Path] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            real = Path(os.path.realpath(entry))
            if not real.is_relative_to(root_real):
                raise _outside(entry, real, root)
        if entry.is_dir():
            class_dirs.append(entry)
    if not class_dirs:
        raise IngestError(f"{root}: folder is empty (expected one sub-folder per class)")
    classes = set(config.dataset.classes)
    files: list[tuple[Path, Path, str]] = []
    for class_dir in class_dirs:
        if class_dir.name not in classes:
            raise IngestError(
                f"{class_dir}: label {class_dir.name!r} is not in dataset.classes {list(config.dataset.classes)}"
            )
        images = _class_images(class_dir, root, root_real, extensions)
        if not images:
            raise IngestError(f"{class_dir}: class folder holds no images ({', '.join(sorted(extensions))})")
        files.extend((path, real, class_dir.name) for path, real in images)
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
    extensions = image_extensions(config.ingest.image_formats)
    limit = config.ingest.max_file_bytes
    keys: list[tuple[str, str, int]] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                key = item["Key"]
                relative = PurePosixPath(key[len(prefix) :])
                if ".." in relative.parts or key.startswith("/"):
                    raise IngestError(f"s3://{bucket}/{key}: key contains '..' and is refused")
                if relative.suffix.lower() not in extensions or key.endswith("/"):
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
        raise IngestError(redact(f"{url}: cannot list S3 objects: {error}")) from None
    if not keys:
        raise IngestError(f"{url}: no images under this S3 prefix")
    for key, label, size in sorted(keys):
        origin = f"s3://{bucket}/{key}"
        if size > limit:
            raise IngestError(f"{origin}: object is {size} bytes, over ingest.max_file_bytes={limit}")
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                length = int(response.get("ContentLength") or 0)
                if length > limit:
                    raise IngestError(f"{origin}: object is {length} bytes, over ingest.max_file_bytes={limit}")
                data = read_bounded(body, limit, origin)
            finally:
                body.close()
        except (BotoCoreError, ClientError, OSError) as error:
            raise IngestError(redact(f"{origin}: cannot read object: {error}")) from None
        yield RawImage(origin=origin, label=label, data=data)


def read_source(source: str, config: Config) -> tuple[Iterator[RawImage], int | None]:
    """The raw images of ``source`` and, when known up front, how many there are."""
    if source == "sample":
        return _sample_images(config), 1797
    if source.startswith("folder:"):
        root = Path(source.removeprefix("folder:")).expanduser()
        files, _ = _folder_images(root, config)
        limit = config.ingest.max_file_bytes
        iterator = (
            RawImage(str(path), label, read_regular_file(real, limit, str(path))) for path, real, label in files
        )
        return iterator, len(files)
    if source.startswith("s3://"):
        return _s3_images(source, config), None
    raise IngestError(f"ingest.source: unknown source {source!r} (expected sample, folder:PATH or s3://bucket/prefix)")
