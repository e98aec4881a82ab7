"""The scheduled path end to end: ``airflow standalone`` (scheduler, LocalExecutor), DAG runs through the REST API.

What ``make ui`` starts, in a temporary project: ``pipelines.platform.airflow_home.airflow_env`` (SQLite
metadata database, LocalExecutor, the scheduler tuning of ``SCHEDULER_TUNING``) with free ports for the API
server, the worker's and the triggerer's log servers, after ``local_airflow prepare`` (migration, ``dvc``
pool). The project is the repository's ``params.yaml`` with ``schedule.cron`` off, so nothing but the
benchmark triggers ``retrain``. The benchmark unpauses ``retrain`` and ``promote``, then twice: triggers
``retrain`` through ``POST /api/v2/dags/retrain/dagRuns`` (``{"source": "sample"}``; the second time with
``"force": true`` so that it trains again instead of reusing the first candidate), waits for it, then
triggers ``promote`` (``{"version": "challenger", "reason": "bench"}``) and waits for it. The second pair
is reported (warm: the stores exist, the page cache is hot); the second promote promotes a new version, so
it does the whole infra validation (promoting the champion again would skip it). The first pair is a note.

Each run's start and end and every task instance's start, end and duration come from the REST API (the
metadata database). The ratio run wall / sum of task durations is what the scheduler and the executor add
between and around the tasks (each task is its own process here: imports are paid per task). Everything
started is stopped through its process group, with bounded waits.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, BenchmarkError, Context, Outcome, Row, fmt, log, ratio, tail, write_params

START_TIMEOUT = 300.0
PARSE_TIMEOUT = 300.0
RUN_TIMEOUT = 1800.0
STOP_TIMEOUT = 60.0
POLL_SECONDS = 0.5
RATIO_TARGET = 1.3
PROMOTE_TARGET_SECONDS = 20.0
RETRAIN_CONF: dict[str, Any] = {"source": "sample"}
PROMOTE_CONF: dict[str, Any] = {"version": "challenger", "reason": "bench"}
PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"


def free_port() -> int:
    """A TCP port nothing listens on right now (127.0.0.1)."""
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return int(handle.getsockname()[1])


class Api:
    """The few calls of Airflow's REST API the benchmark makes, with a bearer token of the simple auth manager."""

    def __init__(self, base_url: str, airflow_home: Path) -> None:
        """Log in as ``admin`` with the password ``airflow standalone`` generated."""
        self.base_url = base_url
        passwords = json.loads((airflow_home / PASSWORDS_FILE).read_text(encoding="utf-8"))
        reply = self.request("POST", "/auth/token", {"username": "admin", "password": passwords["admin"]}, auth=False)
        self.token = str(reply["access_token"])

    def request(self, method: str, path: str, body: dict[str, Any] | None = None, auth: bool = True) -> Any:
        """One JSON request; raises ``urllib.error.HTTPError`` on an error status."""
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")


def _seconds_between(start: Any, end: Any) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(str(end)) - datetime.fromisoformat(str(start))).total_seconds()


def _epoch(value: Any) -> float:
    return datetime.fromisoformat(str(value)).timestamp()


