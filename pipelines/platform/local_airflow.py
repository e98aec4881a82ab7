"""Airflow on one machine, with nothing to set up: a project-local Airflow home on SQLite.

``python -m pipelines.platform.local_airflow run`` (what ``make run`` calls) migrates the metadata database,
creates the one-slot ``dvc`` pool, runs the real ``retrain`` DAG with ``airflow dags test`` (real task
instances, recorded in the database), then the ``promote`` DAG with ``version=challenger``, and prints
a summary. ``... ui`` starts ``airflow standalone`` and the MLflow UI over the same stores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.project import Project

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
AIRFLOW_PORT = 8080
MLFLOW_PORT = 5000


def airflow_env(root: Path) -> dict[str, str]:
    """The environment of every Airflow command of this project (Airflow home, DAG folder, SQLite)."""
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
    port = env["AIRFLOW__API__PORT"]
    env.setdefault("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"http://127.0.0.1:{port}/execution/")
    return env


def airflow(
    env: dict[str, str], *args: str, log: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run one ``airflow`` command; its output goes to ``log`` when given, else is captured."""
    command = [str(Path(sys.executable).parent / "airflow"), *args]
    if log is None:
        return subprocess.run(command, env=env, capture_output=True, text=True, check=check)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"\n$ airflow {' '.join(args)}\n")
        handle.flush()
        return subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True, check=check)


def prepare(root: Path) -> dict[str, str]:
    """Create the Airflow home, migrate its database and create the ``dvc`` pool (idempotent)."""
    env = airflow_env(root)
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    airflow(env, "db", "migrate")
    airflow(env, "pools", "set", "dvc", "1", "DVC workspace: one writer at a time")
    return env


def latest_run(env: dict[str, str], dag_id: str) -> dict[str, Any]:
    """The newest run of ``dag_id`` as Airflow lists it (``run_id``, ``state``...)."""
    listed = airflow(env, "dags", "list-runs", dag_id, "--output", "json")
    runs = json.loads(listed.stdout[listed.stdout.index("[") :]) if "[" in listed.stdout else []
    if not runs:
        return {}
    return dict(max(runs, key=lambda run: run.get("start_date") or ""))


def task_states(env: dict[str, str], dag_id: str, run_id: str) -> list[tuple[str, str]]:
    """(task id, state) of every task instance of one DAG run."""
    listed = airflow(env, "tasks", "states-for-dag-run", dag_id, run_id, "--output", "json", check=False)
    if "[" not in listed.stdout:
        return []
    rows = json.loads(listed.stdout[listed.stdout.index("[") :])
    return [(str(row["task_id"]), str(row["state"])) for row in rows]


def dags_test(env: dict[str, str], dag_id: str, log: Path, conf: dict[str, Any] | None = None) -> tuple[bool, str]:
    """Run one real DAG run with ``airflow dags test``; print its task states; return (succeeded, run id)."""
    args = ["dags", "test", dag_id]
    if conf is not None:
        args += ["--conf", json.dumps(conf)]
    print(f"[{dag_id}] running through Airflow (log: {log})", flush=True)
    started = time.monotonic()
    completed = airflow(env, *args, log=log, check=False)
    run = latest_run(env, dag_id)
    run_id = str(run.get("run_id", ""))
    for task_id, state in task_states(env, dag_id, run_id):
        print(f"[{dag_id}]   {task_id:<16} {state}")
    state = run.get("state", "unknown")
    print(f"[{dag_id}] run {run_id}: {state} in {time.monotonic() - started:.0f} s", flush=True)
    return completed.returncode == 0 and state == "success", run_id


def run_pipeline(project: Project) -> int:
    """Retrain through Airflow, promote the challenger, print the summary; return the exit status."""
    from pipelines.release.status import collect_status, format_status

    root = project.root
    logs = project.logs_dir
    logs.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    print(f"Airflow home {root / 'airflow_home'} (SQLite); preparing the metadata database", flush=True)
    env = prepare(root)
    retrained, _ = dags_test(env, "retrain", logs / f"retrain-{stamp}.log")
    if not retrained:
        print("retrain did not succeed: see the task states above and the log; the champion is unchanged")
    promoted, _ = dags_test(
        env,
        "promote",
        logs / f"promote-{stamp}.log",
        conf={"version": "challenger", "reason": "make run: promote the retrained challenger", "force": False},
    )
    status = collect_status(project)
    print()
    print(_summary(project, status))
    print(format_status(status))
    return 0 if promoted and (retrained or status["champion"] is not None) else 1


def _summary(project: Project, status: dict[str, Any]) -> str:
    from pipelines.data.versioning import current_version

    lines = ["summary"]
    lines.append(f"  data version   {current_version(project) or 'none'}")
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
    """``python -m pipelines.platform.local_airflow run|ui``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=["run", "ui"])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    if shutil.which("airflow", path=str(Path(sys.executable).parent)) is None:
        print("error: airflow is not installed in this environment (run `make setup`)", file=sys.stderr)
        return 1
    project = Project.load(args.params)
    return run_pipeline(project) if args.command == "run" else start_ui(project)


if __name__ == "__main__":
    sys.exit(main())
