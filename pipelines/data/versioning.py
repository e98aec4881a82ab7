"""Version ``data/`` with DVC, push it to the configured remote and restore any version from there.

The whole ``data/`` folder is one DVC output, tracked by ``data.dvc`` at the project root, so a data
version is the md5 of DVC's ``.dir`` object (32 hex characters). Versions are recorded in a JSON-lines
log (``version.log`` in ``params.yaml``), one line per new version.

How it talks to DVC: every DVC command runs as ``python -m dvc ...`` in a subprocess. The command line
is DVC's stable interface (``dvc.repo.Repo`` is internal and changes between releases); a subprocess
keeps DVC's in-process state (caches, file-system instances, loggers, progress bars) out of the caller,
whether that is an Airflow task, the ``mlops`` command or a test session. In-process, this module only
edits ``.dvc/config.local`` (through :class:`dvc.config.Config`) and reads ``data.dvc`` and the cache.

The remote, ``version.remote``, is a local folder (relative to the project root) or
``s3://bucket/prefix``. It is written to ``.dvc/config.local`` as the default remote ``mlops``, so the
committed ``.dvc/config`` stays machine-independent. For S3 the endpoint comes from
``$AWS_ENDPOINT_URL`` when set; credentials come only from the environment (boto's usual chain) and are
never written anywhere.

Concurrency: every DVC operation, and every append to the version log, happens under an exclusive
``fcntl.flock`` on ``.dvc/tmp/mlops.lock``; DVC's own lock errors (another ``dvc`` run by hand) are
retried with backoff.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import VersioningError
from pipelines.project import Project

logger = logging.getLogger(__name__)

DVC_FILE = "data.dvc"
"""DVC's pointer to ``data/``, at the project root."""

REMOTE_NAME = "mlops"
"""Name of the default remote written to ``.dvc/config.local``."""

LOCK_NAME = "mlops.lock"
"""Lock file, inside ``.dvc/tmp/`` (which DVC keeps out of git)."""

INIT_LOCK_NAME = ".mlops-dvc.lock"
"""Short-lived lock file at the project root, held only while the DVC project is being set up."""

LOCK_TIMEOUT_SECONDS = 3600.0
"""How long to wait for another process's DVC operation before giving up."""

DVC_LOCK_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Backoff, in seconds, when DVC reports its own lock as taken."""

_DVC_LOCK_MESSAGE = "Unable to acquire lock"
_VERSION_PATTERN = re.compile(r"[0-9a-f]{32}")


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
    with _dvc_session(project) as root:
        _run_dvc(root, "add", "data")
        version, files, size = _read_dvc_file(root / DVC_FILE)
        _run_dvc(root, "push", DVC_FILE)
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
    return _read_dvc_file(dvc_file)[0]


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
    wanted = _parse_version(version)
    with _dvc_session(project) as root:
        dvc_file = root / DVC_FILE
        previous = dvc_file.read_bytes() if dvc_file.exists() else None
        _write_atomic(dvc_file, _dvc_file_text(previous, wanted))
        try:
            _run_dvc(root, "fetch", DVC_FILE)
            missing = _missing_objects(root, wanted)
            remote = project.config.version.remote
            if missing == [f"{wanted}.dir"]:
                raise VersioningError(f"unknown data version {wanted}: it is not in the remote {remote!r}")
            if missing:
                raise VersioningError(
                    f"data version {wanted} is incomplete in the remote {remote!r}:"
                    f" {len(missing)} file object(s) missing, e.g. {missing[0]}"
                )
            _run_dvc(root, "checkout", "--force", DVC_FILE)
        except BaseException as error:
            _restore_dvc_file(dvc_file, previous)
            if not isinstance(error, VersioningError) or wanted in str(error):
                raise
            raise VersioningError(f"cannot restore data version {wanted}: {error}") from None
        files, size = _count_files(project.data_dir)
        _write_atomic(dvc_file, _dvc_file_text(previous, wanted, files=files, size=size))
    for logged in _read_log(_log_path(project)):
        if logged.version == wanted:
            return logged
    return DataVersion(version=wanted, files=files, bytes=size, source="", created_at="")


# ------------------------------------------------------------------------------------------ locking


@contextlib.contextmanager
def _flock(path: Path, timeout: float = LOCK_TIMEOUT_SECONDS) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed), polling up to ``timeout`` seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise VersioningError(
                        f"another data versioning run has held {path} for over {timeout:.0f} s"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def _dvc_session(project: Project) -> Iterator[Path]:
    """Make the root a DVC project with the configured remote, and hold the project's DVC lock."""
    root = project.root
    _check_layout(project)
    settings = _remote_settings(project)  # refuse a bad remote before setting anything up
    lock_path = root / ".dvc" / "tmp" / LOCK_NAME
    if not lock_path.exists():
        _initialise(root, lock_path)
    with _flock(lock_path):
        _configure(root, settings)
        yield root


