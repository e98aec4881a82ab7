"""Airflow on one machine, with nothing to set up: a project-local Airflow home on SQLite.

``python -m pipelines.platform.local_airflow run`` (what ``make run`` calls) runs the real ``retrain`` DAG and
then the ``promote`` DAG (``version=challenger``) in ONE Python process through Airflow's own API
(``DAG.test``): real DAG runs and task instances, recorded in the metadata database, with each task run in
this process, so TensorFlow, MLflow and Great Expectations are imported once for both DAGs instead of once per
``airflow`` command. It prepares the database in-process (migrated only when not at Airflow's head
revision), creates the one-slot ``dvc`` pool, prints one line per task and a summary. Task output goes to a
log file per DAG run. ``... dag DAG_ID --conf JSON`` runs one DAG the same way (what the end-to-end tests
and benchmarks call), and ``... ui`` starts ``airflow standalone`` and the MLflow UI over the same stores.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from pipelines.project import DVC_POOL, Project

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
AIRFLOW_PORT = 8080
MLFLOW_PORT = 5000
RESULT_SUFFIX = ".result.json"


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
}
"""Settings for the scheduled path (``make ui``, the cluster); ``DAG.test`` runs do not use a scheduler."""


# ------------------------------------------------------------------------------------- in this process


@dataclass(frozen=True)
class TaskOutcome:
    """One task instance of a finished DAG run, as recorded in the metadata database."""

    task_id: str
    state: str
    seconds: float | None
    try_number: int


@dataclass(frozen=True)
class DagOutcome:
    """A finished DAG run: its id, state, wall time in this process and its task instances."""

    dag_id: str
    run_id: str
    state: str
    seconds: float
    tasks: list[TaskOutcome] = field(default_factory=list)
    log: str = ""

    @property
    def succeeded(self) -> bool:
        """Whether the run ended in ``success``."""
        return self.state == "success"


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


def _warm_execution_api() -> None:
    """Build ``DAG.test``'s in-process Execution API now (seconds, once), not inside the first task's time."""
    import httpx
    from airflow.sdk.execution_time.supervisor import in_process_api_server

    with httpx.Client(transport=in_process_api_server().transport, base_url="http://in-process.invalid./") as client:
        client.get("/health")


@contextlib.contextmanager
def _output_to(log: Path) -> Iterator[TextIO]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``log``; yield the terminal."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    with log.open("a", encoding="utf-8") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)
            terminal.close()


def load_dags() -> dict[str, Any]:
    """Parse the DAG folder with Airflow's own parser; an import error stops with its message."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    if bag.import_errors:
        details = "\n".join(f"  {path}: {error.strip().splitlines()[-1]}" for path, error in bag.import_errors.items())
        raise RuntimeError(f"the DAG files do not import:\n{details}")
    return dict(bag.dags)


def run_dag(dag: Any, log: Path, conf: dict[str, Any] | None = None, *, echo: bool = True) -> DagOutcome:
    """One real run of ``dag`` in this process (``DAG.test``); task output goes to ``log``."""
    if echo:
        print(f"[{dag.dag_id}] running through Airflow (log: {log})", flush=True)
    started = time.monotonic()
    with _output_to(log):
        dag_run = dag.test(run_conf=conf)
    seconds = time.monotonic() - started
    instances = sorted(dag_run.get_task_instances(), key=lambda ti: (ti.start_date is None, ti.start_date))
    tasks = [TaskOutcome(ti.task_id, str(ti.state), ti.duration, int(ti.try_number or 0)) for ti in instances]
    outcome = DagOutcome(dag.dag_id, str(dag_run.run_id), str(dag_run.state), seconds, tasks, str(log))
    if echo:
        for task in tasks:
            took = f"{task.seconds:6.1f} s" if task.seconds is not None else "      -"
            print(f"[{dag.dag_id}]   {task.task_id:<16} {task.state:<16} {took}")
        print(f"[{dag.dag_id}] run {outcome.run_id}: {outcome.state} in {seconds:.0f} s", flush=True)
    return outcome


def run_pipeline(project: Project, *, force: bool = False) -> int:
    """Retrain through Airflow, promote the challenger, print the summary; return the exit status."""
    started = time.monotonic()
    root = project.root
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    print(f"Airflow home {root / 'airflow_home'} (SQLite); preparing the metadata database", flush=True)
    use_airflow_env(root)
    prepare_database()
    dags = load_dags()
    _warm_execution_api()
    retrain = run_dag(
        dags["retrain"],
        project.logs_dir / f"retrain-{stamp}.log",
        {"source": project.config.ingest.source, "force": force},
    )
    if not retrain.succeeded:
        print("retrain did not succeed: see the task states above and the log; the champion is unchanged")
    promote = run_dag(
        dags["promote"],
        project.logs_dir / f"promote-{stamp}.log",
        {"version": "challenger", "reason": "make run: promote the retrained challenger", "force": False},
    )
    from pipelines.release.status import collect_status, format_status

    status = collect_status(project)
    print()
    print(_summary(project, status))
    print(format_status(status))
    print(f"\ndone in {time.monotonic() - started:.0f} s")
    return 0 if promote.succeeded and (retrain.succeeded or status["champion"] is not None) else 1


