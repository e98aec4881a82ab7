"""The journal of a change to ``data.dvc`` in progress, and the repair of one a killed process left behind.

Every change :mod:`pipelines.data.versioning` makes to ``data.dvc`` is announced first in a journal,
``.dvc/tmp/mlops-journal.json`` (operation, phase, previous ``data.dvc``, wanted version), removed once
done. A process killed half-way leaves it behind; the next versioning call repairs first
(:func:`repair_interrupted`): an interrupted version is undone, an interrupted checkout is finished when
the wanted version can be had, else ``data.dvc`` and ``data/`` go back to the previous one. This module also
owns the checkout steps a checkout and its repair share: fetching a version, recording it in ``data.dvc``,
and rolling a failed one back.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, NoReturn

from pipelines.data.dvc import remote_label, run_dvc
from pipelines.data.dvc_objects import (
    DVC_FILE,
    count_files,
    dvc_file_text,
    dvc_file_version,
    missing_objects,
    parse_version,
    restore_dvc_file,
)
from pipelines.data.version_log import read_log, version_log_path
from pipelines.errors import VersioningError
from pipelines.files import write_atomic, write_json_atomic
from pipelines.project import Project

logger = logging.getLogger(__name__)

JOURNAL_NAME = "mlops-journal.json"
"""The journal of the versioning operation in progress, inside ``.dvc/tmp/``."""

# ------------------------------------------------------------------------------------------- journal


@dataclass(frozen=True)
class Journal:
    """What a versioning operation is about to do, written before ``data.dvc`` changes."""

    operation: Literal["version", "checkout"]
    phase: Literal["prepared", "checkout"]
    """``prepared``: ``data/`` not touched yet; ``checkout``: DVC may have changed ``data/`` (checkout only)."""
    previous: bytes | None
    """``data.dvc`` before the operation (None: there was none)."""
    wanted: str
    """The version being checked out (empty for ``version``)."""


def journal_path(root: Path) -> Path:
    """Where the journal of the versioning operation in progress is kept (``.dvc/tmp/``)."""
    return root / ".dvc" / "tmp" / JOURNAL_NAME


def read_dvc_bytes(dvc_file: Path) -> bytes | None:
    """``data.dvc``'s bytes (None if absent); refused unless UTF-8, so the journal can hold them as text."""
    try:
        content = dvc_file.read_bytes()
    except FileNotFoundError:
        return None
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        raise VersioningError(f"{dvc_file}: not a DVC file (not UTF-8 text)") from None
    return content


