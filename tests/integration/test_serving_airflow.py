"""The loop through Airflow: the promote DAG deploys to a running service; the monitor DAG turns drift into retraining.

Real task instances (``airflow dags test`` on SQLite, as ``make run`` does) over a tiny project: version 1 is
trained and registered in this process, then promoted by the ``promote`` DAG, whose ``deploy`` task calls the
running service (uvicorn in a thread, the admin token from the environment). The ``monitor`` DAG then runs on a
log of the dataset's own images (no asset event) and on a log of the same images inverted (the
``incoming_images`` asset is updated and the ``retrain`` DAG is queued).
"""

from __future__ import annotations

import io
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines.project import Project
from tests.support import free_port, versioned_project

pytestmark = pytest.mark.slow

MODEL = "tiny-classifier"
TOKEN = secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Loop:
    project: Project
    env: dict[str, str]
    port: int
    logs: Path
    images: list[np.ndarray]
    labels: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database(self) -> Path:
        return Path(self.env["AIRFLOW_HOME"]) / "airflow.db"


def overrides(port: int) -> dict[str, dict[str, Any]]:
    return {
        "promote": {"batch_size": 8, "latency_batches": 3, "p95_latency_budget_ms": 10_000.0, "timeout_seconds": 240},
        "serve": {"port": port, "endpoints": [f"http://127.0.0.1:{port}"], "poll_seconds": 60.0},
        "monitor": {
            "experiment": "tiny-monitor",
            "window_hours": 1.0,
            "min_images": 20,
            "min_feedback": 10,
            "min_live_accuracy": 0.6,
        },
        "schedule": {"cron": None},
    }


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    from pipelines.data.manifest import read_manifest
    from pipelines.data.packs import DatasetReader
    from pipelines.data.profile import compute_profile, measure_image, profile_path, write_profile
    from pipelines.data.versioning import version_data
    from pipelines.platform.airflow_home import prepare
    from pipelines.release.evaluate import evaluate_candidate, gate_candidate
    from pipelines.release.register import register_candidate
    from pipelines.training.train import train

    with pytest.MonkeyPatch.context() as patch:
        for name in ("MLFLOW_TRACKING_URI", "TF_CONFIG", "AIRFLOW_HOME", "MLOPS_PARAMS", "MLOPS_SERVE_ENDPOINTS"):
            patch.delenv(name, raising=False)
        patch.setenv("MLOPS_SERVE_TOKEN", TOKEN)  # Airflow's tasks inherit it: the deploy task's token
        root = tmp_path_factory.mktemp("loop") / "project"
        port = free_port()
        project = versioned_project(root, overrides(port))
        limits = project.config.ingest
        rows = read_manifest(project.manifest_path)
        stats = [
            measure_image(project.dataset_dir, row, limits.max_image_pixels, limits.max_file_bytes) for row in rows
        ]
        write_profile(profile_path(project), compute_profile(stats))
        version_data(project, source="tiny")  # the profile is part of the data, as after validation
        run_id = train(project, job_id="loop").run_id
        evaluate_candidate(project, run_id)
        assert gate_candidate(project, run_id).passed, "the tiny model passes its value thresholds"
        assert register_candidate(project, run_id).version == "1", "version 1 is registered as challenger"
        env = prepare(root)
        # The retrain DAG must be in the metadata database, and unpaused, for an asset event to queue it.
        airflow = str(Path(sys.executable).parent / "airflow")
        subprocess.run([airflow, "dags", "reserialize"], env=env, check=True, capture_output=True, timeout=300)
        # Unpaused, as in production (no scheduler runs here, so nothing starts it).
        subprocess.run([airflow, "dags", "unpause", "retrain"], env=env, check=True, capture_output=True, timeout=300)
        logs = root / "artifacts" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with DatasetReader(project.dataset_dir) as reader:
            pngs = [reader.read(row.path, project.config.ingest.max_file_bytes) for row in rows]
        images = [np.asarray(Image.open(io.BytesIO(png))) for png in pngs]
        yield Loop(project, env, port, logs, images, [row.label for row in rows])


def run_dag(
    loop: Loop, dag_id: str, name: str, env: dict[str, str], conf: dict[str, Any] | None = None
) -> dict[str, str]:
    from pipelines.platform.local_airflow import dags_test, task_states

    succeeded, run_id = dags_test(env, dag_id, loop.logs / f"{name}.log", conf=conf)
    states = dict(task_states(env, dag_id, run_id))
    log = (loop.logs / f"{name}.log").read_text(encoding="utf-8", errors="replace")
    assert succeeded, f"the {dag_id} run succeeds: {states}\n{log[-4000:]}"
    assert TOKEN not in log, "the admin token never appears in a task log"
    return states


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the service at {url} is ready within 60 s"
        time.sleep(0.2)


