"""Airflow scaled out on one host's existing engines: PostgreSQL metadata, CeleryExecutor on Redis.

``python -m pipelines.platform.cluster up`` configures Airflow from the environment and starts the API server,
scheduler, DAG processor, triggerer and two Celery workers: one on queue ``default``, one on queue
``gpu`` (where the ``train`` task is routed with ``MLOPS_TRAIN_QUEUE=gpu``; on a GPU host that worker
runs the training launcher over the host's GPUs). On several hosts, run the ``gpu`` worker on each GPU
host with the same settings. Settings (environment):

* ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` – ``postgresql+psycopg2://user:pass@host:5432/airflow`` (required)
* ``AIRFLOW__CELERY__BROKER_URL`` – ``redis://host:6379/0`` (required)
* ``AIRFLOW__CELERY__RESULT_BACKEND`` – default ``db+`` + the metadata database URL
* ``AIRFLOW_HOME`` (default ``./airflow_cluster``), ``AIRFLOW__API__PORT`` (default 8080)
* ``MLFLOW_TRACKING_URI``, ``AWS_*`` for the tracking server and S3, passed through to the tasks.

The same functions start the cluster in ``tests/integration/test_scaleout.py``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pipelines.errors import PipelineError
from pipelines.platform.airflow_home import DAGS_FOLDER
from pipelines.tracking import redact

BIN = Path(sys.executable).parent


class ClusterError(PipelineError):
    """The cluster is misconfigured or one of its services did not come up."""


@dataclass(frozen=True)
class ClusterSettings:
    """Everything that differs between one machine and a scaled-out Airflow."""

    airflow_home: Path
    sql_alchemy_conn: str
    broker_url: str
    params_path: Path
    result_backend: str = ""
    api_port: int = 8080
    log_server_ports: tuple[int, int] = (8793, 8794)
    train_queue: str = "gpu"
    executor: str = "CeleryExecutor"
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_environment(cls, params_path: Path) -> ClusterSettings:
        """Read the settings from ``AIRFLOW__...`` variables; missing required ones raise ClusterError."""
        conn = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
        broker = os.environ.get("AIRFLOW__CELERY__BROKER_URL", "")
        if not conn.startswith("postgresql"):
            raise ClusterError("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN: set a postgresql+psycopg2:// URL")
        if not broker:
            raise ClusterError("AIRFLOW__CELERY__BROKER_URL: set the Redis broker, e.g. redis://127.0.0.1:6379/0")
        return cls(
            airflow_home=Path(os.environ.get("AIRFLOW_HOME", "airflow_cluster")).resolve(),
            sql_alchemy_conn=conn,
            broker_url=broker,
            params_path=params_path.resolve(),
            result_backend=os.environ.get("AIRFLOW__CELERY__RESULT_BACKEND", ""),
            api_port=int(os.environ.get("AIRFLOW__API__PORT", "8080")),
        )


def cluster_env(settings: ClusterSettings) -> dict[str, str]:
    """The environment of every Airflow process of the cluster."""
    result_backend = settings.result_backend or "db+" + settings.sql_alchemy_conn
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(settings.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": settings.executor,
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": settings.sql_alchemy_conn,
            "AIRFLOW__CELERY__BROKER_URL": settings.broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": result_backend,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(settings.api_port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{settings.api_port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "MLOPS_PARAMS": str(settings.params_path),
            "MLOPS_TRAIN_QUEUE": settings.train_queue if settings.executor == "CeleryExecutor" else "default",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONWARNINGS": "ignore",
        }
    )
    from pipelines.platform.airflow_home import SCHEDULER_TUNING

    env.update({key: os.environ.get(key, value) for key, value in SCHEDULER_TUNING.items()})
    env.update(settings.extra_env)
    return env


@dataclass
class Cluster:
    """The running Airflow processes, their logs, and how to reach the API."""

    settings: ClusterSettings
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, IO[bytes]] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        """Base URL of the Airflow API server."""
        return f"http://127.0.0.1:{self.settings.api_port}"

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL after 20 s) and close the logs."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for handle in self.logs.values():
            handle.close()

    def check_alive(self) -> None:
        """Raise ClusterError naming any service that has exited."""
        dead = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
        if dead:
            raise ClusterError(f"Airflow services exited: {dead} (logs in {self.settings.airflow_home / 'logs'})")


def initialise(settings: ClusterSettings) -> None:
    """Migrate the metadata database and create the one-slot ``dvc`` pool."""
    env = cluster_env(settings)
    settings.airflow_home.mkdir(parents=True, exist_ok=True)
    for args in (["db", "migrate"], ["pools", "set", "dvc", "1", "DVC workspace: one writer at a time"]):
        completed = subprocess.run([str(BIN / "airflow"), *args], env=env, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise ClusterError(redact(f"airflow {' '.join(args)} failed: {completed.stderr.strip()[-2000:]}"))


def start(settings: ClusterSettings) -> Cluster:
    """Start the API server, scheduler, DAG processor, triggerer and (with Celery) the two workers."""
    env = cluster_env(settings)
    log_dir = settings.airflow_home / "logs" / "services"
    log_dir.mkdir(parents=True, exist_ok=True)
    default_port, gpu_port = settings.log_server_ports
    services: dict[str, tuple[list[str], dict[str, str]]] = {
        "api-server": (["api-server"], {}),
        "scheduler": (["scheduler"], {}),
        "dag-processor": (["dag-processor"], {}),
        "triggerer": (["triggerer"], {"AIRFLOW__TRIGGERER__DEFAULT_CAPACITY": "100"}),
        "worker-default": (
            ["celery", "worker", "--queues", "default", "--concurrency", "2", "--celery-hostname", "default@%h"],
            {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(default_port)},
        ),
        "worker-gpu": (
            ["celery", "worker", "--queues", settings.train_queue, "--concurrency", "1", "--celery-hostname", "gpu@%h"],
            {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(gpu_port)},
        ),
    }
    if settings.executor != "CeleryExecutor":
        services = {name: spec for name, spec in services.items() if not name.startswith("worker-")}
    cluster = Cluster(settings)
    try:
        for name, (args, extra) in services.items():
            log = (log_dir / f"{name}.log").open("ab")
            cluster.logs[name] = log
            cluster.processes[name] = subprocess.Popen(
                [str(BIN / "airflow"), *args],
                env={**env, **extra},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_api(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_for_api(cluster: Cluster, timeout: float = 180.0) -> None:
    """Wait until the API server answers its health endpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster.check_alive()
        try:
            with urllib.request.urlopen(f"{cluster.api_url}/api/v2/monitor/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise ClusterError(f"the Airflow API server did not answer on {cluster.api_url} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.platform.cluster up``: initialise and run the cluster until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=["up"])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        settings = ClusterSettings.from_environment(args.params)
        initialise(settings)
        cluster = start(settings)
    except PipelineError as error:
        print(redact(f"error: {error}"), file=sys.stderr)
        return 1
    print(f"Airflow (CeleryExecutor) up: API {cluster.api_url}; logs in {settings.airflow_home / 'logs' / 'services'}")
    print(f"services: {', '.join(cluster.processes)}; train tasks go to queue {settings.train_queue!r}")
    try:
        while True:
            cluster.check_alive()
            time.sleep(5)
    except KeyboardInterrupt:
        return 0
    except ClusterError as error:
        print(redact(f"error: {error}"), file=sys.stderr)
        return 1
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
