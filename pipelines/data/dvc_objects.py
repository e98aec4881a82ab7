"""What DVC records about a data version: ``data.dvc``, the version's objects, and ``data/`` against it.

``data.dvc`` (:data:`DVC_FILE`, at the project root) points at a version, the md5 of DVC's ``.dir`` object;
this module reads and writes it in-process. It also reads the ``.dir`` object and checks which file objects
of a version the local cache or the remote holds (a local remote's folder is read directly, S3 is asked
through :func:`~pipelines.data.dvc.run_dvc`), and hashes ``data/`` to compare it with a version
(:func:`workspace_changes`, about 40 ms for the 1,797-image sample where ``dvc data status`` takes a second).
How DVC is set up, locked and run is :mod:`pipelines.data.dvc`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from pipelines.data.dvc import cache_dir, remote_label, run_dvc
from pipelines.errors import VersioningError
from pipelines.files import write_atomic
from pipelines.project import Project
from pipelines.tracking import redact

DVC_FILE = "data.dvc"
"""DVC's pointer to ``data/``, at the project root."""

_VERSION_PATTERN = re.compile(r"[0-9a-f]{32}")

# ------------------------------------------------------------------------------------------ data.dvc


def parse_version(version: str) -> str:
    """Normalise ``version`` (case, surrounding blanks, a ``.dir`` suffix) or refuse it."""
    text = str(version).strip().lower().removesuffix(".dir")
    if not _VERSION_PATTERN.fullmatch(text):
        raise VersioningError(f"not a data version: {version!r} (expected 32 hex characters)")
    return text


def read_dvc_file(path: Path) -> tuple[str, int, int]:
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
    return parse_version(md5), files, size


def dvc_file_text(previous: bytes | None, version: str, files: int = 0, size: int = 0) -> str:
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


def restore_dvc_file(path: Path, previous: bytes | None) -> None:
    """Put ``data.dvc`` back to ``previous`` (its bytes before a change), or remove it if there was none."""
    if previous is None:
        path.unlink(missing_ok=True)
    else:
        write_atomic(path, previous)


def dvc_file_version(content: bytes | None) -> str:
    """The data version a ``data.dvc`` content points at, or ``""`` (no content, or not a DVC file for data/)."""
    if content is None:
        return ""
    try:
        md5 = str(yaml.safe_load(content.decode("utf-8"))["outs"][0]["md5"])
        return parse_version(md5) if md5.endswith(".dir") else ""
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, IndexError, TypeError, VersioningError):
        return ""


# ------------------------------------------------------------------------------- objects of a version


def _dir_entries(objects: Path, version: str) -> dict[str, str] | None:
    """``{relpath: md5}`` of ``version``'s ``.dir`` object in an ``files/md5`` folder, or None if it is absent."""
    dir_object = objects / version[:2] / f"{version[2:]}.dir"
    try:
        text = dir_object.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise VersioningError(f"{dir_object}: cannot read data version {version}'s file list ({error})") from None
    try:
        return {str(entry["relpath"]): str(entry["md5"]) for entry in json.loads(text)}
    except (ValueError, KeyError, TypeError) as error:
        raise VersioningError(
            f"{dir_object}: unreadable directory object of data version {version} ({error})"
        ) from None


def _missing_in(objects: Path, version: str) -> list[str]:
    """Objects of ``version`` absent from the ``files/md5`` folder ``objects``, the ``.dir`` first if absent."""
    entries = _dir_entries(objects, version)
    if entries is None:
        return [f"{version}.dir"]
    return [digest for digest in entries.values() if not (objects / digest[:2] / digest[2:]).is_file()]


def missing_objects(root: Path, version: str) -> list[str]:
    """Objects of ``version`` absent from the local cache (after a fetch: absent from the remote too)."""
    return _missing_in(cache_dir(root) / "files" / "md5", version)


def remote_missing_objects(project: Project, root: Path, version: str) -> list[str]:
    """Objects of ``version`` the remote does not hold (``[]``: it holds the version).

    A local remote is read directly: the ``.dir`` object and every file object it lists must be there (a stat
    per file, milliseconds for thousands). For S3 only the ``.dir`` object is looked up (``dvc ls-url``, about a
    second): DVC pushes it after every file object, so its presence means a push of that version completed;
    that is also all ``dvc status --cloud`` checks.

    Raises:
        VersioningError: the remote could not be asked (unreachable endpoint, no credentials, no bucket).
    """
    remote = project.config.version.remote.strip()
    if remote.startswith("s3://"):
        url = f"{remote.rstrip('/')}/files/md5/{version[:2]}/{version[2:]}.dir"
        try:
            run_dvc(root, "ls-url", url)
        except VersioningError as error:
            if "does not exist" in str(error):
                return [f"{version}.dir"]
            raise VersioningError(
                redact(f"cannot check the remote {remote_label(project)} for data version {version}: {error}")
            ) from None
        return []
    return _missing_in(project.path(remote).resolve() / "files" / "md5", version)


