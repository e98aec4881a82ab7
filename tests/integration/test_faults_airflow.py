"""Fault injection through a real Airflow (scheduler, LocalExecutor, PostgreSQL metadata) and an MLflow server.

* the train task's process is killed mid-training: Airflow retries it, the retry resumes from the
  checkpoint and exactly one model version is registered;
* the MLflow server is stopped while the retrain runs: tasks retry and the run succeeds once it is back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.project import Project
from tests.support import PG, REPO_ROOT, Api, free_port, make_source, postgres_databases, wait_http, write_params

pytestmark = [pytest.mark.slow, pytest.mark.faults]

REPO = REPO_ROOT
MODEL = "faults-classifier"


class MlflowServer:
    """A tracking server on a fixed port that can be stopped and started again over the same stores."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            str(REPO / ".venv" / "bin" / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination", (self.folder / "artifacts").as_uri(),
            "--serve-artifacts", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        log = (self.folder / "server.log").open("ab")
        env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # its huey consumers would outlive the server
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_http(f"{self.url}/health", 180, "the MLflow server", self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)
        self.process = None


@pytest.fixture(scope="module")
def environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, Project, Path, MlflowServer]]:
    """Airflow services on PostgreSQL with the LocalExecutor, an MLflow server, and a tiny project."""
    from pipelines.platform.cluster import ClusterSettings, initialise, start

    base = tmp_path_factory.mktemp("faults")
    (base / "mlflow").mkdir()
    server = MlflowServer(base / "mlflow")
    server.start()
    root = base / "project"
    root.mkdir()
    params = write_params(
        root,
        {
            "validate": {"min_images_per_class_per_split": 2},
            "augment": {"copies": 2},
            "train": {"epochs": 8, "per_replica_batch_size": 8, "learning_rate": 0.01, "workers": 1},
            "gate": {"min_accuracy": 0.0, "min_macro_f1": 0.0, "max_primary_drop": 1.0, "max_class_recall_drop": 1.0},
            "registry": {"experiment": "faults-retrain", "model_name": MODEL},
            "schedule": {"cron": None},
        },
    )
    source = make_source(base / "source", per_class=60)
    with postgres_databases("airflow") as names:
        settings = ClusterSettings(
            airflow_home=base / "airflow",
            sql_alchemy_conn=f"postgresql+psycopg2://{PG}/{names['airflow']}",
            broker_url="",
            params_path=params,
            api_port=free_port(),
            executor="LocalExecutor",
            extra_env={"MLFLOW_TRACKING_URI": server.url, "MLOPS_TRACKING_ATTEMPTS": "3"},
        )
        initialise(settings)
        cluster = start(settings)
        try:
            api = Api(cluster.api_url, settings.airflow_home)
            yield api, Project.load(params), source, server
        finally:
            cluster.stop()
            server.stop()


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def client(server: MlflowServer) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.url, registry_uri=server.url)


def test_killed_train_task_is_retried_resumes_and_registers_once(
    environment: tuple[Api, Project, Path, MlflowServer],
) -> None:
    from pipelines.training.train import job_dir_for

    api, project, source, server = environment
    run_id = api.trigger("retrain", {"source": f"folder:{source}", "auto_promote": False})
    job_dir = job_dir_for(project, f"retrain-{run_id}")
    progress = job_dir / "progress-worker-0.jsonl"

    def two_epochs_done() -> bool:
        return progress.exists() and progress.read_text(encoding="utf-8").count("\n") >= 2

    wait_for(two_epochs_done, 900, "two finished epochs of the train task")
    pid = int((job_dir / "worker-0.pid").read_text(encoding="utf-8"))
    os.kill(pid, signal.SIGKILL)
    state, tasks = api.wait_for_run("retrain", run_id)

    assert state == "success", f"the run succeeds after the kill: { {t: i['state'] for t, i in tasks.items()} }"
    assert tasks["train"]["try_number"] >= 2, f"Airflow retried the killed task: try {tasks['train']['try_number']}"
    result = json.loads((job_dir / "result.json").read_text(encoding="utf-8"))
    assert result["first_epoch_of_last_attempt"] >= 2, f"the retry resumed from the checkpoint: {result}"
    versions = client(server).search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 1, f"exactly one model version is registered: {[v.version for v in versions]}"
    experiment = client(server).get_experiment_by_name("faults-retrain")
    runs = client(server).search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"the retry continued the same MLflow run instead of starting another: {len(runs)}"


def test_mlflow_outage_during_retrain_is_survived(environment: tuple[Api, Project, Path, MlflowServer]) -> None:
    from pipelines.training.train import job_dir_for

    api, project, source, server = environment
    before = len(client(server).search_model_versions(f"name = '{MODEL}'"))
    # force: the same data, code and params as the test above would otherwise reuse its run and never train.
    run_id = api.trigger("retrain", {"source": f"folder:{source}", "auto_promote": False, "force": True})
    job_dir = job_dir_for(project, f"retrain-{run_id}")
    wait_for(lambda: (job_dir / "job.json").exists(), 900, "the train task to start")
    server.stop()
    outage_started = time.monotonic()
    time.sleep(45)
    result_during_outage = (job_dir / "result.json").exists()
    server.start()
    state, tasks = api.wait_for_run("retrain", run_id)

    assert not result_during_outage, "training could not finish while the tracking server was down"
    assert time.monotonic() - outage_started > 45, "the server was down for 45 s"
    assert state == "success", f"the run succeeds once MLflow is back: { {t: i['state'] for t, i in tasks.items()} }"
    retried = {task: item["try_number"] for task, item in tasks.items() if item["try_number"] > 1}
    assert retried, "at least one task failed against the stopped server and was retried"
    after = len(client(server).search_model_versions(f"name = '{MODEL}'"))
    assert after == before + 1, f"the candidate is registered exactly once: {before} -> {after}"