def _initialise(root: Path, lock_path: Path) -> None:
    """Run ``dvc init`` once, even when several processes arrive at the same time.

    The lock file inside ``.dvc/tmp`` is created only once the project is fully set up, so its existence
    tells later runs that they can skip this step; until then, set-up is serialised by a lock at the root.
    """
    init_lock = root / INIT_LOCK_NAME
    with _flock(init_lock):
        if lock_path.exists():
            return
        if not (root / ".dvc").is_dir():
            git_top = _git_toplevel(root)
            if git_top is None:
                _run_dvc(root, "init", "--no-scm")
            elif git_top == root.resolve():
                _run_dvc(root, "init")
            else:
                _run_dvc(root, "init", "--subdir")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock_path.touch()
        # Safe while held: whoever waits on this file re-checks lock_path, which now exists.
        init_lock.unlink(missing_ok=True)


def _git_toplevel(root: Path) -> Path | None:
    """The top of the git work tree holding ``root``, or None (no git, or not in a work tree)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    if result.returncode != 0 or not result.stdout.strip():
        return None
    return Path(result.stdout.strip()).resolve()


# ------------------------------------------------------------------------------------ configuration


def _check_layout(project: Project) -> None:
    """Refuse a remote or version log inside ``data/``: DVC would version them with the data."""
    data_dir = project.data_dir.resolve()
    remote = project.config.version.remote
    inside = [("version.log", project.path(project.config.version.log))]
    if "://" not in remote:
        inside.append(("version.remote", project.path(remote)))
    for key, path in inside:
        if path.resolve().is_relative_to(data_dir):
            raise VersioningError(f"{key} ({path}) must not be inside {project.data_dir}")


def _remote_settings(project: Project) -> dict[str, str]:
    """The ``remote "mlops"`` section for ``.dvc/config.local``: url, and endpoint for S3."""
    remote = project.config.version.remote.strip()
    if not remote:
        raise VersioningError("version.remote is empty: set a folder or an s3://bucket/prefix")
    if remote.startswith("s3://"):
        if len(remote) <= len("s3://") or remote[len("s3://")] == "/":
            raise VersioningError(f"version.remote {remote!r} names no bucket")
        settings = {"url": remote}
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "").strip()
        if endpoint:
            settings["endpointurl"] = endpoint
        return settings
    if "://" in remote:
        raise VersioningError(f"version.remote {remote!r}: only a local folder or an s3://bucket/prefix is supported")
    return {"url": str(project.path(remote).resolve())}


def _configure(root: Path, settings: dict[str, str]) -> None:
    """Write the default remote and DVC's switches to ``.dvc/config.local`` (never the committed config)."""
    from dvc.config import Config, ConfigError

    try:
        config = Config(dvc_dir=str(root / ".dvc"), validate=False)
        with config.edit("local") as local:
            local["core"]["remote"] = REMOTE_NAME
            local["core"]["analytics"] = "false"
            local["core"]["autostage"] = "false"
            local["remote"][REMOTE_NAME] = settings  # replaces the whole section: no stale keys
    except ConfigError as error:
        raise VersioningError(f"cannot configure the DVC remote: {error}") from None


def _cache_dir(root: Path) -> Path:
    """The local DVC cache folder (``cache.dir`` from DVC's configuration, else ``.dvc/cache``)."""
    from dvc.config import Config

    configured = Config(dvc_dir=str(root / ".dvc"), validate=False).get("cache", {}).get("dir")
    return Path(str(configured)) if configured else root / ".dvc" / "cache"


# ---------------------------------------------------------------------------------------- running DVC


def _dvc_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("DVC_SHOW_TRACEBACK", None)
    return env