# ----------------------------------------------------------------------------------- data/ vs a version

_DVC_IGNORED_NAMES = frozenset({".git", ".hg", ".dvc", ".dvcignore"})
"""Names DVC never versions inside an output; their presence sends the comparison to DVC itself."""


def _has_ignore_rules(root: Path) -> bool:
    """True when the root's ``.dvcignore`` holds a rule (one inside ``data/`` is caught by the walk)."""
    try:
        lines = (root / ".dvcignore").read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return False
    return any(line.strip() and not line.lstrip().startswith("#") for line in lines)


def _file_md5(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def workspace_changes(project: Project, root: Path, version: str) -> list[str]:
    """How ``data/`` differs from data ``version``: sorted ``added: P``, ``removed: P``, ``changed: P`` lines.

    ``[]`` means ``data/`` holds exactly the files of ``version``, byte for byte. The file list comes from the
    version's ``.dir`` object (local cache, else a local remote); every file under ``data/`` is hashed (md5,
    as DVC does). When a ``.dvcignore`` rule, a name DVC skips or a linked folder is involved, ``dvc data
    status`` decides instead (about a second; it compares with ``data.dvc``, so that must point at ``version``).

    Raises:
        VersioningError: the version's file list is in neither the cache nor a local remote (the message says
            how to restore it), or ``data/`` could not be read.
    """
    data_dir = project.data_dir
    entries = _dir_entries(cache_dir(root) / "files" / "md5", version)
    remote = project.config.version.remote.strip()
    if entries is None and "://" not in remote:
        entries = _dir_entries(project.path(remote).resolve() / "files" / "md5", version)
    if entries is None:
        raise VersioningError(
            f"cannot compare {data_dir} with data version {version}: its file list ({version}.dir) is not in the"
            f" local DVC cache; run `mlops data checkout {version}` to restore that version from the remote"
        )
    if not data_dir.is_dir():
        return [f"removed: {path}" for path in sorted(entries)]
    if _has_ignore_rules(root):
        return _dvc_workspace_changes(root)
    actual: list[str] = []
    for directory, folders, names in os.walk(data_dir):
        if (
            _DVC_IGNORED_NAMES.intersection(folders)
            or _DVC_IGNORED_NAMES.intersection(names)
            or any(os.path.islink(os.path.join(directory, folder)) for folder in folders)
        ):
            return _dvc_workspace_changes(root)
        actual.extend(os.path.relpath(os.path.join(directory, name), data_dir) for name in names)
    present = {path.replace(os.sep, "/") for path in actual}
    changes = [f"added: {path}" for path in sorted(present - entries.keys())]
    changes += [f"removed: {path}" for path in sorted(entries.keys() - present)]
    try:
        changes += [
            f"changed: {path}"
            for path in sorted(present & entries.keys())
            if _file_md5(os.path.join(data_dir, path)) != entries[path]
        ]
    except OSError as error:
        raise VersioningError(f"cannot read {data_dir} to compare it with data version {version}: {error}") from None
    return sorted(changes, key=lambda line: line.split(": ", 1)[1])


def _dvc_workspace_changes(root: Path) -> list[str]:
    """``dvc data status`` between ``data/`` and ``data.dvc``, as :func:`workspace_changes` lines."""
    result = run_dvc(root, "data", "status", "--granular", "--json")
    try:
        status = json.loads(result.stdout or "{}")
    except ValueError as error:
        raise VersioningError(f"dvc data status: unreadable output ({error})") from None
    # "uncommitted" is data/ against data.dvc; "committed" would be data.dvc against git, not our question.
    kinds = {"added": "added", "deleted": "removed", "modified": "changed"}
    found = [
        (kinds.get(kind, kind), path) for kind, paths in (status.get("uncommitted") or {}).items() for path in paths
    ]
    found += [("not in cache", path) for path in status.get("not_in_cache") or []]
    changes = {
        f"{kind}: {relative}"
        for kind, path in found
        if (relative := str(path).removeprefix("data/")) and not relative.endswith("/")
    }
    return sorted(changes, key=lambda line: line.split(": ", 1)[1])


def count_files(folder: Path) -> tuple[int, int]:
    """Number of files under ``folder`` and their total size in bytes."""
    files = size = 0
    for directory, _, names in os.walk(folder):
        for name in names:
            files += 1
            size += os.stat(os.path.join(directory, name)).st_size
    return files, size