def _wait_for_api(base_url: str, home: Path, process: subprocess.Popen[bytes], server_log: Path) -> Api:
    """Wait (bounded) for the API server's health endpoint and the generated admin password; log in."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(f"airflow standalone exited with {process.returncode}:\n{tail(server_log)}")
        try:
            with urllib.request.urlopen(f"{base_url}/api/v2/monitor/health", timeout=5) as response:
                if response.status == 200 and (home / PASSWORDS_FILE).is_file():
                    return Api(base_url, home)
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(1)
    raise BenchmarkError(
        f"the API server did not answer on {base_url} within {START_TIMEOUT:.0f} s:\n{tail(server_log)}"
    )


def _wait_for_dags(api: Api, dag_ids: tuple[str, ...]) -> None:
    """Wait (bounded) until the DAG processor has parsed every DAG in ``dag_ids``."""
    deadline = time.monotonic() + PARSE_TIMEOUT
    missing = list(dag_ids)
    while time.monotonic() < deadline:
        for dag_id in list(missing):
            try:
                api.request("GET", f"/api/v2/dags/{dag_id}")
                missing.remove(dag_id)
            except urllib.error.HTTPError:
                pass
        if not missing:
            return
        time.sleep(1)
    raise BenchmarkError(f"DAGs {missing} were not parsed within {PARSE_TIMEOUT:.0f} s")


def run_dag(api: Api, dag_id: str, conf: dict[str, Any]) -> dict[str, Any]:
    """Trigger one run through the REST API, wait for it (bounded), return its times and task instances."""
    triggered = time.time()
    created = api.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
    run_id = str(created["dag_run_id"])
    quoted = urllib.parse.quote(run_id, safe="")
    deadline = time.monotonic() + RUN_TIMEOUT
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        run = api.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}")
        if run["state"] in ("success", "failed"):
            break
        time.sleep(POLL_SECONDS)
    seen = time.time()
    instances = api.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances")["task_instances"]
    tasks = sorted(
        (
            {
                "task_id": item["task_id"],
                "map_index": item.get("map_index", -1),
                "state": item.get("state"),
                "try_number": item.get("try_number"),
                "queued_when": item.get("queued_when"),
                "start_date": item.get("start_date"),
                "end_date": item.get("end_date"),
                "duration": item.get("duration"),
            }
            for item in instances
        ),
        key=lambda task: (task["start_date"] is None, str(task["start_date"] or "")),
    )
    timed = [task for task in tasks if task["start_date"] and task["end_date"]]
    gaps = [_epoch(later["start_date"]) - _epoch(earlier["end_date"]) for earlier, later in itertools.pairwise(timed)]
    queue_waits = [
        _epoch(task["start_date"]) - _epoch(task["queued_when"]) for task in timed if task.get("queued_when")
    ]
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "state": run.get("state"),
        "conf": conf,
        "queued_at": run.get("queued_at"),
        "start_date": run.get("start_date"),
        "end_date": run.get("end_date"),
        "run_seconds": _seconds_between(run.get("start_date"), run.get("end_date")),
        "queued_to_end_seconds": _seconds_between(run.get("queued_at"), run.get("end_date")),
        "client_seconds": seen - triggered,
        "task_seconds": sum(float(task["duration"] or 0.0) for task in tasks),
        "gaps_between_tasks": gaps,
        "queue_waits": queue_waits,
        "before_first_task": _seconds_between(run.get("start_date"), timed[0]["start_date"]) if timed else None,
        "after_last_task": _seconds_between(max(t["end_date"] for t in timed), run.get("end_date")) if timed else None,
        "tasks": tasks,
    }


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop ``airflow standalone`` and everything in its process group: SIGTERM, then SIGKILL (bounded)."""
    group = process.pid
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_TIMEOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=STOP_TIMEOUT)


def _task_list(run: dict[str, Any]) -> str:
    return ", ".join(
        f"{task['task_id']} {fmt(task['duration'], 1)}" + ("" if task["state"] == "success" else f" ({task['state']})")
        for task in run["tasks"]
    )


