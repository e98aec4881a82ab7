"""Lineage never points at data the remote does not hold.

* a failed ``dvc push`` (a local remote whose parent is a regular file, an S3 endpoint where nothing listens)
  puts ``data.dvc`` back to the last pushed version and leaves the version log alone;
* ``mlops version`` and ``mlops data checkout`` killed (SIGKILL) at each step are repaired by the next
  versioning call: ``data.dvc`` and ``data/`` agree again (checked byte for byte and with ``dvc status``);
* training refuses a version missing from the log or the remote, and a ``data/`` that differs from ``data.dvc``.

Each test builds the hostile situation itself and checks the message, the exit status for a CLI command, and
that ``data/``, ``data.dvc`` and the version log are as they were. The kills use the ``MLOPS_TEST_PAUSE_AT``
hook of :mod:`pipelines.data.versioning`: the child says where it paused, the test SIGKILLs its process group.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.checkout_journal import JOURNAL_NAME
from pipelines.data.dvc import run_dvc
from pipelines.data.lineage import LineageError, verify_lineage
from pipelines.data.versioning import checkout_data, current_version, list_versions, version_data
from pipelines.errors import VersioningError
from pipelines.project import Project
from tests.support import REPO_ROOT, free_port, png_bytes, protected_state, run_mlops, write_params, write_tiny_dataset

PAUSE_TIMEOUT = 120.0
"""How long a child may take to reach the step it pauses at."""


@dataclass(frozen=True)
class Versions:
    """A project holding two pushed and logged versions, the workspace at the second."""

    project: Project
    v1: str
    v2: str
    data1: dict[str, str]
    data2: dict[str, str]
    dvc1: bytes
    dvc2: bytes


def digests(project: Project) -> dict[str, str]:
    """sha256 of every file under ``data/``, keyed by its path relative to ``data/``."""
    return {
        path.relative_to(project.data_dir).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(project.data_dir.rglob("*"))
        if path.is_file()
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dvc_bytes(project: Project) -> bytes | None:
    path = project.root / "data.dvc"
    return path.read_bytes() if path.exists() else None


def log_text(project: Project) -> str:
    path = project.path(project.config.version.log)
    return path.read_text(encoding="utf-8") if path.exists() else ""


def journal(project: Project) -> Path:
    return project.root / ".dvc" / "tmp" / JOURNAL_NAME


def dvc_status(project: Project) -> dict[str, object]:
    """``dvc status data.dvc``: ``{}`` when ``data/`` is exactly what ``data.dvc`` records."""
    return dict(json.loads(run_dvc(project.root, "status", "--json", "data.dvc").stdout or "{}"))


def assert_consistent(project: Project, version: str, data: dict[str, str]) -> None:
    """``data.dvc`` points at ``version``, ``data/`` holds exactly its bytes, and no journal is left.

    Call it after the command that repairs: it only observes (``current_version`` finds no journal left).
    """
    assert not journal(project).exists(), f"the journal is removed once repaired: {journal(project)}"
    assert current_version(project) == version, f"data.dvc points at {version}, got {current_version(project)}"
    assert digests(project) == data, f"data/ holds exactly the bytes of {version}"
    assert dvc_status(project) == {}, f"dvc status: data/ matches data.dvc, got {dvc_status(project)}"
    verify_lineage(project, version)  # the check training runs: logged, in the remote, data/ == data.dvc


def reload(project: Project, remote: str) -> Project:
    """The same project with ``version.remote`` set to ``remote``."""
    return Project.load(write_params(project.root, {"version": {"remote": remote}}))


def blocked_remote(project: Project) -> Project:
    """Point ``version.remote`` at a folder whose parent is a regular file: no push can create it, not even root's."""
    blocker = project.root / "artifacts" / "blocker"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a regular file where the remote's parent folder should be\n", encoding="utf-8")
    return reload(project, "artifacts/blocker/remote")


