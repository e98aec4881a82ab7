"""DVC versioning of ``data/``.

Round trips through a local and an S3 remote, the version log, unknown and malformed versions,
concurrent runs and DVC's own lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.data.version_log import DataVersion
from pipelines.data.versioning import checkout_data, current_version, list_versions, version_data
from pipelines.errors import VersioningError
from pipelines.project import Project
from tests.support import REPO_ROOT, write_tiny_dataset


def digests(project: Project) -> dict[str, str]:
    """sha256 of every file under ``data/``, keyed by its path relative to ``data/``."""
    return {
        path.relative_to(project.data_dir).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(project.data_dir.rglob("*"))
        if path.is_file()
    }


def log_lines(project: Project) -> list[str]:
    path = project.path(project.config.version.log)
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def forget_local_copies(project: Project) -> None:
    """Delete ``data/`` and DVC's local cache, so that only the remote holds the data."""
    shutil.rmtree(project.data_dir)
    shutil.rmtree(project.root / ".dvc" / "cache")


@pytest.fixture
def versioned(tiny_project: Callable[..., Project]) -> tuple[Project, DataVersion, dict[str, str]]:
    """A tiny dataset versioned once to the default local remote, with its file digests."""
    project = tiny_project()
    write_tiny_dataset(project)
    return project, version_data(project, source="sample"), digests(project)


def test_round_trip_restores_identical_bytes_from_the_remote(
    versioned: tuple[Project, DataVersion, dict[str, str]],
) -> None:
    project, version, before = versioned
    files = [path for path in project.data_dir.rglob("*") if path.is_file()]
    assert len(version.version) == 32, f"a version is a 32-hex md5, got {version.version!r}"
    assert int(version.version, 16) >= 0, f"a version is hexadecimal, got {version.version!r}"
    assert version.is_new, "the first version of a dataset is new"
    assert version.files == len(files), f"expected {len(files)} files, got {version.files}"
    assert version.bytes == sum(path.stat().st_size for path in files), "bytes is the total file size"
    assert version.source == "sample", f"the source is recorded, got {version.source!r}"
    assert version.created_at.endswith("+00:00"), f"created_at is UTC, got {version.created_at!r}"
    dvc_file = (project.root / "data.dvc").read_text(encoding="utf-8")
    assert f"md5: {version.version}.dir" in dvc_file, f"data.dvc at the root tracks data/: {dvc_file}"
    assert (project.root / "artifacts" / "dvc-remote").is_dir(), "the local remote holds the pushed data"
    assert "dvc-remote" not in (project.root / ".dvc" / "config").read_text(), "remote kept out of config"
    assert "dvc-remote" in (project.root / ".dvc" / "config.local").read_text(), "remote in config.local"

    forget_local_copies(project)
    restored = checkout_data(project, version.version)

    assert digests(project) == before, "checkout restores exactly the versioned bytes"
    assert restored == DataVersion(
        version.version, version.files, version.bytes, version.source, version.created_at, is_new=False
    ), f"checkout returns the logged record, got {restored}"
    assert (project.root / "data.dvc").read_text(encoding="utf-8") == dvc_file, (
        "after checkout data.dvc is what `dvc add` wrote for that version"
    )


def test_unchanged_data_gives_the_same_version_and_one_log_entry(
    versioned: tuple[Project, DataVersion, dict[str, str]],
) -> None:
    project, first, _ = versioned
    second = version_data(project, source="sample again")
    assert second.version == first.version, f"unchanged data keeps its version: {first} vs {second}"
    assert not second.is_new, "an unchanged dataset is not a new version"
    assert second.created_at == first.created_at, "the returned record is the first one logged"
    assert len(log_lines(project)) == 1, f"one log entry for one version: {log_lines(project)}"
    record = json.loads(log_lines(project)[0])
    assert set(record) == {"version", "files", "bytes", "source", "created_at"}, f"log record: {record}"
    assert list_versions(project) == [DataVersion(**record)], "list_versions reads the log"


