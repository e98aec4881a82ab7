"""Version ``data/`` with DVC, push it to the configured remote, and restore any version.

The whole ``data/`` folder is one DVC output, tracked by ``data.dvc`` at the project root, so a data
version is the md5 of DVC's ``.dir`` object (32 hex characters). Versions are recorded in the version log
(:mod:`pipelines.data.version_log`), one line per version pushed. How DVC is run, configured and locked is
:mod:`pipelines.data.dvc`; what DVC records about a version is :mod:`pipelines.data.dvc_objects`.

This module keeps lineage from pointing at data the remote does not hold:

* :func:`version_data` keeps the previous ``data.dvc`` bytes; if anything fails after ``dvc add`` (a push to
  an unreachable remote...), ``data.dvc`` is put back and the log is untouched (it is appended to only after
  a successful push);
* every change to ``data.dvc`` is announced first in a journal (:mod:`pipelines.data.checkout_journal`),
  removed once done. A process killed half-way leaves it behind; the next :func:`version_data`,
  :func:`checkout_data`, :func:`current_version` or :func:`~pipelines.data.lineage.verify_lineage` repairs
  first: an interrupted version is undone, an interrupted checkout is finished when the wanted version can be
  had, else ``data.dvc`` and ``data/`` go back to the previous one;
* training refuses a version that is not in the log, not in the remote, or not what ``data/`` holds
  (:func:`~pipelines.data.lineage.verify_lineage`).

Test hook: ``MLOPS_TEST_PAUSE_AT=<step>`` makes the process print ``mlops-test-paused-at <step>`` on stderr
and sleep (``MLOPS_TEST_PAUSE_SECONDS``, default 60) at that step, so a test can kill it exactly there. Steps:
``version:added``, ``version:pushed``, ``checkout:journal``, ``checkout:dvc-file``, ``checkout:dvc-checkout``,
``checkout:checked-out``. Never set it outside tests.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime

from pipelines.data.checkout_journal import (
    Journal,
    clear_journal,
    fetch,
    journal_path,
    read_dvc_bytes,
    record_checkout,
    repair_interrupted,
    roll_back_checkout,
    write_journal,
)
from pipelines.data.dvc import dvc_session, remote_label, run_dvc
from pipelines.data.dvc_objects import (
    DVC_FILE,
    dvc_file_text,
    dvc_file_version,
    parse_version,
    read_dvc_file,
    restore_dvc_file,
)
from pipelines.data.version_log import DataVersion, append_log, read_log, version_log_path
from pipelines.errors import VersioningError
from pipelines.files import write_atomic
from pipelines.project import Project
from pipelines.tracking import redact

logger = logging.getLogger(__name__)

TEST_PAUSE_ENV = "MLOPS_TEST_PAUSE_AT"
"""Test hook: the step at which to pause (see the module docstring)."""

# --------------------------------------------------------------------------------------------- public


def version_data(project: Project, source: str = "") -> DataVersion:
    """Version ``data/`` as a whole with DVC, push it to the remote and record it in the version log.

    Sets the project up as a DVC project when needed (``dvc init``, ``--no-scm`` outside a git work
    tree), points the default remote at ``version.remote``, then runs ``dvc add data`` and
    ``dvc push``. Unchanged data gives the same version and no new log entry: the returned value is
    then the logged record, with ``is_new`` False. If anything fails after ``dvc add`` rewrote ``data.dvc``
    (typically the push), ``data.dvc`` is put back as it was and the log is not touched; ``data/`` is left
    as it is.

    Raises:
        VersioningError: ``data/`` is missing or empty, a DVC command failed (with DVC's message), or the
            push failed (the message names the remote and the version ``data.dvc`` is back at).
    """
    data_dir = project.data_dir
    if not data_dir.is_dir():
        raise VersioningError(f"nothing to version: {data_dir} does not exist (run ingest first)")
    if not any(path.is_file() for path in data_dir.rglob("*")):
        raise VersioningError(f"nothing to version: {data_dir} holds no files (run ingest first)")
    log_path = version_log_path(project)
    with dvc_session(project) as root:
        repair_interrupted(project, root)
        dvc_file = root / DVC_FILE
        previous = read_dvc_bytes(dvc_file)
        write_journal(root, Journal(operation="version", phase="prepared", previous=previous, wanted=""))
        stage = "add"
        try:
            run_dvc(root, "add", "data")
            version, files, size = read_dvc_file(dvc_file)
            _test_pause("version:added")
            stage = "push"
            run_dvc(root, "push", DVC_FILE)
            _test_pause("version:pushed")
            stage = "log"
            result = next((record for record in read_log(log_path) if record.version == version), None)
            if result is None:  # the log is appended to only now, after a successful push
                result = DataVersion(
                    version=version,
                    files=files,
                    bytes=size,
                    source=source,
                    created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                    is_new=True,
                )
                append_log(log_path, result)
        except BaseException as error:
            restore_dvc_file(dvc_file, previous)
            clear_journal(root)
            if stage == "push" and isinstance(error, VersioningError):
                raise VersioningError(_not_pushed_message(project, version, previous, error)) from None
            if stage == "log" and isinstance(error, OSError):
                raise VersioningError(
                    f"cannot append data version {version} to the version log {log_path}: {error.strerror};"
                    f" {DVC_FILE} is restored to {dvc_file_version(previous) or '(none: removed)'}"
                ) from None
            raise
        clear_journal(root)
    if result.is_new:
        logger.info("new data version %s: %d files, %d bytes", version, files, size)
    else:
        logger.info("data version %s unchanged (%d files)", version, files)
    return result


def current_version(project: Project) -> str:
    """The data version ``data.dvc`` points at, or ``""`` when ``data/`` was never versioned.

    This reads ``data.dvc`` only (no DVC command): it is what the last :func:`version_data` or
    :func:`checkout_data` left in the workspace, not a check of ``data/`` edited since (that is
    :func:`~pipelines.data.lineage.verify_lineage`). When an interrupted operation left its journal behind, it
    is repaired first (under the DVC lock); otherwise this costs one ``stat`` and one small read.

    Raises:
        VersioningError: ``data.dvc`` exists but is not a DVC file for the ``data/`` folder, or the repair
            of an interrupted operation failed.
    """
    if journal_path(project.root).exists():
        with dvc_session(project) as root:
            repair_interrupted(project, root)
    dvc_file = project.root / DVC_FILE
    if not dvc_file.exists():
        return ""
    return read_dvc_file(dvc_file)[0]


def list_versions(project: Project) -> list[DataVersion]:
    """The recorded data versions, oldest first (``is_new`` is False for all of them)."""
    return read_log(version_log_path(project))


def checkout_data(project: Project, version: str) -> DataVersion:
    """Restore exactly the files of data ``version`` into ``data/`` from the remote.

    Needs no git history: ``data.dvc`` is rewritten to point at ``<version>.dir``, the version is
    fetched and checked out with ``--force`` (files that are not part of it are removed). When the
    version is in neither the local cache nor the remote, ``data.dvc`` is put back as it was and
    ``data/`` is not touched; when the DVC checkout itself fails, the previous version is checked out
    again. Each phase is journalled, so a kill anywhere is repaired by the next versioning call. A version
    that is not in the log can be restored (the remote decides); only training refuses it. Returns the
    logged record of the version when there is one, otherwise one with the restored counts and an empty
    ``source`` and ``created_at``.

    Raises:
        VersioningError: ``version`` is not 32 hex characters (checked before anything is touched),
            the version is unknown, or a DVC command failed.
    """
    wanted = parse_version(version)
    with dvc_session(project) as root:
        repair_interrupted(project, root)
        dvc_file = root / DVC_FILE
        previous = read_dvc_bytes(dvc_file)
        journal = Journal(operation="checkout", phase="prepared", previous=previous, wanted=wanted)
        write_journal(root, journal)
        _test_pause("checkout:journal")
        try:
            write_atomic(dvc_file, dvc_file_text(previous, wanted))
            _test_pause("checkout:dvc-file")
            fetch(project, root, wanted)
        except BaseException as error:
            restore_dvc_file(dvc_file, previous)  # data/ was not touched yet
            clear_journal(root)
            if not isinstance(error, VersioningError) or wanted in str(error):
                raise
            raise VersioningError(f"cannot restore data version {wanted}: {error}") from None
        write_journal(root, replace(journal, phase="checkout"))
        _test_pause("checkout:dvc-checkout")
        try:
            run_dvc(root, "checkout", "--force", DVC_FILE)
            _test_pause("checkout:checked-out")
        except Exception as error:
            roll_back_checkout(project, root, journal, error)
        files, size = record_checkout(project, root, journal)
    for logged in read_log(version_log_path(project)):
        if logged.version == wanted:
            return logged
    return DataVersion(version=wanted, files=files, bytes=size, source="", created_at="")


def restore_workspace(project: Project) -> str:
    """Put ``data/`` back to the version ``data.dvc`` records (after a failed run); return that version.

    An interrupted operation is repaired first (see :func:`current_version`).
    """
    version = current_version(project)
    if version:
        checkout_data(project, version)
    return version


def _not_pushed_message(project: Project, version: str, previous: bytes | None, error: Exception) -> str:
    """The error of a run that failed after ``dvc add``: what failed, where, and what ``data.dvc`` holds now."""
    before = dvc_file_version(previous)
    if not before:
        now = "data.dvc is removed (no version was pushed before)"
    elif before in {record.version for record in read_log(version_log_path(project))}:
        now = f"data.dvc is restored to the last pushed version {before}"
    else:
        now = f"data.dvc is restored to data version {before}, what it held before"
    return redact(
        f"data version {version} was not pushed to the remote {remote_label(project)}: {error}\n"
        f"{now} and the version log is unchanged; fix the remote (version.remote in {project.params_path})"
        " and run `mlops version` again"
    )


def _test_pause(step: str) -> None:
    """Test hook: pause at ``step`` when ``$MLOPS_TEST_PAUSE_AT`` names it (see the module docstring)."""
    if os.environ.get(TEST_PAUSE_ENV) == step:
        print(f"mlops-test-paused-at {step}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("MLOPS_TEST_PAUSE_SECONDS", "60")))