def run_killed_at(project: Project, step: str, *args: str, log: Path) -> None:
    """Run ``mlops ARGS`` in a child process group, SIGKILL the group once it paused at ``step``."""
    env = dict(os.environ, MLOPS_TEST_PAUSE_AT=step, MLOPS_TEST_PAUSE_SECONDS="300")
    command = [sys.executable, "-m", "pipelines.cli", "--params", str(project.params_path), *args]
    with log.open("w+b") as output:
        child = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=output, stderr=output, start_new_session=True)
        try:
            deadline = time.monotonic() + PAUSE_TIMEOUT
            while f"mlops-test-paused-at {step}".encode() not in log.read_bytes():
                if child.poll() is not None:
                    pytest.fail(f"`mlops {' '.join(args)}` ended before pausing at {step}: {log.read_bytes()!r}")
                if time.monotonic() > deadline:
                    pytest.fail(f"`mlops {' '.join(args)}` did not reach {step} within {PAUSE_TIMEOUT:.0f} s")
                time.sleep(0.02)
        finally:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, f"the child was killed at {step}, rc={child.returncode}"
    assert journal(project).exists(), f"the killed run left its journal at {step}"


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Versions:
    """Built once: a tiny dataset versioned twice (a file added and one changed in between)."""
    root = tmp_path_factory.mktemp("lineage") / "project"
    root.mkdir()
    project = Project.load(write_params(root))
    write_tiny_dataset(project)
    v1 = version_data(project, source="first").version
    data1, dvc1 = digests(project), (root / "data.dvc").read_bytes()
    (project.dataset_dir / "images" / "a" / "added.png").write_bytes(png_bytes(_pixels(1)))
    changed = sorted(project.dataset_dir.glob("images/b/*.png"))[0]
    changed.write_bytes(png_bytes(_pixels(2)))
    v2 = version_data(project, source="second").version
    return Versions(project, v1, v2, data1, digests(project), dvc1, (root / "data.dvc").read_bytes())


def _pixels(seed: int) -> np.ndarray:
    """A random 8x8 grayscale image, different from every image of the tiny dataset."""
    return np.random.default_rng(seed).integers(0, 256, size=(8, 8), dtype=np.uint8)


@pytest.fixture
def versions(template: Versions, tmp_path: Path) -> Versions:
    """A fresh copy of the template project (data, cache, remote, log), the workspace at version 2."""
    root = tmp_path / "project"
    shutil.copytree(template.project.root, root, symlinks=True)
    project = Project.load(root / "params.yaml")
    return Versions(project, *(getattr(template, name) for name in ("v1", "v2", "data1", "data2", "dvc1", "dvc2")))


@pytest.fixture
def no_aws_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy AWS credentials and one attempt per request, so an unreachable endpoint fails fast."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")


# ------------------------------------------------------------------------------------- (a) failed push


def test_push_to_a_remote_behind_a_file_restores_the_last_pushed_version(versions: Versions) -> None:
    project = blocked_remote(versions.project)
    (project.dataset_dir / "late.txt").write_text("arrived after version 2\n", encoding="utf-8")
    before = protected_state(project)

    result = run_mlops(project, "version")

    assert result.returncode == 1, f"`mlops version` exits 1 when the push fails: {result.stderr}"
    assert result.stderr.startswith("error: data version "), f"one error line, no traceback: {result.stderr}"
    assert "Traceback" not in result.stderr, f"no traceback: {result.stderr}"
    for text in ("was not pushed to the remote 'artifacts/blocker/remote'", "dvc push failed"):
        assert text in result.stderr, f"the message names the remote and the failed push ({text!r}): {result.stderr}"
    assert f"data.dvc is restored to the last pushed version {versions.v2}" in result.stderr, (
        f"the message says what data.dvc holds now: {result.stderr}"
    )
    assert "version log is unchanged" in result.stderr, f"the message says the log is unchanged: {result.stderr}"
    assert protected_state(project) == before, "data/, data.dvc and the version log are as they were"
    assert dvc_bytes(project) == versions.dvc2, "data.dvc holds the bytes of the last pushed version"
    assert [v.version for v in list_versions(project)] == [versions.v1, versions.v2], "no version was logged"
    assert not journal(project).exists(), "no journal is left after a handled failure"


def test_first_push_failing_leaves_no_data_dvc(tiny_project: Callable[..., Project]) -> None:
    project = blocked_remote(tiny_project())
    write_tiny_dataset(project)
    before = digests(project)

    with pytest.raises(VersioningError, match="not pushed to the remote") as raised:
        version_data(project, source="sample")

    assert "data.dvc is removed (no version was pushed before)" in str(raised.value), f"says so: {raised.value}"
    assert dvc_bytes(project) is None, "no data.dvc points at a version no remote holds"
    assert log_text(project) == "", "nothing was logged"
    assert digests(project) == before, "data/ is untouched"
    assert current_version(project) == "", "the workspace has no data version"