def test_changed_data_is_a_new_version_and_the_old_one_can_be_restored(
    versioned: tuple[Project, DataVersion, dict[str, str]],
) -> None:
    project, first, before = versioned
    added = project.dataset_dir / "images" / "a" / "added.png"
    added.write_bytes(b"not really a png")
    changed = sorted(project.dataset_dir.glob("images/b/*.png"))[0]
    changed.write_bytes(changed.read_bytes() + b"\x00")

    second = version_data(project, source="changed")
    assert second.is_new, "changed data is a new version"
    assert second.version != first.version, "changed data gets another version"
    assert second.files == first.files + 1, f"one file was added: {first.files} -> {second.files}"
    assert [v.version for v in list_versions(project)] == [first.version, second.version], "log in order"

    assert current_version(project) == second.version, "the workspace holds the new version"
    restored = checkout_data(project, first.version.upper())
    assert current_version(project) == first.version, "after checkout the workspace holds the old version"
    assert restored.version == first.version, f"versions are normalised to lower case, got {restored}"
    assert not added.exists(), "a file that is not in the restored version is removed"
    assert digests(project) == before, "checkout restores exactly the old bytes"
    assert len(log_lines(project)) == 2, "a checkout does not add log entries"


def test_unknown_version_raises_and_leaves_data_untouched(
    versioned: tuple[Project, DataVersion, dict[str, str]],
) -> None:
    project, _, before = versioned
    dvc_file = (project.root / "data.dvc").read_bytes()
    unknown = "0123456789abcdef0123456789abcdef"
    with pytest.raises(VersioningError, match=unknown):
        checkout_data(project, unknown)
    assert (project.root / "data.dvc").read_bytes() == dvc_file, "data.dvc is put back as it was"
    assert digests(project) == before, "data/ is not touched by a failed checkout"
    leftovers = [path.name for path in project.root.glob("*.tmp")]
    assert not leftovers, f"no staging files are left behind: {leftovers}"


@pytest.mark.parametrize("bad", ["", "abc", "g" * 32, "0" * 31, "0" * 33, "../" + "0" * 32, "HEAD"], ids=repr)
def test_malformed_version_is_refused_before_touching_anything(tiny_project: Callable[..., Project], bad: str) -> None:
    project = tiny_project()
    write_tiny_dataset(project)
    before = digests(project)
    with pytest.raises(VersioningError, match="not a data version"):
        checkout_data(project, bad)
    assert not (project.root / ".dvc").exists(), "nothing is set up for a malformed version"
    assert not (project.root / "data.dvc").exists(), "no data.dvc is written for a malformed version"
    assert current_version(project) == "", "a project never versioned has no current version"
    assert digests(project) == before, "data/ is untouched"


_VERSION_IN_CHILD = """
import json, sys
from pipelines.project import Project
from pipelines.data.versioning import version_data
version = version_data(Project.load(sys.argv[1]), source="child")
print(json.dumps({"version": version.version, "is_new": version.is_new}))
"""


