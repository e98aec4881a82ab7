"""Two real TensorFlow workers on 127.0.0.1 through the launcher (MultiWorkerMirroredStrategy)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import versioned_project

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _local_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    # Two workers share two cores: one thread pool each keeps them from starving each other.
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "1")
    monkeypatch.setenv("TF_NUM_INTEROP_THREADS", "1")


def read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text(encoding="utf-8")))


def test_two_workers_train_one_model_with_identical_weights(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import connect
    from pipelines.training.train import train

    project = versioned_project(tmp_path / "project", {"train": {"epochs": 2}}, packed=True)  # read from images.zip
    result = train(project, workers=2, job_id="two-workers")
    job_dir = Path(result.job_dir)
    chief, other = read_json(job_dir / "worker-0.json"), read_json(job_dir / "worker-1.json")
    assert result.strategy == "multi_worker_mirrored", f"two workers use MultiWorkerMirrored: {result.strategy}"
    assert result.replicas == 2, f"one replica per worker, two in sync: {result.replicas}"
    assert result.global_batch_size == 32, "global batch = per-replica batch 16 x 2 replicas"
    assert chief["weights_checksum"] == pytest.approx(other["weights_checksum"], rel=0, abs=1e-9), (
        "both workers end with the same weights"
    )
    assert chief["history"]["loss"] == other["history"]["loss"], "both workers report the same all-reduced loss"
    connect(project)
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("tiny-retrain").experiment_id])
    assert len(runs) == 1, f"only the chief logs to MLflow: one run, got {len(runs)}"
    assert runs[0].data.params["workers"] == "2", "the run records two workers"


def test_killed_worker_group_resumes_from_its_last_epoch(tmp_path: Path) -> None:
    from pipelines.training.train import job_dir_for, train

    epochs = 8
    project = versioned_project(
        tmp_path / "project", {"train": {"epochs": epochs, "per_replica_batch_size": 4}}, per_split=16
    )
    job_dir = job_dir_for(project, "fault")
    killed: dict[str, Any] = {}

    def kill_worker_one_mid_training() -> None:
        progress = job_dir / "progress-worker-0.jsonl"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            done = progress.read_text(encoding="utf-8").count("\n") if progress.exists() else 0
            if done >= 2:
                pid = read_json(job_dir / "workers.json")["pids"][1]
                os.kill(pid, signal.SIGKILL)
                killed["after_epochs"] = done
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_worker_one_mid_training, daemon=True)
    killer.start()
    result = train(project, workers=2, job_id="fault", max_restarts=1)
    killer.join(timeout=5)
    assert killed.get("after_epochs", 0) >= 2, "worker 1 was killed after two finished epochs"
    assert read_json(job_dir / "workers.json")["attempt"] == 1, "the launcher restarted the worker group once"
    assert 0 < result.first_epoch_of_last_attempt < epochs, (
        f"the restarted group resumed at epoch {result.first_epoch_of_last_attempt}, not from scratch"
    )
    chief, other = read_json(job_dir / "worker-0.json"), read_json(job_dir / "worker-1.json")
    assert chief["weights_checksum"] == pytest.approx(other["weights_checksum"], rel=0, abs=1e-9), (
        "after the restart both workers still agree on the weights"
    )
    epochs_logged = [
        json.loads(line)["epoch"] for line in (job_dir / "progress-worker-0.jsonl").read_text().splitlines()
    ]
    assert max(epochs_logged) == epochs - 1, f"training completed all {epochs} epochs: {epochs_logged}"
