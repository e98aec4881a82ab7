"""End-to-end retrain through Airflow against a plain script doing load -> fit -> evaluate -> log.

The Airflow side is the real ``retrain`` DAG run with ``airflow dags test`` (the command
:func:`pipelines.platform.local_airflow.dags_test` runs) in a temporary project with its own Airflow home
(:func:`pipelines.platform.local_airflow.prepare`: SQLite metadata DB, ``dvc`` pool). Its wall time is that of the
``airflow dags test`` process alone: the database migration before it and the run listing after it are
reported apart. Per-task times come from ``airflow tasks states-for-dag-run --output json``.

The plain side is ``python -m benchmarks.child plain-retrain``: the digits loaded in memory, the same
model, optimizer, batch, epochs and samples per epoch, a test evaluation and one MLflow run (params,
metrics, model with signature) in its own SQLite store. Both walls include starting Python and importing
TensorFlow. The ratio says what ingest, validation, augmentation, DVC versioning, evaluation against a
champion, the gate, registration and Airflow itself cost on top of the bare loop.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from benchmarks.common import (
    BenchmarkError,
    Context,
    Outcome,
    Row,
    fmt,
    log,
    ratio,
    run_child,
    tail,
    training_overrides,
    write_params,
)

RETRAIN_TASKS = ("ingest", "validate", "augment", "version", "train", "evaluate", "gate", "register", "auto_promote")


def _task_times(env: dict[str, str], run_id: str) -> list[dict[str, Any]]:
    """Task id, state, start, end and seconds of every task instance of ``retrain`` run ``run_id``."""
    from pipelines.platform.local_airflow import airflow

    listed = airflow(env, "tasks", "states-for-dag-run", "retrain", run_id, "--output", "json", check=False)
    if "[" not in listed.stdout:
        return []
    rows = json.loads(listed.stdout[listed.stdout.index("[") :])
    tasks = []
    for row in rows:
        start, end = row.get("start_date") or "", row.get("end_date") or ""
        seconds = (
            (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() if start and end else None
        )
        tasks.append({"task_id": row["task_id"], "state": row["state"], "start": start, "end": end, "seconds": seconds})
    order = {name: index for index, name in enumerate(RETRAIN_TASKS)}
    return sorted(tasks, key=lambda task: (order.get(str(task["task_id"]), len(order)), str(task["start"])))


def bench_e2e(ctx: Context) -> Outcome:
    """Wall time of a ``retrain`` DAG run vs a plain retrain script, and the time of each Airflow task."""
    from pipelines.platform.local_airflow import airflow, latest_run, prepare

    root = ctx.folder("e2e")
    overrides = training_overrides(ctx)
    project_root = root / "project"
    write_params(project_root, overrides)
    logs = root / "logs"
    logs.mkdir()

    log("  plain script: load -> fit -> evaluate -> log to MLflow")
    plain_params = write_params(root / "plain", overrides)
    plain, plain_wall = run_child(
        ["plain-retrain", "--params", str(plain_params), "--root", str(root / "plain")], logs / "plain.log"
    )

    log("  Airflow: preparing the metadata database and the dvc pool")
    started = time.perf_counter()
    env = prepare(project_root)
    prepare_seconds = time.perf_counter() - started

    log("  Airflow: airflow dags test retrain")
    conf = {"source": "sample", "auto_promote": False}
    airflow_log = logs / "retrain.log"
    started = time.perf_counter()
    completed = airflow(env, "dags", "test", "retrain", "--conf", json.dumps(conf), log=airflow_log, check=False)
    airflow_wall = time.perf_counter() - started
    run = latest_run(env, "retrain")
    run_id = str(run.get("run_id", ""))
    tasks = _task_times(env, run_id)
    state = str(run.get("state", "unknown"))
    if completed.returncode != 0 or state != "success":
        states = ", ".join(f"{task['task_id']}={task['state']}" for task in tasks)
        raise BenchmarkError(f"retrain run {run_id or '?'} ended {state} ({states}); log {airflow_log}:\n"
                             f"{tail(airflow_log)}")  # fmt: skip
    run_seconds = None
    if run.get("start_date") and run.get("end_date"):
        run_seconds = (
            datetime.fromisoformat(str(run["end_date"])) - datetime.fromisoformat(str(run["start_date"]))
        ).total_seconds()
    task_total = sum(float(task["seconds"]) for task in tasks if task["seconds"] is not None)

    phases = ", ".join(f"{name} {seconds:.1f}" for name, seconds in plain["phases"].items())
    rows = [
        Row(
            "e2e",
            "wall s: retrain DAG (airflow dags test) vs plain script",
            fmt(airflow_wall, 1),
            fmt(plain_wall, 1),
            fmt(ratio(airflow_wall, plain_wall)),
            f"lower is better; both include Python start and imports; plain phases (s): {phases}",
        ),
        Row(
            "e2e",
            "s: DAG run in the DB (start -> end) / sum of task times",
            fmt(run_seconds, 1),
            note=f"sum of tasks {task_total:.1f} s; db migrate + pool before the run {prepare_seconds:.1f} s",
        ),
    ]
    for task in tasks:
        seconds = task["seconds"]
        rows.append(
            Row(
                "e2e",
                f"s: task {task['task_id']}",
                fmt(seconds, 1) if seconds is not None else "-",
                note=str(task["state"]),
            )
        )
    data = {
        "airflow_wall_seconds": airflow_wall,
        "plain_wall_seconds": plain_wall,
        "ratio_airflow_to_plain": ratio(airflow_wall, plain_wall),
        "airflow_run_seconds": run_seconds,
        "airflow_prepare_seconds": prepare_seconds,
        "run_id": run_id,
        "tasks": tasks,
        "plain": plain,
    }
    return Outcome(rows, data)
