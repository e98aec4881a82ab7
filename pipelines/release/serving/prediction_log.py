"""The prediction log and the feedback it collects: what was served, what was fed back, which images are kept.

One JSON line per request and per feedback, bounded whatever the input (at most
``serve.max_images_per_request`` image summaries of fixed fields; never the image itself)::

    {"kind": "prediction", "request_id": "…", "time": "2026-…Z", "model": "…", "model_version": "3",
     "input": "multipart", "images": [{"sha256": "…", "mean": 0.13, "std": 0.29, "class": "7", "confidence": 0.98}]}
    {"kind": "feedback", "request_id": "…", "time": "…", "image_index": 0, "label": "7", "image_kept": true}

``mean`` and ``std`` are over the model input's pixel values in [0, 1] (the measure of
:mod:`pipelines.data.profile`), ``sha256`` is that of the normalised PNG. Each process appends to its own
``current-<host>-<pid>.jsonl`` and rotates it to ``predictions-<UTC time>-<host>-<pid>.jsonl`` when it
reaches ``serve.log_max_bytes`` or is ``serve.log_rotate_seconds`` old. In a folder (``artifacts/predictions``
by default) the newest ``serve.log_max_files`` rotated files are kept; with ``serve.log_uri: s3://bucket/prefix``
the current file is spooled under ``artifacts/predictions-spool`` and each rotated file is uploaded (boto3,
credentials and endpoint from the environment) on a background thread, then deleted. ``MLOPS_SERVE_LOG_URI``
overrides ``serve.log_uri`` (the replicas and the monitor of a scaled-out deployment share one S3 prefix).

Feedback images: the normalised PNGs of the last ``serve.feedback_requests`` requests are held in memory
(:class:`HeldImages`); a feedback that opts in stores its image as ``<serve.feedback_uri>/<label>/<sha256>.png``,
the class-folder layout ingest reads (:mod:`pipelines.data.feedback`; ``MLOPS_SERVE_FEEDBACK_URI`` overrides it).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.data.feedback import feedback_uri
from pipelines.errors import PipelineError
from pipelines.files import write_atomic
from pipelines.project import Project

LOG_URI_ENV = "MLOPS_SERVE_LOG_URI"
CURRENT_PREFIX = "current-"
ROTATED_PREFIX = "predictions-"
SUFFIX = ".jsonl"
SPOOL_DIR = "predictions-spool"
FLUSH_SECONDS = 1.0
"""Records reach the file at most this long after they are written (one flush per request costs a syscall)."""


class LogError(PipelineError):
    """The prediction log cannot be read (a missing S3 bucket, unreadable folder)."""

    retryable = True


def log_uri(project: Project) -> str:
    """Where the prediction log lives: ``$MLOPS_SERVE_LOG_URI``, else ``serve.log_uri``."""
    return os.environ.get(LOG_URI_ENV, "").strip() or project.config.serve.log_uri


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, prefix ending with ``/`` or empty) of ``s3://bucket/prefix``."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise PipelineError(f"{uri}: no bucket in the S3 URI")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def now_iso() -> str:
    """The current UTC time, ISO 8601 with milliseconds and ``Z`` (what every record's ``time`` holds)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """A record's ``time`` as an aware UTC datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _writer_name() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{socket.gethostname()}-{os.getpid()}")


class PredictionLog:
    """The rotating JSON-lines log of this process (thread-safe; appends are one short write each)."""

    def __init__(self, project: Project) -> None:
        settings = project.config.serve
        self._uri = log_uri(project)
        self._s3 = self._uri.startswith("s3://")
        self._folder = project.artifacts_dir / SPOOL_DIR if self._s3 else project.path(self._uri)
        self._max_bytes = settings.log_max_bytes
        self._max_files = settings.log_max_files
        self._rotate_seconds = settings.log_rotate_seconds
        self._name = _writer_name()
        self._lock = threading.Lock()
        self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlops-log-upload") if self._s3 else None
        self._pending: list[Future[None]] = []
        self._folder.mkdir(parents=True, exist_ok=True)
        self._current = self._folder / f"{CURRENT_PREFIX}{self._name}{SUFFIX}"
        self._handle = self._current.open("a", encoding="utf-8")
        self._size = self._current.stat().st_size
        self._opened = time.monotonic()
        self._flushed = self._opened
        self.upload_errors: list[str] = []

    @property
    def uri(self) -> str:
        """Where the log goes (a folder or an S3 prefix)."""
        return self._uri

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line (on disk within :data:`FLUSH_SECONDS`); rotate when full or old."""
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"
        with self._lock:
            self._handle.write(line)
            self._size += len(line.encode("utf-8"))
            now = time.monotonic()
            if self._size >= self._max_bytes or now - self._opened >= self._rotate_seconds:
                self._rotate()
            elif now - self._flushed >= FLUSH_SECONDS:
                self._flush(now)

    def _flush(self, now: float) -> None:
        self._handle.flush()
        self._flushed = now

    def maybe_rotate(self) -> None:
        """Flush, and rotate a non-empty file older than ``serve.log_rotate_seconds`` (called periodically)."""
        with self._lock:
            now = time.monotonic()
            if self._size and now - self._opened >= self._rotate_seconds:
                self._rotate()
            else:
                self._flush(now)

    def _rotate(self) -> None:
        self._handle.close()
        if self._size:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            rotated = self._folder / f"{ROTATED_PREFIX}{stamp}-{self._name}{SUFFIX}"
            self._current.rename(rotated)
            if self._uploads is not None:
                self._pending = [future for future in self._pending if not future.done()]
                self._pending.append(self._uploads.submit(self._upload, rotated))
            else:
                self._prune()
        self._handle = self._current.open("a", encoding="utf-8")
        self._size = 0
        self._opened = time.monotonic()

    def _prune(self) -> None:
        rotated = sorted(self._folder.glob(f"{ROTATED_PREFIX}*{SUFFIX}"))
        for old in rotated[: max(len(rotated) - self._max_files, 0)]:
            old.unlink(missing_ok=True)

    def _upload(self, path: Path) -> None:
        import boto3

        from pipelines.tracking import redact

        bucket, prefix = split_s3(self._uri)
        try:
            boto3.client("s3").upload_file(str(path), bucket, f"{prefix}{path.name}")
        except Exception as error:  # kept locally for the next attempt; never crash the service for the log
            self.upload_errors.append(redact(f"{path.name} -> {self._uri}: {type(error).__name__}: {error}"))
            return
        path.unlink(missing_ok=True)

    def close(self) -> None:
        """Rotate what is left (an S3 log uploads it, and retries uploads that failed) and wait for the uploads."""
        with self._lock:
            self._rotate()
            self._handle.close()
        if self._uploads is not None:
            self._uploads.shutdown(wait=True)
            for leftover in sorted(self._folder.glob(f"{ROTATED_PREFIX}*{SUFFIX}")):
                self._upload(leftover)
        if self._current.exists() and self._current.stat().st_size == 0:
            self._current.unlink(missing_ok=True)


@dataclass(frozen=True)
class LogWindow:
    """The records of one time window of the log, newest last, and what could not be read."""

    records: list[dict[str, Any]]
    files: int
    malformed: int
    truncated: bool = False
    sources: list[str] = field(default_factory=list)


def _parse_lines(lines: Iterator[str], since: datetime, into: list[dict[str, Any]]) -> int:
    """Append the records at or after ``since``; return how many lines were malformed."""
    malformed = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or parse_time(str(record["time"])) < since:
                continue
        except (ValueError, KeyError, TypeError):
            malformed += 1  # e.g. the half-written last line of a file a service is appending to
            continue
        into.append(record)
    return malformed


def read_records(project: Project, since: datetime, limit: int) -> LogWindow:
    """The log records written at or after ``since`` (UTC), at most ``limit`` of them (the newest)."""
    uri = log_uri(project)
    if uri.startswith("s3://"):
        return _read_s3(project, uri, since, limit)
    folder = project.path(uri)
    if not folder.is_dir():
        return LogWindow([], 0, 0)
    files = [path for path in folder.glob(f"*{SUFFIX}") if path.stat().st_mtime >= since.timestamp()]
    files.sort(key=lambda path: path.stat().st_mtime, reverse=True)
    chunks: list[list[dict[str, Any]]] = []
    malformed = 0
    for path in files:
        if sum(len(chunk) for chunk in chunks) >= limit:
            break
        chunk: list[dict[str, Any]] = []
        try:
            with path.open(encoding="utf-8", errors="replace") as handle:
                malformed += _parse_lines(iter(handle), since, chunk)
        except FileNotFoundError:  # rotated away while listing
            continue
        chunks.append(chunk)
    return _window(chunks, malformed, limit, [str(path) for path in files[: len(chunks)]])


def _window(chunks: list[list[dict[str, Any]]], malformed: int, limit: int, sources: list[str]) -> LogWindow:
    """The records of ``chunks`` (one per file, newest file first) oldest first, at most the newest ``limit``."""
    records = [record for chunk in reversed(chunks) for record in chunk]
    records.sort(key=lambda record: str(record.get("time", "")))  # stable: equal times keep the files' order
    truncated = len(records) > limit
    return LogWindow(records[-limit:] if truncated else records, len(chunks), malformed, truncated, sources)


def _read_s3(project: Project, uri: str, since: datetime, limit: int) -> LogWindow:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    from pipelines.tracking import redact

    bucket, prefix = split_s3(uri)
    client = boto3.client("s3")
    bound = 4 * project.config.serve.log_max_bytes
    chunks: list[list[dict[str, Any]]] = []
    malformed = 0
    try:
        objects = [
            item
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])
            if item["Key"].endswith(SUFFIX) and item["LastModified"] >= since
        ]
        objects.sort(key=lambda item: (item["LastModified"], item["Key"]), reverse=True)
        for item in objects:
            if sum(len(chunk) for chunk in chunks) >= limit:
                break
            chunk: list[dict[str, Any]] = []
            if int(item.get("Size", 0)) <= bound:
                body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"]
                try:
                    text = body.read(bound + 1).decode("utf-8", errors="replace")
                finally:
                    body.close()
                malformed += _parse_lines(iter(text.splitlines()), since, chunk)
            else:
                malformed += 1
            chunks.append(chunk)
    except (BotoCoreError, ClientError) as error:
        raise LogError(redact(f"{uri}: cannot read the prediction log: {error}")) from None
    return _window(chunks, malformed, limit, [f"s3://{bucket}/{item['Key']}" for item in objects[: len(chunks)]])


@dataclass(frozen=True)
class HeldImage:
    """A normalised image held for feedback: its PNG, hash and predicted class."""

    png: bytes
    sha256: str
    predicted: str


class HeldImages:
    """The images of the last ``capacity`` requests, by request id (least recently used dropped first)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._requests: OrderedDict[str, tuple[str, list[HeldImage]]] = OrderedDict()
        self._lock = threading.Lock()

    def hold(self, request_id: str, version: str, images: list[HeldImage]) -> None:
        """Keep the images of ``request_id`` (served by ``version``)."""
        if self._capacity == 0:
            return
        with self._lock:
            self._requests[request_id] = (version, images)
            while len(self._requests) > self._capacity:
                self._requests.popitem(last=False)

    def get(self, request_id: str) -> tuple[str, list[HeldImage]] | None:
        """(version, images) of ``request_id``, or None when it is unknown or was dropped."""
        with self._lock:
            return self._requests.get(request_id)


def store_feedback_image(project: Project, label: str, image: HeldImage) -> str:
    """Store an opted-in image as ``<feedback uri>/<label>/<sha256>.png``; return where it went."""
    uri = feedback_uri(project)
    name = f"{label}/{image.sha256}.png"
    if uri.startswith("s3://"):
        import boto3

        bucket, prefix = split_s3(uri)
        boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}{name}", Body=image.png, ContentType="image/png")
        return f"s3://{bucket}/{prefix}{name}"
    target = project.path(uri) / name
    write_atomic(target, image.png)
    return str(target)