@pytest.mark.parametrize("userinfo", ["", "mlops:hunter2-secret@"], ids=["plain", "with-password"])
def test_push_to_an_unreachable_s3_endpoint_restores_the_last_pushed_version(
    tiny_project: Callable[..., Project],
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    no_aws_profile: None,
    userinfo: str,
) -> None:
    project = tiny_project({"version": {"remote": "s3://mlops-data/datasets/tiny"}})
    write_tiny_dataset(project)
    first = version_data(project, source="sample")
    pushed_dvc, pushed_log = dvc_bytes(project), log_text(project)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{userinfo}127.0.0.1:{free_port()}")  # nothing listens there
    (project.dataset_dir / "late.txt").write_text("arrived while S3 was down\n", encoding="utf-8")
    data = digests(project)

    with pytest.raises(VersioningError) as raised:
        version_data(project, source="late")

    message = str(raised.value)
    assert "was not pushed to the remote 's3://mlops-data/datasets/tiny'" in message, f"names the remote: {message}"
    assert "127.0.0.1" in message, f"names the endpoint: {message}"
    if not userinfo:
        assert "Could not connect to the endpoint URL" in message, f"DVC's reason is kept: {message}"
    assert "hunter2-secret" not in message, f"the endpoint's password is redacted: {message}"
    assert f"restored to the last pushed version {first.version}" in message, f"says what data.dvc holds: {message}"
    assert raised.value.retryable, "an unreachable remote may come back: the error is retryable"
    assert dvc_bytes(project) == pushed_dvc, "data.dvc is back at the pushed version"
    assert log_text(project) == pushed_log, "the version log is unchanged"
    assert digests(project) == data, "data/ is left as it is"


# ------------------------------------------------------------------------------------------ (b) kills


@pytest.mark.parametrize("step", ["version:added", "version:pushed"])
def test_killed_version_is_undone_by_the_next_command(versions: Versions, step: str, tmp_path: Path) -> None:
    project = versions.project
    (project.dataset_dir / "late.txt").write_text("arrived after version 2\n", encoding="utf-8")
    data, log = digests(project), log_text(project)

    run_killed_at(project, step, "version", log=tmp_path / "child.log")
    assert dvc_bytes(project) != versions.dvc2, f"the kill at {step} left data.dvc at the unlogged version"

    assert current_version(project) == versions.v2, "the next command puts data.dvc back to the last pushed version"
    assert dvc_bytes(project) == versions.dvc2, "data.dvc holds the exact bytes it had"
    assert not journal(project).exists(), "the journal is removed once repaired"
    assert log_text(project) == log, "the version log is unchanged"
    assert digests(project) == data, "data/ (the new, unversioned data) is left as it is"
    retried = version_data(project, source="retry")
    assert retried.is_new, f"the retry versions, pushes and logs the new data: {retried}"
    assert len(list_versions(project)) == 3, f"one more version in the log: {list_versions(project)}"


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        ("checkout:journal", "previous"),  # nothing touched yet
        ("checkout:dvc-file", "previous"),  # data.dvc rewritten, data/ not touched: put data.dvc back
        ("checkout:dvc-checkout", "wanted"),  # data/ half-way (simulated below): finish the checkout
        ("checkout:checked-out", "wanted"),  # data/ done, data.dvc not finalised: finish
    ],
)
def test_killed_checkout_is_repaired_by_the_next_command(
    versions: Versions, step: str, expected: str, tmp_path: Path
) -> None:
    project = versions.project
    log = log_text(project)

    run_killed_at(project, step, "data", "checkout", versions.v1, log=tmp_path / "child.log")
    if step == "checkout:dvc-checkout":
        # A DVC checkout cut off half-way: version 2's extra file already removed, its changed file not yet.
        (project.dataset_dir / "images" / "a" / "added.png").unlink()
        assert digests(project) not in (versions.data1, versions.data2), "data/ is neither version"

    version, data, dvc_file = (
        (versions.v2, versions.data2, versions.dvc2)
        if expected == "previous"
        else (versions.v1, versions.data1, versions.dvc1)
    )
    assert current_version(project) == version, f"the next command repairs the checkout killed at {step}"
    assert_consistent(project, version, data)
    assert dvc_bytes(project) == dvc_file, f"data.dvc holds the exact bytes `dvc add` wrote for {version}"
    assert log_text(project) == log, "a checkout, killed or repaired, never touches the version log"


