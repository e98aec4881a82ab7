"""The data version log: one JSON line per version of ``data/`` pushed to the remote, oldest first.

The log (``version.log`` in ``params.yaml``) is appended to only after a successful ``dvc push``
(:func:`~pipelines.data.versioning.version_data`), under the project's DVC lock; it is what lineage is
checked against (:mod:`pipelines.data.lineage`). A torn or foreign line is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.data.dvc_objects import parse_version
from pipelines.errors import VersioningError
from pipelines.project import Project

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataVersion:
    """One version of ``data/``: DVC's directory md5, its size, where it came from and when."""

    version: str
    """The md5 of DVC's ``.dir`` object, 32 hex characters, without ``.dir``."""
    files: int
    bytes: int
    source: str
    """Where the data came from (e.g. the ingest source); empty when unknown."""
    created_at: str
    """When this version was first recorded (ISO 8601, UTC); empty when unknown."""
    is_new: bool = False
    """True only for the call that added this version to the log."""

    def record(self) -> dict[str, Any]:
        """The version-log record (everything but ``is_new``)."""
        return {
            "version": self.version,
            "files": self.files,
            "bytes": self.bytes,
            "source": self.source,
            "created_at": self.created_at,
        }


def version_log_path(project: Project) -> Path:
    """The version log's path (``version.log`` in ``params.yaml``, relative to the project root)."""
    return project.path(project.config.version.log)


def read_log(path: Path) -> list[DataVersion]:
    """The log's records; a torn or foreign line is skipped with a warning, never fatal."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise VersioningError(f"cannot read the data version log {path}: {error.strerror}") from None
    versions = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            versions.append(
                DataVersion(
                    version=parse_version(record["version"]),
                    files=int(record["files"]),
                    bytes=int(record["bytes"]),
                    source=str(record.get("source", "")),
                    created_at=str(record.get("created_at", "")),
                )
            )
        except (ValueError, KeyError, TypeError, VersioningError):
            logger.warning("%s:%d: skipping a line that is not a data version record", path, number)
    return versions


def append_log(path: Path, version: DataVersion) -> None:
    """Append one record as a single write, flushed and fsynced (the caller holds the DVC lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(version.record(), sort_keys=False) + "\n"
    with path.open("a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                line = "\n" + line  # a previous write was torn: keep records on their own lines
        handle.write(line.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
