"""How this project talks to DVC: the project set-up, the remote, the lock, and running DVC commands.

Every DVC command runs as ``python -m dvc ...`` in a subprocess (:func:`run_dvc`). The command line is
DVC's stable interface (``dvc.repo.Repo`` is internal and changes between releases); a subprocess keeps
DVC's in-process state (caches, file-system instances, loggers, progress bars) out of the caller, whether
that is an Airflow task, the ``mlops`` command or a test session. In-process, this module only edits
``.dvc/config.local`` (through :class:`dvc.config.Config`); what DVC records about a data version
(``data.dvc``, the objects in the cache or the remote, ``data/`` against a version) is
:mod:`pipelines.data.dvc_objects`.

The remote, ``version.remote``, is a local folder (relative to the project root) or
``s3://bucket/prefix``. It is written to ``.dvc/config.local`` as the default remote ``mlops``, so the
committed ``.dvc/config`` stays machine-independent. For S3 the endpoint comes from
``$AWS_ENDPOINT_URL`` when set; credentials come only from the environment (boto's usual chain) and are
never written anywhere.

Concurrency: :func:`dvc_session` holds an exclusive lock on ``.dvc/tmp/mlops.lock`` for every DVC
operation (and the caller's version-log append); DVC's own lock errors (another ``dvc`` run by hand) are
retried with backoff.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pipelines.errors import VersioningError
from pipelines.files import LockTimeoutError, exclusive_lock
from pipelines.project import Project
from pipelines.tracking import redact

logger = logging.getLogger(__name__)

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

# ------------------------------------------------------------------------------------------ locking


@contextlib.contextmanager
def _project_lock(path: Path) -> Iterator[None]:
    """The project's DVC lock; a holder that keeps it too long is reported as a versioning error."""
    try:
        with exclusive_lock(path, timeout=LOCK_TIMEOUT_SECONDS, what="data versioning"):
            yield
    except LockTimeoutError as error:
        raise VersioningError(str(error)) from None


@contextlib.contextmanager
def dvc_session(project: Project) -> Iterator[Path]:
    """Make the root a DVC project with the configured remote, and hold the project's DVC lock."""
    root = project.root
    _check_layout(project)
    settings = _remote_settings(project)  # refuse a bad remote before setting anything up
    lock_path = root / ".dvc" / "tmp" / LOCK_NAME
    if not lock_path.exists():
        _initialise(root, lock_path)
    with _project_lock(lock_path):
        _configure(root, settings)
        yield root


def _initialise(root: Path, lock_path: Path) -> None:
    """Run ``dvc init`` once, even when several processes arrive at the same time.

    The lock file inside ``.dvc/tmp`` is created only once the project is fully set up, so its existence
    tells later runs that they can skip this step; until then, set-up is serialised by a lock at the root.
    """
    init_lock = root / INIT_LOCK_NAME
    with _project_lock(init_lock):
        if lock_path.exists():
            return
        if not (root / ".dvc").is_dir():
            git_top = _git_toplevel(root)
            if git_top is None:
                run_dvc(root, "init", "--no-scm")
            elif git_top == root.resolve():
                run_dvc(root, "init")
            else:
                run_dvc(root, "init", "--subdir")
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
            raise VersioningError(redact(f"version.remote {remote!r} names no bucket"))
        settings = {"url": remote}
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "").strip()
        if endpoint:
            settings["endpointurl"] = endpoint
        return settings
    if "://" in remote:
        raise VersioningError(
            redact(f"version.remote {remote!r}: only a local folder or an s3://bucket/prefix is supported")
        )
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
        raise VersioningError(redact(f"cannot configure the DVC remote: {error}")) from None


def remote_label(project: Project) -> str:
    """The remote as an error message names it: ``version.remote``, and the S3 endpoint when one is set (redacted)."""
    remote = project.config.version.remote.strip()
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "").strip()
    label = f"{remote!r} (endpoint {endpoint})" if remote.startswith("s3://") and endpoint else repr(remote)
    return redact(label)


def cache_dir(root: Path) -> Path:
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


def run_dvc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dvc ARGS`` in ``root``; retry while DVC's own lock is taken; raise on failure."""
    command = [sys.executable, "-m", "dvc", *args]
    for delay in (*DVC_LOCK_RETRY_DELAYS, None):
        result = subprocess.run(command, cwd=root, env=_dvc_env(), capture_output=True, text=True, check=False)
        if result.returncode == 0:
            logger.debug("dvc %s: %s", " ".join(args), redact(result.stdout.strip()))
            return result
        if _DVC_LOCK_MESSAGE in result.stderr and delay is not None:
            logger.info("DVC's lock is taken; retrying `dvc %s` in %.1f s", args[0], delay)
            time.sleep(delay)
            continue
        break
    raise VersioningError(redact(f"dvc {args[0]} failed: {_dvc_message(result.stderr, result.stdout)}"))
