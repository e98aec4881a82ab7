"""Passwords in URLs never reach an error or log line: ``pipelines.tracking.redact`` and where it is used."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.errors import VersioningError
from pipelines.project import Project
from pipelines.tracking import TrackingError, redact, with_retries
from tests.support import REPO_ROOT, free_port

ProjectFactory = Callable[..., Project]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "postgresql+psycopg2://mlflow:s3cr%40t@db:5432/mlflow",
            "postgresql+psycopg2://mlflow:***@db:5432/mlflow",
        ),
        ("broker redis://:hunter2@redis:6379/0 is down", "broker redis://:***@redis:6379/0 is down"),
        ("at https://admin:p@ss/w0rd@mlflow:5000/api (x)", "at https://admin:***@mlflow:5000/api (x)"),
        ("http://u:pw@host/x?email=a@b.c", "http://u:***@b.c"),  # up to the last '@': never less than the password
        ("s3://b/k?X-Amz-Signature=abc123&part=1", "s3://b/k?X-Amz-Signature=***&part=1"),
        ("http://h/cb?token=t0k&password=pw#frag", "http://h/cb?token=***&password=***#frag"),
        (
            "http://127.0.0.1:5000/health and mysql://user@host/db",
            "http://127.0.0.1:5000/health and mysql://user@host/db",
        ),
        ("no URL here: user:password@host", "no URL here: user:password@host"),
    ],
)
def test_redact_hides_url_passwords_and_secret_parameters(text: str, expected: str) -> None:
    assert redact(text) == expected, f"redact({text!r})"


def test_tracking_errors_are_redacted() -> None:
    def unreachable() -> None:
        raise ConnectionError("cannot reach http://admin:hunter2@mlflow:5000/api/2.0/mlflow/experiments/get")

    with pytest.raises(TrackingError) as raised:
        with_retries(unreachable, "open experiment 'x' at http://admin:hunter2@mlflow:5000", attempts=1, base_delay=0)
    message = str(raised.value)
    assert "hunter2" not in message, f"the password is not in the message: {message}"
    assert "http://admin:***@mlflow:5000" in message, f"the message still says where: {message}"


def test_dvc_errors_are_redacted(tiny_project: ProjectFactory) -> None:
    from pipelines.data.dvc import dvc_session

    project = tiny_project({"version": {"remote": "https://dvc:hunter2@store.example/dvc"}})
    with pytest.raises(VersioningError) as raised, dvc_session(project):
        pass
    message = str(raised.value)
    assert "version.remote" in message, f"the message names the key: {message}"
    assert "hunter2" not in message, f"the remote's password is not in the message: {message}"


def test_dvc_failure_output_is_redacted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pipelines.data import dvc

    script = "import sys; print('ERROR: failed to push to s3://k:hunter2@minio:9000/b', file=sys.stderr); sys.exit(1)"
    fake = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dvc.subprocess, "run", lambda *args, **kwargs: fake)
        with caplog.at_level(logging.DEBUG), pytest.raises(VersioningError) as raised:
            dvc.run_dvc(tmp_path, "push")
    assert "hunter2" not in str(raised.value), f"DVC's output is redacted: {raised.value}"
    assert "s3://k:***@minio:9000/b" in str(raised.value), f"and still says where: {raised.value}"


def test_cluster_errors_are_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.platform import cluster

    conn = "postgresql+psycopg2://airflow:hunter2@db:5432/airflow"
    failed = subprocess.CompletedProcess(["airflow"], 1, "", f"sqlalchemy: cannot connect to {conn}")
    monkeypatch.setattr(cluster.subprocess, "run", lambda *args, **kwargs: failed)
    settings = cluster.ClusterSettings(tmp_path / "home", conn, "redis://:hunter2@redis:6379/0", tmp_path / "p.yaml")
    with pytest.raises(cluster.ClusterError) as raised:
        cluster.initialise(settings)
    assert "hunter2" not in str(raised.value), f"the database password is not in the message: {raised.value}"
    assert "airflow:***@db" in str(raised.value), f"the message still names the database: {raised.value}"


def test_cli_error_with_an_unreachable_tracking_server_hides_its_password(tiny_project: ProjectFactory) -> None:
    project = tiny_project()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"http://admin:hunter2@127.0.0.1:{free_port()}/",
        "MLOPS_TRACKING_ATTEMPTS": "1",
        "MLOPS_TRACKING_BASE_DELAY": "0",
    }
    run = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "--params", str(project.params_path), "status"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 1, f"`mlops status` fails with status 1: {run.stderr}"
    assert run.stderr.startswith("error: MLflow tracking server unreachable"), f"the error says why: {run.stderr}"
    assert "http://admin:***@127.0.0.1" in run.stderr, f"the error says where: {run.stderr}"
    assert "hunter2" not in run.stdout + run.stderr, f"the password is printed nowhere: {run.stderr}"
