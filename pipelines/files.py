"""Writing files so that a reader never sees half of one, and holding a lock across processes.

* :func:`write_atomic` / :func:`write_json_atomic`: the content goes to a temporary file in the same folder,
  is flushed to disk, then renamed over the target, so the target is always the old or the new whole file;
* :func:`exclusive_lock`: an ``fcntl.flock`` on a lock file, waited for up to a timeout, released when the
  block ends or the process dies (the kernel drops it), so a killed holder never leaves a stale lock.

Only the standard library is imported: this module is safe to use at DAG parse time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError

DEFAULT_LOCK_TIMEOUT_SECONDS = 3600.0


class LockTimeoutError(PipelineError):
    """Another process held a lock for longer than the caller was willing to wait."""

    retryable = True


def write_atomic(path: Path, content: str | bytes) -> None:
    """Replace ``path`` by ``content`` atomically (temporary file beside it, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content.encode("utf-8") if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON with sorted keys (reproducible bytes), atomically."""
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def exclusive_lock(
    path: Path, *, timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS, what: str = "this operation"
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed), polling for up to ``timeout`` seconds.

    Raises:
        LockTimeoutError: the lock was not free within ``timeout`` (the message names ``path`` and ``what``).
    """
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
                    raise LockTimeoutError(
                        f"{path}: another process has held this lock for over {timeout:.0f} s ({what})"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
