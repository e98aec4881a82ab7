"""The project's own Airflow home on SQLite: its environment, its metadata database, and ``make ui``.

:func:`airflow_env` is the environment of every Airflow process of this project (``airflow_home/``, the DAG
folder, SQLite, LocalExecutor, :data:`SCHEDULER_TUNING`); :func:`prepare_database` migrates the database unless it
is at Airflow's head revision and creates the one-slot ``dvc`` pool (:func:`prepare` does so in a child process).
:func:`start_ui` serves the same stores with ``airflow standalone`` and the MLflow UI. Running the DAGs is
:mod:`pipelines.platform.local_airflow`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pipelines.project import DVC_POOL, Project

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
AIRFLOW_PORT = 8080
MLFLOW_PORT = 5000


def airflow_env(root: Path) -> dict[str, str]:
    """The environment of every Airflow run of this project (Airflow home, DAG folder, SQLite, tuning)."""
    home = root / "airflow_home"
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": env.get("AIRFLOW__CORE__EXECUTOR", "LocalExecutor"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": env.get(
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home / 'airflow.db'}"
            ),
            "AIRFLOW__API__HOST": env.get("AIRFLOW__API__HOST", "127.0.0.1"),
            "AIRFLOW__API__PORT": env.get("AIRFLOW__API__PORT", str(AIRFLOW_PORT)),
            "MLOPS_PARAMS": str(root / "params.yaml"),
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONWARNINGS": env.get("PYTHONWARNINGS", "ignore"),
        }
    )
    env.update({key: env.get(key, value) for key, value in SCHEDULER_TUNING.items()})
    port = env["AIRFLOW__API__PORT"]
    env.setdefault("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"http://127.0.0.1:{port}/execution/")
    return env


SCHEDULER_TUNING = {
    # The scheduler sleeps this long after a loop with nothing to do: with the default 1 s most of the gap
    # between one task's end and the next one's start is this sleep (0.25 s costs ~1% of a core when idle).
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25",
    # Two DAG files that change only when the code does: re-parse them every 2 minutes, not every 30 s,
    # with one parser process, so parsing does not compete with tasks for the two cores.
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "120",
    "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
    # Two cores: more parallel task processes only make each slower.
    "AIRFLOW__CORE__PARALLELISM": "4",
    # How often a running task's supervisor reports; a task that ends between two reports waited for the next,
    # adding up to 5 s to short tasks with the default (measured on skipped tasks).
    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
}
"""Settings for the scheduled path (``make ui``, the cluster); ``DAG.test`` runs do not use a scheduler."""


def use_airflow_env(root: Path) -> None:
    """Point this process at the project's Airflow home; must happen before Airflow is first imported."""
    if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != str(root / "airflow_home"):
        raise RuntimeError("Airflow was imported before the project's Airflow home was set")
    os.environ.update(airflow_env(root))
    Path(os.environ["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)


def prepare_database() -> None:
    """Migrate the metadata database unless it is at Airflow's head revision; create the ``dvc`` pool."""
    from airflow import settings
    from airflow.models.pool import Pool
    from airflow.utils import db as airflow_db
    from airflow.utils.session import create_session
    from alembic.migration import MigrationContext

    engine = settings.engine
    if engine is None:
        raise RuntimeError("Airflow's metadata database engine is not configured")
    with engine.connect() as connection:
        current = set(MigrationContext.configure(connection).get_current_heads())
    if current != set(airflow_db._get_script_object().get_heads()):
        airflow_db.upgradedb()
    with create_session() as session:
        Pool.create_or_update_pool(
            DVC_POOL,
            slots=1,
            description="DVC workspace: one writer at a time",
            include_deferred=False,
            session=session,
        )


def prepare(root: Path) -> dict[str, str]:
    """Create the Airflow home, migrate its database and create the ``dvc`` pool (in a child process)."""
    env = airflow_env(root)
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pipelines.platform.local_airflow", "prepare", "--params", env["MLOPS_PARAMS"]]
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return env


def start_ui(project: Project) -> int:
    """Start ``airflow standalone`` and ``mlflow ui`` on 127.0.0.1 and print where they are."""
    from pipelines.tracking import tracking_uri

    env = prepare(project.root)
    bin_dir = Path(sys.executable).parent
    project.logs_dir.mkdir(parents=True, exist_ok=True)
    mlflow_log = (project.logs_dir / "mlflow-ui.log").open("a")
    airflow_log = (project.logs_dir / "airflow-standalone.log").open("a")
    # MLflow 3's job runner (unused here) starts huey consumers that spin the CPU and outlive the UI.
    mlflow_env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env}
    mlflow_server = subprocess.Popen(
        [str(bin_dir / "mlflow"), "ui", "--host", "127.0.0.1", "--port", str(MLFLOW_PORT),
         "--backend-store-uri", tracking_uri(project)],
        env=mlflow_env, stdout=mlflow_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    standalone = subprocess.Popen(
        [str(bin_dir / "airflow"), "standalone"], env=env, stdout=airflow_log, stderr=subprocess.STDOUT
    )
    passwords = Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    for _ in range(120):
        if passwords.exists():
            break
        time.sleep(1)
    login = passwords.read_text(encoding="utf-8").strip() if passwords.exists() else "(not generated yet)"
    print(f"Airflow UI  http://127.0.0.1:{env['AIRFLOW__API__PORT']}  login (user: password): {login}")
    print(f"MLflow UI   http://127.0.0.1:{MLFLOW_PORT}")
    print("logs in artifacts/logs/; press Ctrl-C to stop both")
    try:
        standalone.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for process in (standalone, mlflow_server):
            process.terminate()
        for process in (standalone, mlflow_server):
            process.wait(timeout=30)
    return 0
