"""The warm step host of ``make run``.

Steps run in the child with the caller's environment and output, errors come back whole, a step cut short or a
host that dies never leaves work running unseen, and ``run_step`` uses the host.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
from airflow.sdk.exceptions import AirflowFailException

from pipelines.errors import IngestError, VersioningError
from pipelines.platform import step_host
from pipelines.platform.orchestration import run_step
from pipelines.platform.step_host import StepHost, StepHostError, active_host, hosting

# ------------------------------------------------------------------ steps the host runs (imported by name there)


def where_and_what(name: str) -> dict[str, object]:
    """The host's pid, one environment variable, the working folder; prints a line to stdout and stderr."""
    print(f"stdout from the host {os.getpid()}", flush=True)
    print("stderr from the host", file=sys.stderr, flush=True)
    return {"pid": os.getpid(), "value": os.environ.get(name), "cwd": os.getcwd()}


def fail_with(kind: str) -> None:
    """Raise a user error that retrying cannot fix, or one that it may."""
    if kind == "ingest":
        raise IngestError("folder data/x: no images")
    raise VersioningError("dvc push failed: remote down")


def record_modules(path: str, names: list[str]) -> None:
    """A warm-up: write which of ``names`` the host has imported."""
    Path(path).write_text(json.dumps({name: name in sys.modules for name in names}), encoding="utf-8")


def sleep_for(seconds: float) -> str:
    """A step that takes a while."""
    time.sleep(seconds)
    return "slept"


def exit_abruptly(status: int) -> None:
    """A step whose process dies (a crash, the OOM killer)."""
    os._exit(status)


def unpicklable_result() -> object:
    """A result that cannot travel back to the task."""
    return lambda: None


# ----------------------------------------------------------------------------------------------- tests


@pytest.fixture
def host() -> Iterator[StepHost]:
    with hosting(()) as started:
        yield started


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_step_runs_in_the_host_with_the_callers_environment_and_output(
    host: StepHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLOPS_STEP_HOST_PROBE", "set by the task")
    output = tmp_path / "task.log"
    saved = os.dup(1), os.dup(2)
    with output.open("w") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            seen = host.call(where_and_what, "MLOPS_STEP_HOST_PROBE")
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)
    assert seen["pid"] == host.process.pid != os.getpid()
    assert seen["value"] == "set by the task"
    assert seen["cwd"] == os.getcwd()
    written = output.read_text(encoding="utf-8")
    assert f"stdout from the host {host.process.pid}" in written
    assert "stderr from the host" in written

    monkeypatch.delenv("MLOPS_STEP_HOST_PROBE")
    assert host.call(where_and_what, "MLOPS_STEP_HOST_PROBE")["value"] is None


def test_the_host_imports_its_preload_before_its_warm_ups(tmp_path: Path) -> None:
    marker = tmp_path / "modules.json"
    names = ["xml.dom.minidom", "wave"]
    with hosting(names, [(record_modules, (str(marker), [*names, "imaplib"]))]):
        _wait_for(marker)
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    assert recorded == {"xml.dom.minidom": True, "wave": True, "imaplib": False}


def test_errors_come_back_with_their_type_message_and_the_hosts_traceback(host: StepHost) -> None:
    with pytest.raises(IngestError, match="folder data/x: no images") as raised:
        host.call(fail_with, "ingest")
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert f"step host, pid {host.process.pid}" in notes
    assert "fail_with" in notes
    assert host.alive  # a failed step leaves the host serving


def test_run_step_uses_the_active_host_and_keeps_the_retry_rules(host: StepHost) -> None:
    assert active_host() is host
    assert run_step(where_and_what, "PATH")["pid"] == host.process.pid
    with pytest.raises(AirflowFailException, match="no images"):
        run_step(fail_with, "ingest")  # a user error: fail the task at once
    with pytest.raises(VersioningError, match="remote down"):
        run_step(fail_with, "versioning")  # retryable: Airflow retries it


def test_a_step_cut_short_in_the_task_kills_the_host() -> None:
    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError("execution_timeout")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        with hosting(()) as host:
            signal.alarm(1)
            with pytest.raises(TimeoutError):
                host.call(sleep_for, 60.0)
            assert host.process.poll() is not None  # killed, not left sleeping
            assert active_host() is None
            assert run_step(sleep_for, 0.0) == "slept"  # later steps run in this process
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_host_that_dies_mid_step_is_named_and_not_used_again() -> None:
    with hosting(()) as host:
        with pytest.raises(StepHostError, match=r"died running .*exit_abruptly \(exit status 3\)"):
            host.call(exit_abruptly, 3)
        assert active_host() is None
        with pytest.raises(StepHostError, match="not running"):
            host.call(sleep_for, 0.0)


def test_a_result_that_does_not_pickle_is_an_error_not_a_hang(host: StepHost) -> None:
    with pytest.raises(StepHostError, match="does not pickle"):
        host.call(unpicklable_result)
    assert host.call(sleep_for, 0.0) == "slept"


def test_stopping_ends_the_host_and_clears_it() -> None:
    with hosting(()) as host:
        pid = host.process.pid
    assert host.process.returncode == 0
    assert active_host() is None
    assert step_host._ACTIVE is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
