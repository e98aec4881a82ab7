"""Fault injection for DVC versioning: killed pushes complete on retry, killed checkouts are finished.

A child process runs :func:`version_data` on a dataset of a thousand or so tiny PNGs, in its own process group
(its ``python -m dvc push`` grandchild too). As soon as the remote holds some of the objects, the whole group
is SIGKILLed: nothing gets to clean up, exactly like a worker lost mid-push. The remote must then be partial
(otherwise the test proves nothing), and a plain :func:`version_data` in the test process must finish the job
despite whatever the killed run left behind (DVC's lock file, half-copied temporary files, the project lock).

Consistency is checked against the remote itself, not against DVC's opinion of it: ``dvc status --cloud`` and
``dvc push`` trust DVC's remote index (an object deleted from the remote after a complete push is still
reported "in sync"), so they could not catch a missing object. Instead every object the ``.dir`` manifest lists
must be in the remote with content matching its md5, and a restore from the remote alone (``data/`` and the
cache deleted) must give back identical bytes.

The killed push leaves ``data.dvc`` pointing at the version it was pushing; the journal it wrote first lets the
next versioning call put ``data.dvc`` back (lineage never names a version the remote does not hold). The killed
checkout is caught with ``data/`` half-way between two versions of 1,500 files each; the next ``mlops version``
must finish it, so that ``data/`` is byte for byte the version ``data.dvc`` names.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil  # type: ignore[import-untyped]
import pytest

from pipelines.data.checkout_journal import JOURNAL_NAME
from pipelines.data.dvc import run_dvc
from pipelines.data.dvc_objects import read_dvc_file
from pipelines.data.lineage import verify_lineage
from pipelines.data.manifest import ManifestRow, write_manifest
from pipelines.data.versioning import checkout_data, current_version, list_versions, version_data
from pipelines.project import Project
from tests.support import REPO_ROOT, png_bytes, run_mlops

pytestmark = pytest.mark.faults

CLASSES = ("a", "b", "c")
SPLITS = ("train", "val", "test")
KILL_AFTER_OBJECTS = 10
"""Kill the pushing run once the remote holds at least this many objects (of a few thousand)."""
PUSH_START_TIMEOUT = 120.0
_OBJECT_NAME = re.compile(r"[0-9a-f]{2}/[0-9a-f]{30}(\.dir)?")

_VERSION_IN_CHILD = """
import json, sys
from pipelines.project import Project
from tests.support import REPO_ROOT, png_bytes
from pipelines.data.versioning import version_data
from tests.support import REPO_ROOT, png_bytes
version = version_data(Project.load(sys.argv[1]), source="killed")
print(json.dumps({"version": version.version}))
"""


# ----------------------------------------------------------------------------------------------- helpers


def write_many_images(project: Project, count: int, seed: int = 20240611) -> None:
    """``count`` distinct random 8x8 PNGs under ``data/<name>/images/<class>/`` and their manifest."""
    rng = np.random.default_rng(seed)
    rows: list[ManifestRow] = []
    for number in range(count):
        label, split = CLASSES[number % 3], SPLITS[(number // 3) % 3]
        data = png_bytes(rng.integers(0, 256, size=(8, 8), dtype=np.uint8))
        digest = hashlib.sha256(data).hexdigest()
        relative = f"images/{label}/{digest[:16]}.png"
        target = project.dataset_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        rows.append(ManifestRow(relative, label, split, 8, 8, 1, len(data), digest))
    write_manifest(project.manifest_path, rows)


def digests(project: Project) -> dict[str, str]:
    """sha256 of every file under ``data/``, keyed by its path relative to ``data/``."""
    return {
        path.relative_to(project.data_dir).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(project.data_dir.rglob("*"))
        if path.is_file()
    }


def expected_objects(project: Project, version: str) -> set[str]:
    """Remote object names (``xx/yyyy``) of ``version``: every file the ``.dir`` manifest lists, and the ``.dir``."""
    dir_object = project.root / ".dvc" / "cache" / "files" / "md5" / version[:2] / f"{version[2:]}.dir"
    entries = json.loads(dir_object.read_text(encoding="utf-8"))
    return {f"{entry['md5'][:2]}/{entry['md5'][2:]}" for entry in entries} | {f"{version[:2]}/{version[2:]}.dir"}


def log_lines(project: Project) -> list[str]:
    path = project.path(project.config.version.log)
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class Remote:
    """What a test needs of a remote: list its objects, and check that an object's content matches its name."""

    objects: Callable[[], set[str]]
    """Names (``xx/yyyy`` or ``xx/yyyy.dir``) of the complete objects; temporary upload files are not objects."""
    corrupt: Callable[[set[str]], list[str]]
    """Those of the given objects whose content's md5 is not their name."""


