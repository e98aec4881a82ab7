"""Airflow on one machine, with nothing to set up: a project-local Airflow home on SQLite.

``python -m pipelines.platform.local_airflow run`` (what ``make run`` calls) runs the real ``retrain`` DAG and
then the ``promote`` DAG (``version=challenger``) in ONE Python process through Airflow's own API
(``DAG.test``): real DAG runs and task instances, recorded in the metadata database, with each task run in
this process, so TensorFlow, MLflow and Great Expectations are imported once for both DAGs instead of once per
``airflow`` command. It prepares the database in-process (migrated only when not at Airflow's head
revision), creates the one-slot ``dvc`` pool, prints one line per task and a summary. Task output goes to a
log file per DAG run. The tasks' step functions run in a warm step host (:mod:`pipelines.platform.step_host`),
a child started first that imports TensorFlow, Great Expectations and MLflow on the other core while Airflow
warms up here. ``... dag DAG_ID --conf JSON`` runs one DAG the same way (what the end-to-end tests
and benchmarks call; :func:`dags_test` runs it in a child process). The Airflow home itself (environment,
database, ``... prepare``, ``... ui``) is :mod:`pipelines.platform.airflow_home`.
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

from pipelines.platform.airflow_home import DAGS_FOLDER, prepare_database, start_ui, use_airflow_env
from pipelines.platform.step_host import hosting, run_in_active_host
from pipelines.project import Project

RESULT_SUFFIX = ".result.json"

# What the step host imports ahead, per DAG, in the order the tasks need it (each step imports what it uses
# itself: a module missing here only costs its import inside the task).
PRELOAD: dict[str, tuple[str, ...]] = {
    "retrain": (
        "pipelines.data.ingest",
        "pipelines.data.validate",
        "pandas",
        "great_expectations",
        "pipelines.data.augment",
        "pipelines.data.versioning",
        "dvc.repo",
        "tensorflow",
        "tf_keras",
        "mlflow",
        "pipelines.training.train",
        "pipelines.training.chief_tracking",
        "pipelines.training.model_format",
        "matplotlib.pyplot",
        "sklearn.metrics",
        "scipy.stats",
        "pipelines.release.evaluate",
        "pipelines.release.register",
    ),
    "promote": (
        "mlflow",
        "pipelines.release.promote",
        "pipelines.release.infra_check",
        "pipelines.release.model_card",
        "pipelines.release.serving.client",
    ),
}


# ------------------------------------------------------------------------------------- in this process


@dataclass(frozen=True)
class TaskOutcome:
    """One task instance of a finished DAG run, as recorded in the metadata database."""

    task_id: str
    state: str
    seconds: float | None
    try_number: int
    map_index: int = -1
    """The instance's index when the task is mapped (a sweep's ``train``), -1 otherwise."""


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
    tasks = [
        TaskOutcome(ti.task_id, str(ti.state), ti.duration, int(ti.try_number or 0), int(ti.map_index))
        for ti in instances
    ]
    outcome = DagOutcome(dag.dag_id, str(dag_run.run_id), str(dag_run.state), seconds, tasks, str(log))
    if echo:
        for task in tasks:
            took = f"{task.seconds:6.1f} s" if task.seconds is not None else "      -"
            name = task.task_id if task.map_index < 0 else f"{task.task_id}[{task.map_index}]"
            print(f"[{dag.dag_id}]   {name:<16} {task.state:<16} {took}")
        print(f"[{dag.dag_id}] run {outcome.run_id}: {outcome.state} in {seconds:.0f} s", flush=True)
    return outcome


def run_pipeline(project: Project, *, force: bool = False) -> int:
    """Retrain through Airflow, promote the challenger, print the summary; return the exit status."""
    started = time.monotonic()
    root = project.root
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    print(f"Airflow home {root / 'airflow_home'} (SQLite); preparing the metadata database", flush=True)
    from pipelines.release.infra_check import start_clean_checker
    from pipelines.release.status import collect_status, format_status

    use_airflow_env(root)
    retrain_log = project.logs_dir / f"retrain-{stamp}.log"
    with contextlib.ExitStack() as stack:
        with _output_to(retrain_log):  # Airflow's start-up chatter goes with the run's log, not to the terminal
            # The step host imports on the other core meanwhile, then starts the promote DAG's clean checker
            # (its own imports overlap the retrain; it loads no model until asked).
            stack.enter_context(hosting(PRELOAD["retrain"] + PRELOAD["promote"], [(start_clean_checker, (project,))]))
            prepare_database()
            dags = load_dags()
            _warm_execution_api()
        retrain = run_dag(dags["retrain"], retrain_log, {"source": project.config.ingest.source, "force": force})
        if not retrain.succeeded:
            print("retrain did not succeed: see the task states above and the log; the champion is unchanged")
        promote = run_dag(
            dags["promote"],
            project.logs_dir / f"promote-{stamp}.log",
            {"version": "challenger", "reason": "make run: promote the retrained challenger", "force": False},
        )
        status = run_in_active_host(collect_status, project)
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
    with contextlib.ExitStack() as stack:
        with _output_to(log):
            stack.enter_context(hosting(PRELOAD.get(dag_id, ())))
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
    """(task id, state) of every task instance of a run that :func:`dags_test` ran (``train[1]`` when mapped)."""
    outcome = _OUTCOMES.get((dag_id, run_id), {"tasks": []})
    return [
        (
            str(task["task_id"]) if task.get("map_index", -1) < 0 else f"{task['task_id']}[{task['map_index']}]",
            str(task["state"]),
        )
        for task in outcome["tasks"]
    ]


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