def serve_and_label(loop: Loop, log_dir: Path, images: list[np.ndarray]) -> None:
    """Send ``images`` through the service (logging to ``log_dir``) and feed every true label back."""
    from pipelines.release.serving.app import create_app
    from pipelines.release.serving.server import running_in_thread

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLOPS_SERVE_LOG_URI", str(log_dir))
        with running_in_thread(create_app(loop.project, token=TOKEN), "127.0.0.1", loop.port):
            wait_ready(loop.url)
            with httpx.Client(timeout=60) as client:
                for start in range(0, len(images), 16):
                    chunk = images[start : start + 16]
                    response = client.post(f"{loop.url}/predict", json={"images": [image.tolist() for image in chunk]})
                    assert response.status_code == 200, f"the service answers: {response.text}"
                    request_id = response.json()["request_id"]
                    for index, label in enumerate(loop.labels[start : start + 16]):
                        feedback = {"request_id": request_id, "image_index": index, "label": label}
                        assert client.post(f"{loop.url}/feedback", json=feedback).status_code == 200, "label accepted"


def asset_events(loop: Loop) -> list[tuple[str, str]]:
    """(extra, source task) of every event of the ``incoming_images`` asset."""
    with sqlite3.connect(loop.database) as connection:
        rows = connection.execute(
            "SELECT e.extra, e.source_task_id FROM asset_event e JOIN asset a ON a.id = e.asset_id "
            "WHERE a.name = 'incoming_images' ORDER BY e.id"
        ).fetchall()
    return [(str(extra), str(task)) for extra, task in rows]


def queued_runs(loop: Loop) -> list[str]:
    with sqlite3.connect(loop.database) as connection:
        rows = connection.execute("SELECT target_dag_id FROM asset_dag_run_queue").fetchall()
    return [str(row[0]) for row in rows]


def test_promote_dag_deploys_the_champion_to_the_running_service(loop: Loop) -> None:
    from pipelines.release.serving.app import create_app
    from pipelines.release.serving.server import running_in_thread

    with running_in_thread(create_app(loop.project, token=TOKEN), "127.0.0.1", loop.port):
        before = httpx.get(f"{loop.url}/health", timeout=5)
        assert before.status_code == 503, f"no champion before the promotion: {before.text}"
        conf = {"version": "1", "reason": "loop test: first production model", "force": False}
        states = run_dag(loop, "promote", "promote", loop.env, conf)
        assert states["deploy"] == "success", f"the deploy task ran and succeeded: {states}"
        served = httpx.get(f"{loop.url}/model", timeout=5).json()
        assert served["version"] == "1", f"the service serves the promoted version right after the DAG: {served}"
        assert served["promotion_reason"] == conf["reason"], f"with its audit trail: {served}"


def test_monitor_dag_on_in_distribution_traffic_emits_no_asset_event(loop: Loop, tmp_path: Path) -> None:
    serve_and_label(loop, tmp_path / "log", loop.images)
    states = run_dag(
        loop, "monitor", "monitor-in-distribution", {**loop.env, "MLOPS_SERVE_LOG_URI": str(tmp_path / "log")}
    )
    assert states == {"check": "success", "request_retrain": "skipped"}, f"no retrain requested: {states}"
    assert asset_events(loop) == [], f"the retrain asset is not updated: {asset_events(loop)}"


def test_monitor_dag_on_inverted_digits_updates_the_retrain_asset(loop: Loop, tmp_path: Path) -> None:
    inverted = [255 - image for image in loop.images]
    serve_and_label(loop, tmp_path / "log", inverted)
    states = run_dag(loop, "monitor", "monitor-inverted", {**loop.env, "MLOPS_SERVE_LOG_URI": str(tmp_path / "log")})
    assert states == {"check": "success", "request_retrain": "success"}, f"a retrain is requested: {states}"
    events = asset_events(loop)
    assert len(events) == 1, f"one event of the incoming_images asset: {events}"
    extra, task = events[0]
    assert task == "request_retrain", f"emitted by the monitor's request_retrain task: {events}"
    assert "input drift" in extra, f"the event says why: {extra}"
    assert "retrain" in queued_runs(loop), f"the retrain DAG is queued by the asset: {queued_runs(loop)}"