def local_remote(folder: Path) -> Remote:
    objects_dir = folder / "files" / "md5"

    def objects() -> set[str]:
        if not objects_dir.is_dir():
            return set()
        names: set[str] = set()
        for directory, _, files in os.walk(objects_dir):
            prefix = os.path.basename(directory)
            names.update(f"{prefix}/{name}" for name in files)
        return {name for name in names if _OBJECT_NAME.fullmatch(name)}

    def corrupt(names: set[str]) -> list[str]:
        return sorted(
            name
            for name in names
            if hashlib.md5((objects_dir / name).read_bytes()).hexdigest() != name.replace("/", "").removesuffix(".dir")
        )

    return Remote(objects, corrupt)


def s3_remote(endpoint: str, bucket: str, prefix: str) -> Remote:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    root = f"{prefix}/files/md5/"

    def listing() -> dict[str, str]:
        etags: dict[str, str] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=root):
            for item in page.get("Contents", []):
                etags[item["Key"].removeprefix(root)] = item["ETag"].strip('"')
        return {name: etag for name, etag in etags.items() if _OBJECT_NAME.fullmatch(name)}

    def corrupt(names: set[str]) -> list[str]:
        etags = listing()  # single-part uploads: the ETag is the md5 of the content
        return sorted(name for name in names if etags.get(name) != name.replace("/", "").removesuffix(".dir"))

    return Remote(lambda: set(listing()), corrupt)


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def _flock_is_free(path: Path) -> bool:
    with path.open("rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


@dataclass
class Interrupted:
    version: str
    """What the killed run's ``dvc add`` wrote to ``data.dvc``."""
    in_remote: set[str]
    """Objects in the remote once every process of the killed run is dead."""
    killed: list[int]
    """PIDs of the processes killed (the child and its DVC grandchild)."""


def version_and_kill_mid_push(project: Project, remote: Remote, tmp_path: Path) -> Interrupted:
    """Run ``version_data`` in a child process group; SIGKILL the group once the push is under way."""
    log = (tmp_path / "child.log").open("w+b")
    command = [sys.executable, "-c", _VERSION_IN_CHILD, str(project.root / "params.yaml")]
    child = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + PUSH_START_TIMEOUT
        while len(remote.objects()) < KILL_AFTER_OBJECTS:
            if child.poll() is not None:
                log.seek(0)
                pytest.fail(f"the run ended before it could be interrupted: {log.read()[-3000:]!r}")
            if time.monotonic() > deadline:
                pytest.fail(f"the push did not start within {PUSH_START_TIMEOUT:.0f} s")
            time.sleep(0.01)
        killed = [process.pid for process in _group_members(child.pid)]
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        log.close()
    deadline = time.monotonic() + 30
    while survivors := _group_members(child.pid):  # the DVC grandchild is not ours to wait for
        assert time.monotonic() < deadline, f"the killed run's processes are still alive: {survivors}"
        time.sleep(0.05)
    assert child.returncode == -signal.SIGKILL, f"the child was killed, not finished: rc={child.returncode}"
    assert len(killed) >= 2, f"the child and its DVC grandchild were both killed mid-push: {killed}"
    # data.dvc read as the killed run left it: current_version() would repair it first
    return Interrupted(read_dvc_file(project.root / "data.dvc")[0], remote.objects(), killed)


def check_interrupted_push_completes_on_retry(
    project: Project, remote: Remote, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = digests(project)
    interrupted = version_and_kill_mid_push(project, remote, tmp_path)

    # -- the fault really happened: the push was cut off half-way
    assert interrupted.version, "the killed run got as far as `dvc add` (data.dvc names a version)"
    wanted = expected_objects(project, interrupted.version)
    dir_name = f"{interrupted.version[:2]}/{interrupted.version[2:]}.dir"
    partial = interrupted.in_remote
    assert partial, "some objects reached the remote before the kill"
    assert partial < wanted, (
        f"the remote is partial after the kill: {len(partial)} of {len(wanted)} objects"
        f" (foreign objects: {sorted(partial - wanted)[:5]})"
    )
    assert dir_name not in partial, "DVC pushes the .dir object last: a partial remote never advertises the version"
    assert list_versions(project) == [], "the killed run never reached the version log"

    # -- what the killed run left behind does not block the retry
    dvc_lock = project.root / ".dvc" / "tmp" / "lock"
    assert dvc_lock.is_file(), "the killed DVC process left its lock file behind"
    holder = dvc_lock.read_text(encoding="utf-8").strip()
    assert holder in {str(pid) for pid in interrupted.killed}, (
        f"the leftover DVC lock names the killed push ({holder!r}, killed {interrupted.killed})"
    )
    assert _flock_is_free(project.root / ".dvc" / "tmp" / "mlops.lock"), "the kernel released the killed run's lock"

    # -- the next command puts data.dvc back: no lineage points at the version the remote only half holds
    assert (project.root / ".dvc" / "tmp" / JOURNAL_NAME).is_file(), "the killed run left its journal"
    assert current_version(project) == "", "the next command undoes the unpushed data.dvc (there was none before)"
    assert not (project.root / "data.dvc").exists(), "data.dvc is removed, as it was before the killed run"
    assert not (project.root / ".dvc" / "tmp" / JOURNAL_NAME).exists(), "the journal is removed once repaired"

    with caplog.at_level(logging.INFO, logger="pipelines.data.dvc"):
        retried = version_data(project, source="retry")
    assert retried.version == interrupted.version, (
        f"the retry versions the same data: {retried.version} vs {interrupted.version}"
    )
    assert retried.is_new, f"the retry records the version the killed run never logged: {retried}"
    assert retried.files == len(before), f"all {len(before)} files are versioned: {retried}"
    assert "DVC's lock is taken" not in caplog.text, f"the dead process's DVC lock was not waited for: {caplog.text}"
    assert len(log_lines(project)) == 1, f"one log entry for one version: {log_lines(project)}"

    # -- the remote is complete and every object holds what its name says
    after = remote.objects()
    missing = sorted(wanted - after)
    assert not missing, f"every object the .dir manifest lists is in the remote; {len(missing)} missing: {missing[:5]}"
    assert partial <= after, "objects pushed before the kill are still there"
    bad = remote.corrupt(wanted)
    assert not bad, f"every remote object's content matches its md5; {len(bad)} do not: {bad[:5]}"

    # -- and a restore from the remote alone gives back identical bytes
    shutil.rmtree(project.data_dir)
    shutil.rmtree(project.root / ".dvc" / "cache")
    restored = checkout_data(project, interrupted.version)
    assert restored.version == interrupted.version, f"the retried version is restored: {restored}"
    assert digests(project) == before, "checkout from the remote restores exactly the original bytes"


# ------------------------------------------------------------------------------------------------- tests


def test_killed_push_to_a_local_remote_completes_on_retry(
    tiny_project: Callable[..., Project], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    project = tiny_project()
    write_many_images(project, 1500)
    remote = local_remote(project.path(project.config.version.remote))
    check_interrupted_push_completes_on_retry(project, remote, tmp_path, caplog)


def test_killed_push_to_an_s3_remote_completes_on_retry(
    tiny_project: Callable[..., Project], tmp_path: Path, caplog: pytest.LogCaptureFixture, s3_endpoint: str
) -> None:
    project = tiny_project({"version": {"remote": "s3://mlops-data/datasets/tiny"}})
    write_many_images(project, 800)
    remote = s3_remote(s3_endpoint, "mlops-data", "datasets/tiny")
    check_interrupted_push_completes_on_retry(project, remote, tmp_path, caplog)


def test_checkout_killed_while_dvc_copies_files_is_finished_by_the_next_command(
    tiny_project: Callable[..., Project], tmp_path: Path
) -> None:
    project = tiny_project()
    write_many_images(project, 1500, seed=1)
    first = version_data(project, source="first")
    first_data = digests(project)
    shutil.rmtree(project.dataset_dir)
    write_many_images(project, 1500, seed=2)
    second = version_data(project, source="second")
    second_data = digests(project)
    log = log_lines(project)
    first_only = [project.data_dir / name for name in sorted(set(first_data) - set(second_data))]
    assert len(first_only) >= 1400, f"the two versions share few files: {len(first_only)} differ"

    # `mlops data checkout <first>` in its own process group, killed once DVC has copied some files, not all
    command = [sys.executable, "-m", "pipelines.cli", "--params", str(project.params_path)]
    output = (tmp_path / "child.log").open("w+b")
    child = subprocess.Popen(
        [*command, "data", "checkout", first.version],
        cwd=REPO_ROOT,
        stdout=output,
        stderr=output,
        start_new_session=True,
    )
    present = 0
    try:
        deadline = time.monotonic() + PUSH_START_TIMEOUT
        while not 0 < (present := sum(path.exists() for path in first_only)) < len(first_only):
            if child.poll() is not None:
                output.seek(0)
                pytest.fail(f"the checkout ended before it could be interrupted ({present} files): {output.read()!r}")
            if time.monotonic() > deadline:
                pytest.fail(f"the checkout did not start copying within {PUSH_START_TIMEOUT:.0f} s")
            time.sleep(0.002)
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        output.close()
    deadline = time.monotonic() + 30
    while survivors := _group_members(child.pid):  # the DVC grandchild is not ours to wait for
        assert time.monotonic() < deadline, f"the killed checkout's processes are still alive: {survivors}"
        time.sleep(0.05)
    assert child.returncode == -signal.SIGKILL, f"the checkout was killed, not finished: rc={child.returncode}"
    print(f"killed with {present} of {len(first_only)} files of version 1 copied")
    half_way = digests(project)
    assert half_way not in (first_data, second_data), f"data/ is half-way: {present} of {len(first_only)} copied"
    assert (project.root / ".dvc" / "tmp" / JOURNAL_NAME).is_file(), "the killed checkout left its journal"

    result = run_mlops(project, "version")

    assert result.returncode == 0, f"the next command repairs, then does its own work: {result.stderr[-2000:]}"
    assert f"finished an interrupted checkout: data/ holds data version {first.version}" in result.stderr, (
        f"the repair is reported: {result.stderr[-2000:]}"
    )
    assert f"data version {first.version} (unchanged)" in result.stdout, f"the repaired data is version 1: {result}"
    assert digests(project) == first_data, "data/ is byte for byte the checked-out version"
    assert current_version(project) == first.version, "data.dvc names the checked-out version"
    status = json.loads(run_dvc(project.root, "status", "--json", "data.dvc").stdout or "{}")
    assert status == {}, f"dvc status: data/ matches data.dvc, got {status}"
    verify_lineage(project, first.version)  # what training checks: logged, in the remote, data/ == data.dvc
    assert log_lines(project) == log, "the version log is unchanged"
    assert second.version != first.version, "two distinct versions were involved"