def _dvc_message(stderr: str, stdout: str) -> str:
    """DVC's error lines, without the ``ERROR:`` prefixes, the support blurb or any traceback."""
    lines = stderr.splitlines()
    starts = [index for index, line in enumerate(lines) if line.startswith("ERROR:")]
    lines = lines[starts[0] :] if starts else (lines or stdout.splitlines())[-5:]
    kept = []
    for line in lines:
        if line.startswith("Having any troubles?") or line.startswith("Traceback ("):
            break
        if line.strip():
            kept.append(line.removeprefix("ERROR: ").strip())
    return "\n".join(kept) or "no error message"


def _run_dvc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dvc ARGS`` in ``root``; retry while DVC's own lock is taken; raise on failure."""
    command = [sys.executable, "-m", "dvc", *args]
    for delay in (*DVC_LOCK_RETRY_DELAYS, None):
        result = subprocess.run(command, cwd=root, env=_dvc_env(), capture_output=True, text=True, check=False)
        if result.returncode == 0:
            logger.debug("dvc %s: %s", " ".join(args), result.stdout.strip())
            return result
        if _DVC_LOCK_MESSAGE in result.stderr and delay is not None:
            logger.info("DVC's lock is taken; retrying `dvc %s` in %.1f s", args[0], delay)
            time.sleep(delay)
            continue
        break
    raise VersioningError(f"dvc {args[0]} failed: {_dvc_message(result.stderr, result.stdout)}")


# ------------------------------------------------------------------------------------------ data.dvc


def _parse_version(version: str) -> str:
    """Normalise ``version`` (case, surrounding blanks, a ``.dir`` suffix) or refuse it."""
    text = str(version).strip().lower().removesuffix(".dir")
    if not _VERSION_PATTERN.fullmatch(text):
        raise VersioningError(f"not a data version: {version!r} (expected 32 hex characters)")
    return text


def _read_dvc_file(path: Path) -> tuple[str, int, int]:
    """The version, file count and byte count recorded in ``data.dvc``."""
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
        out = content["outs"][0]
        md5 = str(out["md5"])
        files, size = int(out.get("nfiles", 0)), int(out.get("size", 0))
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError, ValueError) as error:
        raise VersioningError(f"{path}: not a DVC file for data/ ({error})") from None
    if not md5.endswith(".dir"):
        raise VersioningError(f"{path}: tracks a single file, not the data/ folder")
    return _parse_version(md5), files, size


def _dvc_file_text(previous: bytes | None, version: str, files: int = 0, size: int = 0) -> str:
    """``data.dvc`` for ``version``, keeping any extra settings of the previous one (e.g. ``remote``)."""
    out: dict[str, Any] = {}
    document: dict[str, Any] = {}
    if previous is not None:
        with contextlib.suppress(yaml.YAMLError, UnicodeDecodeError):
            loaded = yaml.safe_load(previous.decode("utf-8"))
            if isinstance(loaded, dict) and isinstance(loaded.get("outs"), list) and len(loaded["outs"]) == 1:
                document = loaded
                if isinstance(loaded["outs"][0], dict):
                    out = dict(loaded["outs"][0])
    for key in ("md5", "size", "nfiles", "hash", "path"):
        out.pop(key, None)
    entry: dict[str, Any] = {"md5": f"{version}.dir"}
    if files:
        entry.update(size=size, nfiles=files)
    entry.update(hash="md5", path="data", **out)
    document = {**document, "outs": [entry]}
    return yaml.safe_dump(document, sort_keys=False)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then move it into place."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _restore_dvc_file(path: Path, previous: bytes | None) -> None:
    if previous is None:
        path.unlink(missing_ok=True)
    else:
        _write_atomic(path, previous.decode("utf-8"))


def _missing_objects(root: Path, version: str) -> list[str]:
    """Objects of ``version`` absent from the local cache (after a fetch: absent from the remote too)."""
    objects = _cache_dir(root) / "files" / "md5"
    dir_object = objects / version[:2] / f"{version[2:]}.dir"
    if not dir_object.is_file():
        return [f"{version}.dir"]
    try:
        entries = json.loads(dir_object.read_text(encoding="utf-8"))
        digests = [str(entry["md5"]) for entry in entries]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise VersioningError(f"data version {version}: unreadable directory object ({error})") from None
    return [digest for digest in digests if not (objects / digest[:2] / digest[2:]).is_file()]


def _count_files(folder: Path) -> tuple[int, int]:
    """Number of files under ``folder`` and their total size in bytes."""
    files = size = 0
    for directory, _, names in os.walk(folder):
        for name in names:
            files += 1
            size += os.stat(os.path.join(directory, name)).st_size
    return files, size


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
                    version=_parse_version(record["version"]),
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