def bench_scheduled(ctx: Context) -> Outcome:
    """Retrain and promote through ``airflow standalone`` and the REST API: run wall vs the sum of task durations."""
    from pipelines.platform.airflow_home import SCHEDULER_TUNING, airflow_env

    root = ctx.folder("scheduled")
    project = root / "project"
    params = write_params(project, {"schedule": {"cron": None}})
    api_port = free_port()
    env = airflow_env(project)
    env.update(
        {
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        }
    )
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    server_log = root / "standalone.log"

    log("  preparing the metadata database and the dvc pool")
    started = time.perf_counter()
    prepared = subprocess.run(
        [sys.executable, "-m", "pipelines.platform.local_airflow", "prepare", "--params", str(params)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    prepare_seconds = time.perf_counter() - started
    if prepared.returncode != 0:
        raise BenchmarkError(f"local_airflow prepare failed:\n{prepared.stderr[-3000:]}")

    log(f"  starting airflow standalone (API on 127.0.0.1:{api_port})")
    started = time.perf_counter()
    with server_log.open("ab") as handle:
        process = subprocess.Popen(
            [str(bin_dir / "airflow"), "standalone"],
            cwd=project,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        api = _wait_for_api(f"http://127.0.0.1:{api_port}", home, process, server_log)
        api_seconds = time.perf_counter() - started
        _wait_for_dags(api, ("retrain", "promote"))
        parsed_seconds = time.perf_counter() - started
        for dag_id in ("retrain", "promote"):
            api.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        log(f"  API up in {api_seconds:.0f} s, DAGs parsed in {parsed_seconds:.0f} s")
        retrains: list[dict[str, Any]] = []
        promotes: list[dict[str, Any]] = []
        for number, conf in ((1, RETRAIN_CONF), (2, {**RETRAIN_CONF, "force": True})):
            log(f"  retrain {number} ({json.dumps(conf)}), then promote")
            retrains.append(run_dag(api, "retrain", conf))
            retrain = retrains[-1]
            run_seconds, task_seconds = fmt(retrain["run_seconds"], 1), fmt(retrain["task_seconds"], 1)
            log(f"  retrain {number} {retrain['state']}: run {run_seconds} s, tasks {task_seconds} s")
            if retrain["state"] != "success":
                raise BenchmarkError(
                    f"scheduled retrain ended {retrain['state']}: {_task_states(retrain)}; log {server_log}"
                )
            promotes.append(run_dag(api, "promote", PROMOTE_CONF))
            promote = promotes[-1]
            log(f"  promote {number} {promote['state']}: run {fmt(promote['run_seconds'], 1)} s")
            if promote["state"] != "success":
                raise BenchmarkError(f"scheduled promote ended {promote['state']}: {_task_states(promote)}")
    finally:
        log("  stopping airflow standalone")
        _stop(process)

    cold, warm = retrains
    gaps = warm["gaps_between_tasks"]
    tuning = ", ".join(f"{key.split('__')[-1].lower()}={value}" for key, value in SCHEDULER_TUNING.items())
    rows = [
        Row(
            "scheduled",
            f"scheduled retrain, warm (force: trains): DAG run wall s / sum of task durations "
            f"(target <= {RATIO_TARGET})",
            fmt(warm["run_seconds"], 1),
            fmt(warm["task_seconds"], 1),
            fmt(ratio(warm["run_seconds"], warm["task_seconds"])),
            f"gaps between tasks {sum(gaps):.1f} s (largest {max(gaps, default=0.0):.1f}), run start -> first task "
            f"{fmt(warm['before_first_task'], 1)} s, last task -> run end {fmt(warm['after_last_task'], 1)} s; "
            f"trigger -> seen finished {warm['client_seconds']:.1f} s; tasks (s): {_task_list(warm)}; first "
            f"(cold) retrain {fmt(cold['run_seconds'], 1)} s / {fmt(cold['task_seconds'], 1)} s = "
            f"{fmt(ratio(cold['run_seconds'], cold['task_seconds']))}; tuning: {tuning}",
        ),
        Row(
            "scheduled",
            f"scheduled promote, warm (the new version of the second retrain): DAG run wall s "
            f"(target < {PROMOTE_TARGET_SECONDS:.0f})",
            fmt(promotes[-1]["run_seconds"], 1),
            fmt(promotes[-1]["task_seconds"], 1),
            fmt(ratio(promotes[-1]["run_seconds"], promotes[-1]["task_seconds"])),
            f"baseline = sum of its task durations; trigger -> seen finished {promotes[-1]['client_seconds']:.1f} s; "
            f"tasks (s): {_task_list(promotes[-1])}; first promote {fmt(promotes[0]['run_seconds'], 1)} s",
        ),
        Row(
            "scheduled",
            "scheduled: start-up s (prepare DB / API answering / DAGs parsed)",
            fmt(prepare_seconds, 1),
            note=f"API answering {api_seconds:.1f} s and both DAGs parsed {parsed_seconds:.1f} s after "
            "`airflow standalone` started",
        ),
    ]
    data = {
        "params": str(params),
        "api_port": api_port,
        "tuning": dict(SCHEDULER_TUNING),
        "prepare_seconds": prepare_seconds,
        "api_seconds": api_seconds,
        "parsed_seconds": parsed_seconds,
        "retrains": retrains,
        "promotes": promotes,
        "ratio_retrain_run_to_tasks": ratio(warm["run_seconds"], warm["task_seconds"]),
    }
    return Outcome(rows, data)


def _task_states(run: dict[str, Any]) -> str:
    return ", ".join(f"{task['task_id']}={task['state']}" for task in run["tasks"])
