"""Scale-out on this machine's real engines, with the same DAG code as the default mode.

Airflow with its metadata database on PostgreSQL and the CeleryExecutor on Redis (a ``default`` and a
``gpu`` Celery worker; ``train`` is routed to ``gpu``), an MLflow tracking server on PostgreSQL with
basic auth and artifacts on S3 (``mlflow/start-server.sh``), and the DVC remote on S3. S3 is moto's
server on 127.0.0.1 (no MinIO here). Runs are triggered through the Airflow REST API.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.project import Project
from tests.support import PG, REPO_ROOT, Api, free_port, make_source, postgres_databases, wait_http, write_params

pytestmark = pytest.mark.slow

REPO = REPO_ROOT
REDIS_DB = 7


@pytest.fixture(scope="module")
def databases() -> Iterator[dict[str, str]]:
    """Two fresh PostgreSQL databases (Airflow metadata, MLflow backend), dropped afterwards."""
    with postgres_databases("airflow", "mlflow") as names:
        yield names


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """The moto S3 server on 127.0.0.1 with the artifact and DVC buckets."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="it-key",
        aws_secret_access_key="it-secret",
        region_name="us-east-1",
    )
    for bucket in ("mlflow-artifacts", "mlops-data"):
        client.create_bucket(Bucket=bucket)
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="module")
def credentials(s3: str) -> dict[str, str]:
    """What the services and tasks get from their environment (never from files)."""
    return {
        "AWS_ACCESS_KEY_ID": "it-key",
        "AWS_SECRET_ACCESS_KEY": "it-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3,
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": "it-" + secrets.token_hex(8),
    }


@pytest.fixture(scope="module")
def mlflow_server(
    databases: dict[str, str], s3: str, credentials: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The team tracking server, started by mlflow/start-server.sh with PostgreSQL, S3 and basic auth."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("mlflow") / "server.log"
    env = {
        **os.environ,
        **credentials,
        "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://{PG}/{databases['mlflow']}",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow-artifacts/team",
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        "MLFLOW_BIN": str(REPO / ".venv" / "bin" / "mlflow"),
        "MLFLOW_AUTH": "basic",
        "MLFLOW_ADMIN_USERNAME": credentials["MLFLOW_TRACKING_USERNAME"],
        "MLFLOW_ADMIN_PASSWORD": credentials["MLFLOW_TRACKING_PASSWORD"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(REPO / "mlflow" / "start-server.sh")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/health", 180, "the MLflow server", process)
            yield f"http://127.0.0.1:{port}"
        finally:
            if process.poll() is None:
                os.killpg(process.pid, 15)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(
    databases: dict[str, str],
    mlflow_server: str,
    credentials: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Any, Project, Path]]:
    """Airflow on PostgreSQL + Celery/Redis, for a tiny project whose DVC remote is on S3."""
    import redis

    from pipelines.platform.cluster import ClusterSettings, initialise, start

    base = tmp_path_factory.mktemp("scaleout")
    root = base / "project"
    root.mkdir()
    params = write_params(
        root,
        {
            "validate": {"min_images_per_class_per_split": 2},
            "train": {"epochs": 2, "per_replica_batch_size": 16, "learning_rate": 0.01},
            "gate": {"min_accuracy": 0.0, "min_macro_f1": 0.0, "max_primary_drop": 1.0, "max_class_recall_drop": 1.0},
            "registry": {"experiment": "scaleout-retrain", "model_name": "scaleout-classifier"},
            "version": {"remote": "s3://mlops-data/dvc"},
            "promote": {"p95_latency_budget_ms": 5000},
            "schedule": {"cron": None},
        },
    )
    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    settings = ClusterSettings(
        airflow_home=base / "airflow",
        sql_alchemy_conn=f"postgresql+psycopg2://{PG}/{databases['airflow']}",
        broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}",
        params_path=params,
        api_port=free_port(),
        log_server_ports=(free_port(), free_port()),
        extra_env={**credentials, "MLFLOW_TRACKING_URI": mlflow_server},
    )
    initialise(settings)
    running = start(settings)
    try:
        yield running, Project.load(params), make_source(base / "source", per_class=30)
    finally:
        running.stop()


def test_retrain_and_promote_on_postgres_celery_mlflow_server_and_s3(
    cluster: tuple[Any, Project, Path], mlflow_server: str, credentials: dict[str, str], s3: str
) -> None:
    import boto3
    from mlflow.tracking import MlflowClient

    running, project, source = cluster
    api = Api(running.api_url, running.settings.airflow_home)

    state, tasks = api.run("retrain", {"source": f"folder:{source}", "auto_promote": False})
    states = {task: item["state"] for task, item in tasks.items()}
    assert state == "success", f"retrain succeeds on the Celery cluster: {states}"
    assert tasks["train"]["queue"] == "gpu", "the train task is routed to the gpu queue"
    assert tasks["ingest"]["queue"] == "default", "other tasks stay on the default queue"

    state, tasks = api.run("promote", {"version": "challenger", "reason": "scale-out integration", "force": False})
    assert state == "success", f"promote succeeds: { {t: i['state'] for t, i in tasks.items()} }"

    os.environ.update({k: v for k, v in credentials.items() if k.startswith("MLFLOW_TRACKING_")})
    try:
        client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
        champion = client.get_model_version_by_alias("scaleout-classifier", "champion")
        assert str(champion.version) == "1", "version 1 is champion in the team server's registry"
        assert champion.tags["promotion_reason"] == "scale-out integration", "the promotion is audited"
    finally:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key, None)

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert refused.value.code == 401, "the tracking server refuses requests without credentials"

    bucket = boto3.client(
        "s3", endpoint_url=s3, aws_access_key_id="it-key", aws_secret_access_key="it-secret", region_name="us-east-1"
    )
    artifacts = bucket.list_objects_v2(Bucket="mlflow-artifacts", Prefix="team/").get("KeyCount", 0)
    dvc_objects = bucket.list_objects_v2(Bucket="mlops-data", Prefix="dvc/").get("KeyCount", 0)
    assert artifacts > 0, "model and run artifacts are stored in S3 through the MLflow server"
    assert dvc_objects > 0, "the data version was pushed to the DVC remote on S3"
    config_local = (project.root / ".dvc" / "config.local").read_text(encoding="utf-8")
    assert "it-secret" not in config_local, "no credential is written to the DVC config"
