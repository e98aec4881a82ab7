"""Where ingest and augment prepare their output, and how it replaces what is under ``data/``.

Each run works in its own folder, ``artifacts/staging/<dataset>/<kind>-<pid>-<random>/`` (outside
``data/``, so DVC never sees half a run), holding ``new/`` (what the run wrote) and, while it publishes,
``old/`` (what it replaced). Every run that changes ``data/<dataset>/`` holds the dataset's lock
(``artifacts/dataset-<dataset>.lock``, an ``flock`` the kernel drops when the holder dies) from start
to end, so:

* two runs on one dataset never interleave: the second waits, then works on the first one's result;
* a staging folder found by a run that holds the lock belongs to a run that is gone (killed, out of
  disk, crashed) and is removed by that run: nothing is left behind after the next run.

Publishing is a sequence of renames recorded first in ``journal.json`` beside ``new/``. A run killed
between two of those renames (the only moment ``data/`` is not the old or the new whole) left a journal:
the next run finishes the publication (every staged file was complete before the journal was written),
then removes the folder. Without a journal the staged output is incomplete and simply removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from pipelines.errors import PipelineError
from pipelines.files import exclusive_lock, write_json_atomic
from pipelines.project import Project

logger = logging.getLogger(__name__)

JOURNAL_NAME = "journal.json"
"""File, in a staging folder, listing the renames of its publication; written once staging is complete."""

LOCK_TIMEOUT_SECONDS = 3600.0
"""How long a run waits for another run on the same dataset before giving up (retryable)."""


def dataset_lock_path(project: Project) -> Path:
    """The lock every run changing ``data/<dataset>/`` holds: ``artifacts/dataset-<dataset>.lock``."""
    return project.artifacts_dir / f"dataset-{project.config.dataset.name}.lock"


def staging_root(project: Project) -> Path:
    """The folder of the dataset's staging folders: ``artifacts/staging/<dataset>/``."""
    return project.staging_dir / project.config.dataset.name


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    """Remove a file, link or folder tree if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif _exists(path):
        path.unlink()


class StagingArea:
    """One run's private staging folder: write under :attr:`new`, then :meth:`publish`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def new(self) -> Path:
        """Where the run writes its output (named entries, published by :meth:`publish`)."""
        return self.folder / "new"

    @property
    def old(self) -> Path:
        """Where publication moves what it replaces, until the folder is removed."""
        return self.folder / "old"

    def write(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` (a file under :attr:`new`), creating its folder."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def publish(self, entries: Sequence[tuple[str, Path]]) -> None:
        """Move each staged ``new/<name>`` onto its target, in order; a name not staged removes its target.

        Raises :class:`PipelineError` naming the paths if a rename fails; the entry being moved is put back.
        """
        journal = [
            {"name": name, "target": str(target), "remove": not _exists(self.new / name)} for name, target in entries
        ]
        write_json_atomic(self.folder / JOURNAL_NAME, journal)
        try:
            _roll_forward(self.folder, journal)
        except OSError as error:
            (self.folder / JOURNAL_NAME).unlink(missing_ok=True)
            raise PipelineError(
                f"{error.filename or self.folder}: cannot move the staged output into place "
                f"({error.strerror or error}); the previous data was kept"
            ) from None


def _roll_forward(folder: Path, journal: list[dict[str, object]]) -> None:
    """Carry out (or finish) the renames of ``journal``; each step is skipped when already done."""
    for entry in journal:
        name, target = str(entry["name"]), Path(str(entry["target"]))
        new, old = folder / "new" / name, folder / "old" / name
        if entry.get("remove"):
            if _exists(target):
                old.parent.mkdir(parents=True, exist_ok=True)
                _remove(old)
                os.replace(target, old)
            continue
        if not _exists(new):
            continue  # moved in by an earlier attempt
        if new.is_dir() and _exists(target):
            old.parent.mkdir(parents=True, exist_ok=True)
            _remove(old)
            os.replace(target, old)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(new, target)
        except OSError:
            if _exists(old) and not _exists(target):
                os.replace(old, target)
            raise


def _read_journal(folder: Path) -> list[dict[str, object]] | None:
    try:
        journal = json.loads((folder / JOURNAL_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return journal if isinstance(journal, list) and all(isinstance(entry, dict) for entry in journal) else None


def clear_stale(project: Project) -> list[str]:
    """Finish or remove the staging folders of runs that are gone; return what was done, one line each.

    Call only while holding :func:`dataset_lock`: any staging folder of the dataset is then stale.
    """
    done: list[str] = []
    root = staging_root(project)
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        journal = _read_journal(folder) if folder.is_dir() else None
        try:
            if journal is not None:
                _roll_forward(folder, journal)
                done.append(f"{folder}: finished the publication of an interrupted run")
            _remove(folder)
        except OSError as error:
            raise PipelineError(
                f"{folder}: cannot finish or remove the staging folder of an earlier run "
                f"({error.strerror or error}); look at it, then remove it by hand"
            ) from None
        done.append(f"{folder}: removed the staging folder of a run that is gone")
    for legacy in (project.dataset_dir / ".augmented.tmp", project.dataset_dir / ".augmented.old"):
        if _exists(legacy):
            _remove(legacy)
            done.append(f"{legacy}: removed a staging folder left inside data/ by an earlier version")
    return done


@contextlib.contextmanager
def dataset_lock(project: Project, what: str) -> Iterator[None]:
    """Hold the dataset's lock, waiting up to an hour for another run (then :class:`LockTimeoutError`)."""
    with exclusive_lock(dataset_lock_path(project), timeout=LOCK_TIMEOUT_SECONDS, what=what):
        yield


@contextlib.contextmanager
def staging_area(project: Project, kind: str) -> Iterator[StagingArea]:
    """A fresh staging folder for one ``kind`` run, removed when the block ends, whatever happens.

    Takes the dataset's lock for the whole block, and first clears stale staging folders.
    """
    with dataset_lock(project, f"{kind} of data/{project.config.dataset.name}"):
        for line in clear_stale(project):
            logger.warning(line)
        root = staging_root(project)
        folder = root / f"{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            (folder / "new").mkdir(parents=True)
            yield StagingArea(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                root.rmdir()  # only when empty
            with contextlib.suppress(OSError):
                project.staging_dir.rmdir()