def _summary(project: Project, status: dict[str, Any]) -> str:
    from pipelines.data.versioning import current_version

    lines = ["summary"]
    lines.append(f"  data version   {current_version(project) or 'none'}")
    last_train = _last_train(project)
    if last_train.get("reused"):
        lines.append(
            f"  training       unchanged since run {last_train['run_name']} ({last_train['run_id']}): same data, "
            "code and params, nothing trained"
        )
    if status["recent_runs"]:
        last = status["recent_runs"][0]
        accuracy = last["test_accuracy"]
        shown = f"{accuracy:.4f}" if isinstance(accuracy, float) else "-"
        lines.append(f"  last run       {last['run_name']} ({last['run_id']})")
        lines.append(f"  test accuracy  {shown}")
        lines.append(f"  verdict        gate {last['gate']}")
    champion = status["champion"]
    lines.append(
        f"  champion       {status['model']} version {champion['version']}" if champion else "  champion       none"
    )
    return "\n".join(lines)


def _last_train(project: Project) -> dict[str, Any]:
    try:
        return dict(json.loads(project.last_train_path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def run_one(project: Project, dag_id: str, conf: dict[str, Any] | None, log: Path) -> int:
    """Run one DAG in this process and write its outcome next to ``log`` (``<log>.result.json``)."""
    use_airflow_env(project.root)
    prepare_database()
    dags = load_dags()
    if dag_id not in dags:
        print(f"error: no DAG {dag_id!r} in {DAGS_FOLDER} (found {sorted(dags)})", file=sys.stderr)
        return 1
    _warm_execution_api()
    outcome = run_dag(dags[dag_id], log, conf)
    (log.parent / (log.name + RESULT_SUFFIX)).write_text(json.dumps(asdict(outcome), indent=2), encoding="utf-8")
    return 0 if outcome.succeeded else 1


# ------------------------------------------------------------------------------- from another process


def prepare(root: Path) -> dict[str, str]:
    """Create the Airflow home, migrate its database and create the ``dvc`` pool (in a child process)."""
    env = airflow_env(root)
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pipelines.platform.local_airflow", "prepare", "--params", env["MLOPS_PARAMS"]]
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return env


def dags_test(env: dict[str, str], dag_id: str, log: Path, conf: dict[str, Any] | None = None) -> tuple[bool, str]:
    """Run one real DAG run in a child process (``DAG.test``); print its task states; return (succeeded, run id)."""
    command = [sys.executable, "-m", "pipelines.platform.local_airflow", "dag", dag_id, "--params", env["MLOPS_PARAMS"]]
    command += ["--log", str(log)]
    if conf is not None:
        command += ["--conf", json.dumps(conf)]
    log.parent.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    sys.stdout.write(completed.stdout)
    result = log.parent / (log.name + RESULT_SUFFIX)
    if not result.is_file():
        with log.open("a", encoding="utf-8") as handle:
            handle.write(completed.stderr)
        return False, ""
    outcome = json.loads(result.read_text(encoding="utf-8"))
    _OUTCOMES[(dag_id, outcome["run_id"])] = outcome
    return completed.returncode == 0 and outcome["state"] == "success", str(outcome["run_id"])


_OUTCOMES: dict[tuple[str, str], dict[str, Any]] = {}


def task_states(env: dict[str, str], dag_id: str, run_id: str) -> list[tuple[str, str]]:
    """(task id, state) of every task instance of a run that :func:`dags_test` ran."""
    outcome = _OUTCOMES.get((dag_id, run_id), {"tasks": []})
    return [(str(task["task_id"]), str(task["state"])) for task in outcome["tasks"]]


def start_ui(project: Project) -> int:
    """Start ``airflow standalone`` and ``mlflow ui`` on 127.0.0.1 and print where they are."""
    from pipelines.tracking import tracking_uri

    env = prepare(project.root)
    bin_dir = Path(sys.executable).parent
    project.logs_dir.mkdir(parents=True, exist_ok=True)
    mlflow_log = (project.logs_dir / "mlflow-ui.log").open("a")
    airflow_log = (project.logs_dir / "airflow-standalone.log").open("a")
    mlflow_server = subprocess.Popen(
        [str(bin_dir / "mlflow"), "ui", "--host", "127.0.0.1", "--port", str(MLFLOW_PORT),
         "--backend-store-uri", tracking_uri(project)],
        env=env, stdout=mlflow_log, stderr=subprocess.STDOUT,
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


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.platform.local_airflow run|dag|prepare|ui``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=["run", "dag", "prepare", "ui"])
    parser.add_argument("dag_id", nargs="?", help="the DAG to run (with `dag`)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--conf", help="the run's conf as JSON (with `dag`)")
    parser.add_argument("--log", type=Path, help="where the task output goes (with `dag`)")
    parser.add_argument("--force", action="store_true", help="retrain even if nothing changed (with `run`)")
    args = parser.parse_args(argv)
    if shutil.which("airflow", path=str(Path(sys.executable).parent)) is None:
        print("error: airflow is not installed in this environment (run `make setup`)", file=sys.stderr)
        return 1
    project = Project.load(args.params)
    if args.command == "run":
        status = run_pipeline(project, force=args.force)
    elif args.command == "dag":
        if not args.dag_id:
            parser.error("dag: name the DAG to run")
        log = args.log or project.logs_dir / f"{args.dag_id}-{datetime.now(UTC):%Y%m%dT%H%M%S}.log"
        status = run_one(project, args.dag_id, json.loads(args.conf) if args.conf else None, log)
    elif args.command == "prepare":
        use_airflow_env(project.root)
        prepare_database()
        status = 0
    else:
        return start_ui(project)
    # Airflow's object graph takes seconds to tear down; nothing is left to clean up but atexit handlers.
    gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(main())
