"""The lineage check: training uses only a data version the remote holds and ``data/`` holds exactly.

:func:`verify_lineage` refuses a version that is not in the version log (:mod:`pipelines.data.version_log`),
not in the remote, or not what ``data.dvc`` and ``data/`` hold, with a :class:`LineageError` that says how
to fix it. An interrupted versioning operation is repaired first (:mod:`pipelines.data.checkout_journal`).
"""

from __future__ import annotations

from pipelines.data.checkout_journal import repair_interrupted
from pipelines.data.dvc import dvc_session, remote_label
from pipelines.data.dvc_objects import (
    DVC_FILE,
    parse_version,
    read_dvc_file,
    remote_missing_objects,
    workspace_changes,
)
from pipelines.data.version_log import read_log, version_log_path
from pipelines.errors import VersioningError
from pipelines.project import Project
from pipelines.tracking import redact


class LineageError(VersioningError):
    """A data version training must not use: not in the version log, not in the remote, or not in ``data/``.

    Not retryable: waiting does not fix it, the message says what will.
    """

    retryable = False


def verify_lineage(project: Project, version: str, *, check_workspace: bool = True) -> None:
    """Refuse a data ``version`` whose lineage cannot be vouched for; return quietly otherwise.

    Checked in order: ``version`` is in the version log (only :func:`~pipelines.data.versioning.version_data`
    writes it, after a successful push); the remote holds it
    (:func:`~pipelines.data.dvc_objects.remote_missing_objects`); and, with ``check_workspace``, ``data.dvc``
    points at it and ``data/`` holds exactly its files, byte for byte
    (:func:`~pipelines.data.dvc_objects.workspace_changes`: about 40 ms on the 1,797-image sample). Training calls
    it before anything is trained; ``check_workspace=False`` is for checking a version before checking it out.

    Raises:
        LineageError: the version is not logged, not in the remote, or not what ``data.dvc``/``data/`` hold;
            the message names the version, the file or remote, and the command that fixes it.
        VersioningError: the remote could not be asked (retryable), or the version is malformed.
    """
    wanted = parse_version(version)
    log_path = version_log_path(project)
    if wanted not in {record.version for record in read_log(log_path)}:
        raise LineageError(
            f"data version {wanted} is not in the version log {log_path}: only versions pushed by `mlops version`"
            " can be trained on (see `mlops data list`); run `mlops version` to version and push data/"
        )
    with dvc_session(project) as root:
        repair_interrupted(project, root)
        missing = remote_missing_objects(project, root, wanted)
        if missing:
            raise LineageError(
                redact(
                    f"data version {wanted} is not in the remote {remote_label(project)}: {len(missing)} object(s)"
                    f" missing, e.g. {missing[0]} (was version.remote changed, or the remote emptied?); if the"
                    f" local DVC cache still holds it, `mlops data checkout {wanted}` then `mlops version` pushes"
                    " it again, otherwise train on a version the remote holds"
                )
            )
        if not check_workspace:
            return
        dvc_file = root / DVC_FILE
        current = read_dvc_file(dvc_file)[0] if dvc_file.exists() else ""
        if current != wanted:
            raise LineageError(
                f"{dvc_file} points at data version {current or '(none)'}, not {wanted}:"
                f" run `mlops data checkout {wanted}` first"
            )
        changes = workspace_changes(project, root, wanted)
    if changes:
        raise LineageError(
            f"{project.data_dir} differs from data version {wanted} recorded in {DVC_FILE}: {_summarise(changes)};"
            f" run `mlops version` to version and push the changes, or `mlops data checkout {wanted}` to discard them"
        )


def _summarise(changes: list[str], shown: int = 3) -> str:
    """``1 added (a.png), 4 changed (b.png, c.png, d.png, ...)`` from :func:`workspace_changes` lines."""
    groups: dict[str, list[str]] = {kind: [] for kind in ("added", "removed", "changed", "not in cache")}
    for line in changes:
        kind, path = line.split(": ", 1)
        groups.setdefault(kind, []).append(path)
    return ", ".join(
        f"{len(paths)} {kind} ({', '.join(paths[:shown])}{', ...' if len(paths) > shown else ''})"
        for kind, paths in groups.items()
        if paths
    )