def test_killed_checkout_of_a_version_gone_meanwhile_goes_back_to_the_previous_one(
    versions: Versions, tmp_path: Path
) -> None:
    project = versions.project
    run_killed_at(project, "checkout:dvc-checkout", "data", "checkout", versions.v1, log=tmp_path / "child.log")
    (project.dataset_dir / "images" / "a" / "added.png").unlink()  # half-way, as above
    only_in_v1 = set(versions.data1.values()) - set(versions.data2.values())
    assert len(only_in_v1) == 1, "version 1 has exactly one file content version 2 lacks"
    gone = 0
    for store in (project.root / ".dvc" / "cache", project.path(project.config.version.remote)):
        for path in (store / "files" / "md5").rglob("*"):
            if path.is_file() and not path.name.endswith(".dir") and sha256(path) in only_in_v1:
                path.unlink()
                gone += 1
    assert gone == 2, f"version 1's own object is deleted from the cache and the remote ({gone} deleted)"

    again = version_data(project, source="after the repair")

    assert not again.is_new, f"after the repair data/ is version 2 again, already logged: {again}"
    assert_consistent(project, versions.v2, versions.data2)
    assert dvc_bytes(project) == versions.dvc2, "data.dvc is back at version 2"
    assert [v.version for v in list_versions(project)] == [versions.v1, versions.v2], "the log is unchanged"


def test_failed_dvc_checkout_puts_the_previous_version_back(versions: Versions, tmp_path: Path) -> None:
    project = versions.project
    log = log_text(project)
    cache = project.root / ".dvc" / "cache" / "files" / "md5"
    only_in_v1 = set(versions.data1.values()) - set(versions.data2.values())
    victims = [path for path in cache.rglob("*") if path.is_file() and sha256(path) in only_in_v1]
    assert len(victims) == 1, f"version 1's own object is in the cache: {victims}"
    env = dict(os.environ, MLOPS_TEST_PAUSE_AT="checkout:dvc-checkout", MLOPS_TEST_PAUSE_SECONDS="5")
    command = [sys.executable, "-m", "pipelines.cli", "--params", str(project.params_path)]
    output = tmp_path / "child.log"
    with output.open("wb") as handle:
        child = subprocess.Popen([*command, "data", "checkout", versions.v1], cwd=REPO_ROOT, env=env, stderr=handle)
        try:
            deadline = time.monotonic() + PAUSE_TIMEOUT
            while b"mlops-test-paused-at checkout:dvc-checkout" not in output.read_bytes():
                assert child.poll() is None, f"the checkout ended before its pause: {output.read_bytes()!r}"
                assert time.monotonic() < deadline, "the checkout did not reach its pause"
                time.sleep(0.02)
            victims[0].unlink()  # fetched, then lost: DVC's checkout fails after touching data/
            status = child.wait(timeout=PAUSE_TIMEOUT)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    stderr = output.read_text(encoding="utf-8")

    assert status == 1, f"`mlops data checkout` exits 1 when DVC's checkout fails: {stderr}"
    assert f"error: cannot restore data version {versions.v1}: dvc checkout failed" in stderr, f"says so: {stderr}"
    assert f"data.dvc and {project.data_dir} are back at data version {versions.v2}" in stderr, f"says so: {stderr}"
    assert_consistent(project, versions.v2, versions.data2)
    assert dvc_bytes(project) == versions.dvc2, "data.dvc holds the exact bytes it had"
    assert log_text(project) == log, "the version log is unchanged"


# ---------------------------------------------------------------------------------- (c) training refuses


def hand_pushed_version(project: Project) -> str:
    """A version added and pushed with DVC by hand (``dvc add``, ``dvc push``): in the remote, not in the log."""
    (project.dataset_dir / "by-hand.txt").write_text("versioned outside mlops\n", encoding="utf-8")
    run_dvc(project.root, "add", "data")
    run_dvc(project.root, "push", "data.dvc")
    return current_version(project)


def test_train_refuses_a_version_missing_from_the_log(versions: Versions) -> None:
    project = versions.project
    by_hand = hand_pushed_version(project)
    before = protected_state(project)

    result = run_mlops(project, "train")

    assert result.returncode == 1, f"`mlops train` exits 1: {result.stderr}"
    assert result.stderr.startswith(f"error: data version {by_hand} is not in the version log "), (
        f"the message names the version and the log: {result.stderr}"
    )
    assert "run `mlops version`" in result.stderr, f"the message says what to do: {result.stderr}"
    assert protected_state(project) == before, "data/, data.dvc and the version log are as they were"


def test_train_on_a_version_missing_from_the_log_is_refused_before_checkout(versions: Versions) -> None:
    from pipelines.training.train import train

    project = versions.project
    by_hand = hand_pushed_version(project)
    checkout_data(project, versions.v2)
    before = protected_state(project)

    with pytest.raises(LineageError, match=f"data version {by_hand} is not in the version log"):
        train(project, data_version=by_hand, job_id="not-logged")

    assert protected_state(project) == before, "data/ is not checked out to a version training refuses"