def write_journal(root: Path, journal: Journal) -> None:
    """Write ``journal`` atomically, with the writer's pid and the time, before ``data.dvc`` changes."""
    write_json_atomic(
        journal_path(root),
        {
            "operation": journal.operation,
            "phase": journal.phase,
            "previous": None if journal.previous is None else journal.previous.decode("utf-8"),
            "wanted": journal.wanted,
            "pid": os.getpid(),
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )


def clear_journal(root: Path) -> None:
    """End the operation in progress: remove its journal (absent is fine)."""
    journal_path(root).unlink(missing_ok=True)


def _read_journal(path: Path) -> Journal:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        operation, phase, previous = record["operation"], record["phase"], record["previous"]
        if operation not in ("version", "checkout") or phase not in ("prepared", "checkout"):
            raise ValueError(f"operation {operation!r}, phase {phase!r}")
        wanted = parse_version(record["wanted"]) if operation == "checkout" else ""
        return Journal(
            operation=operation,
            phase=phase,
            previous=None if previous is None else str(previous).encode("utf-8"),
            wanted=wanted,
        )
    except (OSError, ValueError, KeyError, TypeError, VersioningError) as error:
        raise VersioningError(
            f"{path}: unreadable journal of an interrupted versioning operation ({error}); check {DVC_FILE}"
            f" (`mlops data checkout VERSION` restores a version), then delete {path}"
        ) from None


def repair_interrupted(project: Project, root: Path) -> None:
    """Repair what a killed version or checkout (:mod:`pipelines.data.versioning`) left; hold the DVC lock.

    * ``version``: ``data.dvc`` may point at a version no remote holds; unless that version is in the log
      (the push and the log append completed), the previous ``data.dvc`` is put back. ``data/`` is untouched.
    * ``checkout``, ``prepared``: ``data/`` was not touched; ``data.dvc`` is put back.
    * ``checkout``, ``checkout``: ``data/`` may be half-way; the checkout is finished when the wanted version
      can be had from the cache or the remote, else the previous version is checked out again.
    """
    path = journal_path(root)
    if not path.exists():
        return
    journal = _read_journal(path)
    dvc_file = root / DVC_FILE
    if journal.operation == "version":
        current = dvc_file_version(read_dvc_bytes(dvc_file))
        if current and current in {record.version for record in read_log(version_log_path(project))}:
            logger.warning("an interrupted `mlops version` had pushed and logged %s: data.dvc kept", current)
        else:
            restore_dvc_file(dvc_file, journal.previous)
            logger.warning(
                "an interrupted `mlops version` left %s at %s, not pushed: restored to %s",
                dvc_file,
                current or "(nothing)",
                dvc_file_version(journal.previous) or "(none: removed)",
            )
        clear_journal(root)
        return
    if journal.phase == "prepared":
        restore_dvc_file(dvc_file, journal.previous)
        clear_journal(root)
        logger.warning(
            "an interrupted checkout of %s had not touched data/: %s restored to %s",
            journal.wanted,
            dvc_file,
            dvc_file_version(journal.previous) or "(none: removed)",
        )
        return
    try:
        write_atomic(dvc_file, dvc_file_text(journal.previous, journal.wanted))
        fetch(project, root, journal.wanted)
        run_dvc(root, "checkout", "--force", DVC_FILE)
    except VersioningError as error:
        logger.warning("cannot finish the interrupted checkout of %s (%s): going back", journal.wanted, error)
        _roll_back_checkout_quietly(project, root, journal, error)
        return
    record_checkout(project, root, journal)
    logger.warning("finished an interrupted checkout: data/ holds data version %s", journal.wanted)


def _roll_back_checkout_quietly(project: Project, root: Path, journal: Journal, error: VersioningError) -> None:
    """:func:`roll_back_checkout` for a repair: success is not an error for the command that repaired."""
    try:
        roll_back_checkout(project, root, journal, error)
    except VersioningError as rolled:
        if journal_path(root).exists():
            raise  # the previous version could not be restored either: the caller must not go on
        logger.warning("%s", rolled)


# ------------------------------------------------------------------------------------------ checkout


def fetch(project: Project, root: Path, version: str) -> None:
    """Fetch ``version`` (``data.dvc`` points at it) into the cache; refuse it when the remote lacks objects."""
    run_dvc(root, "fetch", DVC_FILE)
    missing = missing_objects(root, version)
    remote = remote_label(project)
    if missing == [f"{version}.dir"]:
        raise VersioningError(f"unknown data version {version}: it is not in the remote {remote}")
    if missing:
        raise VersioningError(
            f"data version {version} is incomplete in the remote {remote}:"
            f" {len(missing)} file object(s) missing, e.g. {missing[0]}"
        )


def record_checkout(project: Project, root: Path, journal: Journal) -> tuple[int, int]:
    """After a checkout: write ``data.dvc`` with the restored counts (as ``dvc add`` does), end the journal."""
    files, size = count_files(project.data_dir)
    write_atomic(root / DVC_FILE, dvc_file_text(journal.previous, journal.wanted, files=files, size=size))
    clear_journal(root)
    return files, size


def _check_out_previous(project: Project, root: Path, previous: bytes | None) -> str:
    """Put ``data.dvc`` back to ``previous`` and ``data/`` with it; return that version (``""``: none).

    With no previous ``data.dvc`` it is removed and ``data/`` is left as it is (nothing to restore it to).
    """
    dvc_file = root / DVC_FILE
    restore_dvc_file(dvc_file, previous)
    version = dvc_file_version(previous)
    if version:
        fetch(project, root, version)
        run_dvc(root, "checkout", "--force", DVC_FILE)
    return version


def roll_back_checkout(project: Project, root: Path, journal: Journal, error: Exception) -> NoReturn:
    """The DVC checkout failed with ``data/`` possibly half-restored: go back to the previous version, raise."""
    wanted = journal.wanted
    try:
        restored = _check_out_previous(project, root, journal.previous)
    except VersioningError as second:
        raise VersioningError(
            f"cannot restore data version {wanted}: {error}\nputting the previous data version back failed too"
            f" ({second}): {project.data_dir} may be partly restored; the journal {journal_path(root)} is kept"
            " and the next versioning command repairs it"
        ) from None
    clear_journal(root)
    where = f"data version {restored}" if restored else "no data version (data.dvc removed)"
    raise VersioningError(
        f"cannot restore data version {wanted}: {error}\ndata.dvc and {project.data_dir} are back at {where}"
    ) from None
