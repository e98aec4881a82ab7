"""Version ``data/`` with DVC, push it to the configured remote and restore any version from there.

The whole ``data/`` folder is one DVC output, tracked by ``data.dvc`` at the project root, so a data
version is the md5 of DVC's ``.dir`` object (32 hex characters). Versions are recorded in a JSON-lines
log (``version.log`` in ``params.yaml``), one line per new version. How DVC is run, configured and locked
is :mod:`pipelines.data.dvc`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.data.dvc import (
    DVC_FILE,
    count_files,
    dvc_file_text,
    dvc_session,
    missing_objects,
    parse_version,
    read_dvc_file,
    restore_dvc_file,
    run_dvc,
)
from pipelines.errors import VersioningError
from pipelines.files import write_atomic
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


# --------------------------------------------------------------------------------------------- public


def version_data(project: Project, source: str = "") -> DataVersion:
    """Version ``data/`` as a whole with DVC, push it to the remote and record it in the version log.

    Sets the project up as a DVC project when needed (``dvc init``, ``--no-scm`` outside a git work
    tree), points the default remote at ``version.remote``, then runs ``dvc add data`` and
    ``dvc push``. Unchanged data gives the same version and no new log entry: the returned value is
    then the logged record, with ``is_new`` False.

    Raises:
        VersioningError: ``data/`` is missing or empty, or a DVC command failed (with DVC's message).
    """
    data_dir = project.data_dir
    if not data_dir.is_dir():
        raise VersioningError(f"nothing to version: {data_dir} does not exist (run ingest first)")
    if not any(path.is_file() for path in data_dir.rglob("*")):
        raise VersioningError(f"nothing to version: {data_dir} holds no files (run ingest first)")
    log_path = _log_path(project)
    with dvc_session(project) as root:
        run_dvc(root, "add", "data")
        version, files, size = read_dvc_file(root / DVC_FILE)
        run_dvc(root, "push", DVC_FILE)
        for logged in _read_log(log_path):
            if logged.version == version:
                logger.info("data version %s unchanged (%d files)", version, files)
                return logged
        created = DataVersion(
            version=version,
            files=files,
            bytes=size,
            source=source,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            is_new=True,
        )
        _append_log(log_path, created)
    logger.info("new data version %s: %d files, %d bytes", version, files, size)
    return created


def current_version(project: Project) -> str:
    """The data version ``data.dvc`` points at, or ``""`` when ``data/`` was never versioned.

    This reads ``data.dvc`` only (no DVC command): it is what the last :func:`version_data` or
    :func:`checkout_data` left in the workspace, not a check of ``data/`` edited since.

    Raises:
        VersioningError: ``data.dvc`` exists but is not a DVC file for the ``data/`` folder.
    """
    dvc_file = project.root / DVC_FILE
    if not dvc_file.exists():
        return ""
    return read_dvc_file(dvc_file)[0]


def list_versions(project: Project) -> list[DataVersion]:
    """The recorded data versions, oldest first (``is_new`` is False for all of them)."""
    return _read_log(_log_path(project))


def checkout_data(project: Project, version: str) -> DataVersion:
    """Restore exactly the files of data ``version`` into ``data/`` from the remote.

    Needs no git history: ``data.dvc`` is rewritten to point at ``<version>.dir``, the version is
    fetched and checked out with ``--force`` (files that are not part of it are removed). When the
    version is in neither the local cache nor the remote, ``data.dvc`` is put back as it was and
    ``data/`` is not touched. Returns the logged record of the version when there is one, otherwise
    one with the restored counts and an empty ``source`` and ``created_at``.

    Raises:
        VersioningError: ``version`` is not 32 hex characters (checked before anything is touched),
            the version is unknown, or a DVC command failed.
    """
    wanted = parse_version(version)
    with dvc_session(project) as root:
        dvc_file = root / DVC_FILE
        previous = dvc_file.read_bytes() if dvc_file.exists() else None
        write_atomic(dvc_file, dvc_file_text(previous, wanted))
        try:
            run_dvc(root, "fetch", DVC_FILE)
            missing = missing_objects(root, wanted)
            remote = project.config.version.remote
            if missing == [f"{wanted}.dir"]:
                raise VersioningError(f"unknown data version {wanted}: it is not in the remote {remote!r}")
            if missing:
                raise VersioningError(
                    f"data version {wanted} is incomplete in the remote {remote!r}:"
                    f" {len(missing)} file object(s) missing, e.g. {missing[0]}"
                )
            run_dvc(root, "checkout", "--force", DVC_FILE)
        except BaseException as error:
            restore_dvc_file(dvc_file, previous)
            if not isinstance(error, VersioningError) or wanted in str(error):
                raise
            raise VersioningError(f"cannot restore data version {wanted}: {error}") from None
        files, size = count_files(project.data_dir)
        write_atomic(dvc_file, dvc_file_text(previous, wanted, files=files, size=size))
    for logged in _read_log(_log_path(project)):
        if logged.version == wanted:
            return logged
    return DataVersion(version=wanted, files=files, bytes=size, source="", created_at="")


# ---------------------------------------------------------------------------------------- version log


def _log_path(project: Project) -> Path:
    return project.path(project.config.version.log)


def _read_log(path: Path) -> list[DataVersion]:
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


def _append_log(path: Path, version: DataVersion) -> None:
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


def restore_workspace(project: Project) -> str:
    """Put ``data/`` back to the version ``data.dvc`` records (after a failed run); return that version."""
    version = current_version(project)
    if version:
        checkout_data(project, version)
    return version