def test_checkout_still_restores_a_pushed_version_missing_from_the_log(versions: Versions) -> None:
    project = versions.project
    by_hand = hand_pushed_version(project)
    data = digests(project)
    checkout_data(project, versions.v1)

    restored = checkout_data(project, by_hand)

    assert restored.version == by_hand, f"the version pushed by hand is restored: {restored}"
    assert restored.created_at == "", f"it is not in the log, so it has no logged record: {restored}"
    assert digests(project) == data, "checkout restores any version the remote holds"


@pytest.mark.parametrize("loss", ["remote emptied", "one object lost"])
def test_train_refuses_a_version_the_remote_lacks(versions: Versions, loss: str) -> None:
    from pipelines.training.train import train

    project = versions.project
    remote = project.path(project.config.version.remote)
    if loss == "remote emptied":
        shutil.rmtree(remote)
    else:
        victim = sorted(path for path in (remote / "files" / "md5").rglob("*") if path.suffix != ".dir")[-1]
        victim.unlink()
    before = protected_state(project)

    with pytest.raises(LineageError) as raised:
        train(project, job_id="remote-lacks-it")

    message = str(raised.value)
    assert f"data version {versions.v2} is not in the remote 'artifacts/dvc-remote'" in message, (
        f"names both: {message}"
    )
    missing = f"{versions.v2}.dir" if loss == "remote emptied" else "1 object(s) missing"
    assert missing in message, f"the message says what is missing ({missing!r}): {message}"
    assert not raised.value.retryable, "waiting does not bring lost data back: not retryable"
    assert protected_state(project) == before, "data/, data.dvc and the version log are as they were"


@pytest.mark.parametrize("change", ["added", "removed", "changed"])
def test_train_refuses_a_workspace_that_differs_from_data_dvc(versions: Versions, change: str) -> None:
    from pipelines.training.train import train

    project = versions.project
    folder = project.dataset_dir / "images" / "c"
    target = folder / "new.png" if change == "added" else sorted(folder.glob("*.png"))[0]
    if change == "added":
        target.write_bytes(png_bytes(_pixels(3)))
    elif change == "removed":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes() + b"\x00")
    relative = target.relative_to(project.data_dir).as_posix()
    before = protected_state(project)

    with pytest.raises(LineageError) as raised:
        train(project, job_id=f"workspace-{change}")

    message = str(raised.value)
    assert f"differs from data version {versions.v2} recorded in data.dvc" in message, f"names the version: {message}"
    assert f": 1 {change} ({relative});" in message, f"names the {change} file: {message}"
    for fix in ("run `mlops version`", f"`mlops data checkout {versions.v2}`"):
        assert fix in message, f"the message says how to fix it ({fix!r}): {message}"
    assert protected_state(project) == before, "the refusal changes nothing"


def test_dvcignore_rules_are_honoured_by_the_workspace_check(versions: Versions) -> None:
    project = versions.project
    (project.root / ".dvcignore").write_text("*.tmp\n", encoding="utf-8")
    (project.dataset_dir / "scratch.tmp").write_text("DVC never versions this\n", encoding="utf-8")
    verify_lineage(project, versions.v2)  # an ignored file is not a difference (DVC decides)
    (project.dataset_dir / "late.txt").write_text("arrived after version 2\n", encoding="utf-8")
    with pytest.raises(LineageError, match=r": 1 added \(tiny/late.txt\);"):
        verify_lineage(project, versions.v2)


def test_lineage_of_a_consistent_workspace_is_vouched_for(versions: Versions) -> None:
    project = versions.project
    started = time.perf_counter()
    verify_lineage(project, versions.v2)
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0, f"the lineage check is cheap (no DVC command for a local remote): {elapsed:.2f} s"
    with pytest.raises(LineageError, match=f"points at data version {versions.v2}, not {versions.v1}"):
        verify_lineage(project, versions.v1)


def test_s3_remote_without_the_version_is_refused(
    tiny_project: Callable[..., Project], s3_endpoint: str, no_aws_profile: None
) -> None:
    import boto3

    project = tiny_project({"version": {"remote": "s3://mlops-data/datasets/tiny"}})
    write_tiny_dataset(project)
    version = version_data(project, source="sample").version
    verify_lineage(project, version)  # pushed: vouched for
    key = f"datasets/tiny/files/md5/{version[:2]}/{version[2:]}.dir"
    boto3.client("s3", endpoint_url=s3_endpoint).delete_object(Bucket="mlops-data", Key=key)

    with pytest.raises(LineageError, match=f"{version} is not in the remote 's3://mlops-data/datasets/tiny'"):
        verify_lineage(project, version)