def test_concurrent_runs_in_two_processes_both_succeed_and_agree(
    tiny_project: Callable[..., Project],
) -> None:
    project = tiny_project()
    write_tiny_dataset(project)
    command = [sys.executable, "-c", _VERSION_IN_CHILD, str(project.root / "params.yaml")]
    children = [
        subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [child.communicate(timeout=300) for child in children]
    for child, (_, stderr) in zip(children, outputs, strict=True):
        assert child.returncode == 0, f"every concurrent run succeeds: {stderr[-2000:]}"
    results = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    assert results[0]["version"] == results[1]["version"], f"both runs agree on the version: {results}"
    assert sorted(result["is_new"] for result in results) == [False, True], f"one run is new: {results}"
    assert len(log_lines(project)) == 1, f"one log entry: {log_lines(project)}"
    assert not (project.root / ".mlops-dvc.lock").exists(), "the set-up lock is removed once set up"


def test_dvc_lock_held_elsewhere_is_waited_for(
    versioned: tuple[Project, DataVersion, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    import zc.lockfile  # type: ignore[import-untyped]  # DVC locks its repository with it

    project, first, _ = versioned
    (project.dataset_dir / "late.txt").write_text("arrived later\n", encoding="utf-8")
    held = zc.lockfile.LockFile(str(project.root / ".dvc" / "tmp" / "lock"))

    class ReleaseOnRetry(logging.Handler):
        """Free DVC's lock once the step has met it and said it will retry: no timing assumption."""

        def emit(self, record: logging.LogRecord) -> None:
            if "DVC's lock is taken" in record.getMessage():
                held.close()

    release = ReleaseOnRetry()
    logger = logging.getLogger("pipelines.data.dvc")
    logger.addHandler(release)
    timer = threading.Timer(300.0, held.close)  # a safety net only: the handler releases it first
    timer.start()
    try:
        with caplog.at_level(logging.INFO, logger="pipelines.data.dvc"):
            second = version_data(project, source="late")
    finally:
        logger.removeHandler(release)
        timer.cancel()
        held.close()
    assert second.is_new, f"the run completes once DVC's lock is free: {second}"
    assert second.version != first.version, "the added file is versioned"
    assert "DVC's lock is taken" in caplog.text, f"DVC's lock error was retried: {caplog.text}"


def test_git_work_tree_gets_a_git_backed_dvc_project(tiny_project: Callable[..., Project]) -> None:
    project = tiny_project()
    subprocess.run(["git", "init", "-q", str(project.root)], check=True)
    write_tiny_dataset(project)
    version = version_data(project)
    config = (project.root / ".dvc" / "config").read_text(encoding="utf-8")
    assert "no_scm" not in config, f"inside a git work tree DVC uses git: {config!r}"
    assert "/data" in (project.root / ".gitignore").read_text(), "DVC keeps data/ out of git"
    assert (project.root / "data.dvc").is_file(), f"data.dvc is at the root for {version.version}"


def test_s3_remote_round_trip(tiny_project: Callable[..., Project], s3_endpoint: str) -> None:
    import boto3

    project = tiny_project({"version": {"remote": "s3://mlops-data/datasets/tiny"}})
    write_tiny_dataset(project)
    before = digests(project)
    version = version_data(project, source="sample")

    listing = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="mlops-data", Prefix="datasets/tiny/")
    keys = [item["Key"] for item in listing.get("Contents", [])]
    assert any(key.endswith(f"{version.version[2:]}.dir") for key in keys), f"pushed to S3: {keys}"
    local_config = (project.root / ".dvc" / "config.local").read_text(encoding="utf-8")
    assert s3_endpoint in local_config, f"the endpoint comes from AWS_ENDPOINT_URL: {local_config}"
    for path in project.root.rglob("*"):
        if path.is_file() and path.suffix != ".png":
            text = path.read_bytes()
            assert b"testing-secret-value" not in text, f"credentials are never written: {path}"

    forget_local_copies(project)
    restored = checkout_data(project, version.version)
    assert restored.version == version.version, f"the requested version is restored: {restored}"
    assert digests(project) == before, "checkout from S3 restores exactly the versioned bytes"


@pytest.mark.parametrize(
    ("remote", "message"),
    [("gs://bucket/prefix", "only a local folder"), ("s3://", "names no bucket"), ("data/remote", "inside")],
)
def test_unusable_remote_is_refused_before_setting_anything_up(
    tiny_project: Callable[..., Project], remote: str, message: str
) -> None:
    project = tiny_project({"version": {"remote": remote}})
    write_tiny_dataset(project)
    with pytest.raises(VersioningError, match=message):
        version_data(project)
    assert not (project.root / ".dvc").exists(), f"no DVC project is set up for remote {remote!r}"


def test_checkout_moves_between_a_loose_version_and_a_packed_one(
    tiny_project: Callable[..., Project], tmp_path: Path
) -> None:
    from pipelines.data.augment import augment_dataset
    from pipelines.data.ingest import ingest
    from pipelines.data.validate import validate_dataset
    from tests.support import make_source, manifest_matches_files

    project = tiny_project({"validate": {"min_images_per_class_per_split": 1}})
    write_tiny_dataset(project)  # one file per image, as versions before packs were
    loose = version_data(project, source="loose")
    loose_files = digests(project)
    assert loose.files == len(loose_files) > 20, f"the loose version holds one file per image: {loose.files}"

    ingest(project, f"folder:{make_source(tmp_path / 'source', per_class=12)}")
    augment_dataset(project)
    packed = version_data(project, source="packed")
    packed_files = digests(project)
    assert sorted(packed_files) == [
        "tiny/augmented.csv",
        "tiny/augmented.zip",
        "tiny/images.zip",
        "tiny/manifest.csv",
    ], f"the packed version is a handful of files: {sorted(packed_files)}"
    assert packed.files == 4, f"data.dvc counts 4 files: {packed.files}"

    checkout_data(project, loose.version)
    assert digests(project) == loose_files, "the loose version comes back byte for byte, without the packs"
    assert validate_dataset(project).success, "a loose version still validates"
    assert augment_dataset(project).images_written == 2 * 9, "and still augments"
    assert not (project.dataset_dir / "augmented").exists(), "augment writes its pack, even over a loose version"
    assert manifest_matches_files(project.dataset_dir, project.augmented_manifest_path) == [], "copies match"

    checkout_data(project, packed.version)
    assert digests(project) == packed_files, "the packed version comes back byte for byte, no loose file left"
    assert manifest_matches_files(project.dataset_dir, project.manifest_path) == [], "its images match the manifest"
