"""``make run`` as a user runs it, warm, against the TFX peer and a plain script, with a per-step breakdown.

One project (a temporary copy of the repository's ``params.yaml``, its own project root: ``data/``,
``artifacts/``, ``airflow_home/`` are created there) and, in one sitting:

1. one cold run (``python -m pipelines.platform.local_airflow run --params P``, exactly what ``make run``
   calls): the first retrain in the project creates the Airflow and MLflow databases, the DVC store and the
   champion; reported only as a note;
2. the import cost of TensorFlow, MLflow, ``airflow.sdk`` and Great Expectations, each in a fresh process
   (median of 3), and of starting Python itself;
3. one cold run of the plain script (``python -m benchmarks.child plain-retrain``: load, fit, evaluate, log
   one MLflow run; same model and optimizer), which creates its MLflow store: a note only;
4. rounds (2; ``--quick``: 1), each: a warm trained run (``--force``), the TFX peer (:mod:`benchmarks.peer`,
   whole process), a warm cache-hit run (no ``--force``: same data, code and params, so the retrain reuses
   the last candidate) and the plain script again. Alternating spreads the machine's drift over all
   sides; medians are reported.

Every ``make run`` child's stdout is read line by line and each line is stamped with ``time.monotonic()``
on arrival, so the process start, the ``[retrain] running through Airflow`` line, the end of each DAG, the
``done in`` line and the process exit are points on one clock. The task instances' start and end dates come
from the project's Airflow database (SQLite, read directly), so the breakdown of a warm trained run splits
the wall time into: Python start and first imports, Airflow set-up (import, database check, DAG parse,
in-process Execution API), ``DAG.test``'s own set-up before the run starts, each task, the gaps between
tasks, the time between the two DAGs, the summary, and the exit.
"""

from __future__ import annotations

import itertools
import re
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO_ROOT,
    BenchmarkError,
    Context,
    Outcome,
    Row,
    child_env,
    fmt,
    log,
    median,
    ratio,
    run_child,
    tail,
    write_params,
)
from benchmarks.peer import PeerEnvironment, PeerRun, ensure_environment, run_peer, unusable_row

RUN_TIMEOUT = 1800.0
IMPORT_REPEATS = 3
IMPORTED_MODULES = ("tensorflow", "mlflow", "airflow.sdk", "great_expectations")
DAGS = ("retrain", "promote")
TRAINED_TARGET = 0.5
PROMOTE_TARGET_SECONDS = 20.0

_RUNNING = re.compile(r"^\[(?P<dag>\w+)\] running through Airflow(?: \(log: (?P<log>.+)\))?")
_TASK = re.compile(r"^\[(?P<dag>\w+)\]\s{3}(?P<task>\S+)\s+(?P<state>\S+)\s+(?:(?P<seconds>[\d.]+) s|-)\s*$")
_DAG_END = re.compile(r"^\[(?P<dag>\w+)\] run (?P<run_id>\S+): (?P<state>\w+) in (?P<seconds>\d+) s$")
_ACCURACY = re.compile(r"^\s+test accuracy\s+(?P<accuracy>[\d.]+)\s*$")
_CACHE_HIT = re.compile(r"^\s+training\s+unchanged since run")
_DONE = re.compile(r"^done in (?P<seconds>\d+) s$")
_DAGBAG = "Filling up the DagBag from"  # Airflow's own log line (stdout) when it starts parsing the DAG folder


@dataclass
class DagTiming:
    """One DAG run inside a ``make run`` process: its lines on the child's clock and its record in the DB."""

    dag_id: str
    run_id: str = ""
    state: str = ""
    running_at: float | None = None
    """Seconds since process start of the ``[dag] running through Airflow`` line (``DAG.test`` is called)."""
    reported_at: float | None = None
    """Seconds since process start of the first task line (``DAG.test`` has returned)."""
    run_start: float | None = None
    """The DAG run's start date in the database, as seconds since the process start."""
    run_end: float | None = None
    tasks: list[dict[str, Any]] = field(default_factory=list)
    """Task id, map index, state, start and end (seconds since the process start), duration (s)."""

    @property
    def run_seconds(self) -> float | None:
        """The DAG run's start -> end in the database."""
        if self.run_start is None or self.run_end is None:
            return None
        return self.run_end - self.run_start

    @property
    def task_seconds(self) -> float:
        """The sum of the task instances' recorded durations."""
        return sum(float(task["seconds"] or 0.0) for task in self.tasks)

    def gaps(self) -> dict[str, float]:
        """Run start -> first task start, the gaps between consecutive tasks (sum, max), last task end -> run end."""
        timed = sorted((t for t in self.tasks if t["start"] is not None and t["end"] is not None), key=_start)
        if not timed or self.run_start is None or self.run_end is None:
            return {}
        between = [max(0.0, _start(later) - float(earlier["end"])) for earlier, later in itertools.pairwise(timed)]
        return {
            "before_first_task": _start(timed[0]) - self.run_start,
            "between_tasks": sum(between),
            "largest_between_tasks": max(between, default=0.0),
            "after_last_task": self.run_end - max(float(t["end"]) for t in timed),
        }


def _start(task: dict[str, Any]) -> float:
    return float(task["start"])


@dataclass
class MakeRun:
    """One ``make run`` process: wall time, summary and the timed points of its output."""

    label: str
    force: bool
    wall_seconds: float
    returncode: int
    log_path: str
    accuracy: float | None = None
    cache_hit: bool = False
    home_at: float | None = None
    """Seconds since process start of the first line (``Airflow home ...``): Python start and first imports."""
    dagbag_at: float | None = None
    """Seconds since process start of Airflow's first ``Filling up the DagBag`` line (None when not found)."""
    done_at: float | None = None
    last_line_at: float | None = None
    done_seconds: int | None = None
    dags: dict[str, DagTiming] = field(default_factory=dict)

    def dag(self, dag_id: str) -> DagTiming:
        """The timing of one of the two DAGs (empty when it did not run)."""
        return self.dags.get(dag_id) or DagTiming(dag_id)

    def breakdown(self) -> list[tuple[str, float | None, str]]:
        """(step, seconds, note) from process start to process end; the steps add up to the wall time."""
        retrain, promote = self.dag("retrain"), self.dag("promote")
        steps: list[tuple[str, float | None, str]] = [
            ("process start -> first line (Python start, first imports)", self.home_at, "")
        ]
        if self.dagbag_at is not None:
            steps += [
                (
                    "first line -> `Filling up the DagBag`",
                    _diff(self.home_at, self.dagbag_at),
                    "import Airflow, DB check",
                ),
                (
                    "`Filling up the DagBag` -> `[retrain] running through Airflow`",
                    _diff(self.dagbag_at, retrain.running_at),
                    "parse the DAG folder, build the in-process Execution API (FastAPI app)",
                ),
            ]
        else:
            steps.append(
                (
                    "first line -> `[retrain] running through Airflow`",
                    _diff(self.home_at, retrain.running_at),
                    "import Airflow, DB check, parse the DAG folder, build the in-process Execution API",
                )
            )
        for timing in (retrain, promote):
            name = timing.dag_id
            if timing is promote:
                steps.append(
                    (
                        "retrain reported -> `[promote] running through Airflow`",
                        _diff(retrain.reported_at, promote.running_at),
                        "",
                    )
                )
            steps.append(
                (
                    f"{name}: `running` line -> DAG run start in the DB",
                    _diff(timing.running_at, timing.run_start),
                    "DAG.test's set-up before the run exists (serialise / sync the DAG, create the run)",
                )
            )
            gaps = timing.gaps()
            steps.append((f"{name}: run start -> first task start", gaps.get("before_first_task"), ""))
            for task in timing.tasks:
                label = task["task_id"] if task["map_index"] < 0 else f"{task['task_id']}[{task['map_index']}]"
                steps.append((f"{name} task {label}", task["seconds"], str(task["state"])))
            steps.append(
                (
                    f"{name}: gaps between tasks (sum)",
                    gaps.get("between_tasks"),
                    f"largest {fmt(gaps.get('largest_between_tasks'), 2)} s",
                )
            )
            steps.append((f"{name}: last task end -> run end", gaps.get("after_last_task"), ""))
            steps.append(
                (
                    f"{name}: run end in the DB -> task lines printed",
                    _diff(timing.run_end, timing.reported_at),
                    "DAG.test's wrap-up, reading the task instances",
                )
            )
        steps.append(
            (
                "promote reported -> `done in` line",
                _diff(promote.reported_at, self.done_at),
                "summary: data version, status of the registry and the services",
            )
        )
        steps.append(("`done in` line -> process end (exit)", _diff(self.done_at, self.wall_seconds), ""))
        return steps


def _diff(earlier: float | None, later: float | None) -> float | None:
    if earlier is None or later is None:
        return None
    return later - earlier


def _dagbag_in_log(task_log: Path, started_epoch: float, before: float) -> float | None:
    """When Airflow started parsing the DAG folder, from its first ``Filling up the DagBag`` line in the run's log.

    ``make run`` sends Airflow's start-up logging (structlog lines, each starting with its UTC ISO time) to the
    retrain run's log file rather than the terminal. Returns seconds since the process start, or None.
    """
    try:
        with task_log.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle):
                if number > 500:
                    return None
                if _DAGBAG in line:
                    stamp = datetime.fromisoformat(line.split(maxsplit=1)[0]).timestamp() - started_epoch
                    return stamp if 0.0 <= stamp <= before else None
    except (OSError, ValueError, IndexError):
        return None
    return None


def _db_epoch(value: Any) -> float | None:
    """An Airflow SQLite date (UTC, ``YYYY-MM-DD HH:MM:SS.ffffff``, maybe with an offset) as epoch seconds."""
    if not value:
        return None
    parsed = datetime.fromisoformat(str(value))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _read_database(database: Path, timing: DagTiming, started_epoch: float) -> None:
    """Fill ``timing``'s run and task times from the project's Airflow database (read-only)."""
    if not timing.run_id or not database.is_file():
        return
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
    try:
        run = connection.execute(
            "SELECT start_date, end_date FROM dag_run WHERE dag_id = ? AND run_id = ?", (timing.dag_id, timing.run_id)
        ).fetchone()
        rows = connection.execute(
            "SELECT task_id, map_index, state, start_date, end_date, duration FROM task_instance "
            "WHERE dag_id = ? AND run_id = ?",
            (timing.dag_id, timing.run_id),
        ).fetchall()
    finally:
        connection.close()

    def relative(value: Any) -> float | None:
        epoch = _db_epoch(value)
        return None if epoch is None else epoch - started_epoch

    if run is not None:
        timing.run_start, timing.run_end = relative(run[0]), relative(run[1])
    tasks = [
        {
            "task_id": str(task_id),
            "map_index": int(map_index if map_index is not None else -1),
            "state": str(state),
            "start": relative(start),
            "end": relative(end),
            "seconds": float(duration) if duration is not None else None,
        }
        for task_id, map_index, state, start, end, duration in rows
    ]
    timing.tasks = sorted(tasks, key=lambda task: (task["start"] is None, task["start"] or 0.0))


def run_make(params: Path, log_path: Path, *, force: bool, label: str) -> MakeRun:
    """Run ``python -m pipelines.platform.local_airflow run`` (what ``make run`` calls); time every line."""
    command = [sys.executable, "-m", "pipelines.platform.local_airflow", "run", "--params", str(params)]
    if force:
        command.append("--force")
    lines: list[tuple[float, str]] = []
    log_path.parent.mkdir(parents=True, exist_ok=True)
    timed_out = threading.Event()
    with log_path.open("a", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        started_epoch = time.time()
        started = time.monotonic()
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )

        def kill() -> None:
            timed_out.set()
            process.kill()

        timer = threading.Timer(RUN_TIMEOUT, kill)
        timer.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                arrived = time.monotonic() - started
                text = line.rstrip("\n")
                lines.append((arrived, text))
                handle.write(f"{arrived:9.3f} {text}\n")
            returncode = process.wait()
            wall = time.monotonic() - started
        finally:
            timer.cancel()
    if timed_out.is_set():
        raise BenchmarkError(f"{label}: make run timed out after {RUN_TIMEOUT:.0f} s (log {log_path})")
    run = MakeRun(label, force, wall, returncode, str(log_path))
    for arrived, text in lines:
        if run.home_at is None and text.startswith("Airflow home"):
            run.home_at = arrived
        if run.dagbag_at is None and _DAGBAG in text:
            run.dagbag_at = arrived
        if match := _RUNNING.match(text):
            run.dags.setdefault(match["dag"], DagTiming(match["dag"])).running_at = arrived
            if match["dag"] == "retrain" and match["log"] and run.dagbag_at is None:
                run.dagbag_at = _dagbag_in_log(Path(match["log"]), started_epoch, arrived)
        elif match := _TASK.match(text):
            timing = run.dags.setdefault(match["dag"], DagTiming(match["dag"]))
            if timing.reported_at is None:
                timing.reported_at = arrived
        elif match := _DAG_END.match(text):
            timing = run.dags.setdefault(match["dag"], DagTiming(match["dag"]))
            timing.run_id, timing.state = match["run_id"], match["state"]
            if timing.reported_at is None:
                timing.reported_at = arrived
        elif match := _ACCURACY.match(text):
            run.accuracy = float(match["accuracy"])
        elif _CACHE_HIT.match(text):
            run.cache_hit = True
        elif match := _DONE.match(text):
            run.done_at, run.done_seconds = arrived, int(match["seconds"])
    run.last_line_at = lines[-1][0] if lines else None
    database = params.parent / "airflow_home" / "airflow.db"
    for timing in run.dags.values():
        _read_database(database, timing, started_epoch)
    failed = [
        f"{dag_id} {timing.state or 'not run'}" for dag_id, timing in run.dags.items() if timing.state != "success"
    ]
    if returncode != 0 or failed or set(run.dags) != set(DAGS):
        raise BenchmarkError(
            f"{label}: make run exited with {returncode} ({', '.join(failed) or 'DAGs ' + str(sorted(run.dags))}); "
            f"log {log_path}:\n{tail(log_path)}"
        )
    return run


def import_costs(project_root: Path, logs: Path, repeats: int = IMPORT_REPEATS) -> dict[str, list[float]]:
    """Seconds of ``import MODULE`` in a fresh process (each module, ``repeats`` times), and of ``python -c pass``."""
    from pipelines.platform.airflow_home import airflow_env

    # Airflow reads (and would create) its home on import: point it at the benchmark project's.
    env = {**child_env(), "AIRFLOW_HOME": airflow_env(project_root)["AIRFLOW_HOME"]}
    results: dict[str, list[float]] = {"python start (python -c pass)": []}
    results.update({module: [] for module in IMPORTED_MODULES})
    with (logs / "imports.log").open("a", encoding="utf-8") as handle:
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], cwd=REPO_ROOT, env=env, check=True)
            results["python start (python -c pass)"].append(time.perf_counter() - started)
            for module in IMPORTED_MODULES:
                code = (
                    "import sys, time\nstarted = time.perf_counter()\n"
                    f"import {module}\nsys.stdout.write(repr(time.perf_counter() - started))\n"
                )
                completed = subprocess.run(
                    [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False
                )
                handle.write(f"{module}: exit {completed.returncode} {completed.stdout}\n{completed.stderr[-2000:]}\n")
                if completed.returncode != 0:
                    raise BenchmarkError(f"import {module} failed in a fresh process:\n{completed.stderr[-2000:]}")
                results[module].append(float(completed.stdout.strip().splitlines()[-1]))
    return results


def _median_tasks(runs: list[MakeRun], dag_id: str) -> dict[str, float | None]:
    """The median duration of each task of ``dag_id`` over ``runs`` (in the order of the first run)."""
    names = [str(task["task_id"]) for task in runs[0].dag(dag_id).tasks] if runs else []
    return {
        name: median(
            [
                float(task["seconds"])
                for run in runs
                for task in run.dag(dag_id).tasks
                if task["task_id"] == name and task["seconds"] is not None
            ]
        )
        for name in names
    }


def _closest_to_median(runs: list[MakeRun]) -> MakeRun:
    middle = median([run.wall_seconds for run in runs]) or 0.0
    return min(runs, key=lambda run: abs(run.wall_seconds - middle))


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{value:.1f}" for value in values)


def _with_accuracy(seconds: float | None, accuracy: float | None) -> str:
    return f"{fmt(seconds, 1)} (acc {fmt(accuracy, 4)})"


def bench_make_run(ctx: Context) -> Outcome:
    """Warm ``make run`` (trained and cache hit) vs the TFX peer and the plain script; promote; breakdown."""
    root = ctx.folder("make_run")
    logs = root / "logs"
    logs.mkdir()
    params = write_params(root / "project")
    environment: PeerEnvironment = ensure_environment(logs / "peer-build.log")

    log("  make run: cold (first run in a fresh project; a note only)")
    cold = run_make(params, logs / "cold.log", force=False, label="cold")
    log(f"  make run cold: {cold.wall_seconds:.1f} s")
    log(f"  imports in fresh processes (median of {IMPORT_REPEATS})")
    imports = import_costs(params.parent, logs)
    # The plain script's MLflow store is created by a first run too, so both sides are compared warm.
    plain_root = root / "plain"
    plain_args = ["plain-retrain", "--params", str(params), "--root", str(plain_root)]
    log("  plain script: cold (creates its MLflow store; a note only)")
    plain_cold = run_child(plain_args, logs / "plain-cold.log")

    rounds = 1 if ctx.quick else 2
    trained: list[MakeRun] = []
    hits: list[MakeRun] = []
    peers: list[PeerRun] = []
    plains: list[tuple[dict[str, Any], float]] = []
    for number in range(1, rounds + 1):
        log(f"  round {number}/{rounds}: make run --force (warm, trains)")
        trained.append(run_make(params, logs / f"trained-{number}.log", force=True, label=f"trained {number}"))
        log(f"  make run --force: {trained[-1].wall_seconds:.1f} s, accuracy {trained[-1].accuracy}")
        if environment.usable:
            log(f"  round {number}/{rounds}: TFX peer (whole process)")
            peers.append(run_peer(environment, root / f"peer-{number}"))
            peer = peers[-1]
            log(f"  TFX peer: {peer.wall_seconds:.1f} s, accuracy {peer.accuracy} {peer.error}".rstrip())
        log(f"  round {number}/{rounds}: make run (warm, cache hit expected)")
        hits.append(run_make(params, logs / f"cache-hit-{number}.log", force=False, label=f"cache hit {number}"))
        log(f"  make run: {hits[-1].wall_seconds:.1f} s, cache hit {hits[-1].cache_hit}")
        log(f"  round {number}/{rounds}: plain script (load, fit, evaluate, log)")
        plains.append(run_child(plain_args, logs / f"plain-{number}.log"))
        log(f"  plain script: {plains[-1][1]:.1f} s, accuracy {plains[-1][0]['test_accuracy']:.4f}")

    trained_wall = median([run.wall_seconds for run in trained])
    trained_accuracy = median([run.accuracy for run in trained if run.accuracy is not None])
    hit_wall = median([run.wall_seconds for run in hits])
    good_peers = [peer for peer in peers if peer.ok]
    peer_wall = median([peer.wall_seconds for peer in good_peers])
    peer_accuracy = median([peer.accuracy for peer in good_peers if peer.accuracy is not None])
    plain_wall = median([seconds for _, seconds in plains])
    plain_accuracy = median([float(answer["test_accuracy"]) for answer, _ in plains])
    cold_note = f"cold first run in the fresh project {cold.wall_seconds:.1f} s (not compared)"

    rows: list[Row] = []
    trained_measure = "warm make run, trained (--force): wall s vs TFX peer whole process (target ratio <= 0.5)"
    if not environment.usable:
        rows.append(unusable_row("make_run", trained_measure, environment))
    elif not good_peers:
        errors = "; ".join(peer.error for peer in peers)
        rows.append(Row("make_run", trained_measure, _with_accuracy(trained_wall, trained_accuracy), note=errors))
    else:
        rows.append(
            Row(
                "make_run",
                trained_measure,
                _with_accuracy(trained_wall, trained_accuracy),
                _with_accuracy(peer_wall, peer_accuracy),
                fmt(ratio(trained_wall, peer_wall)),
                f"median of {len(trained)} / {len(good_peers)}, alternating; "
                f"make run {_seconds([r.wall_seconds for r in trained])} s, "
                f"peer {_seconds([p.wall_seconds for p in good_peers])} s (its pipeline alone "
                f"{_seconds([p.pipeline_seconds or 0.0 for p in good_peers])} s); accuracy: make run on its test split "
                f"(15% of the sample), peer's Evaluator on its eval split (~1/3 of the digits); {cold_note}",
            )
        )
    hit_measure = "warm make run, cache hit (no --force): wall s (ratio to the peer)"
    all_hits = all(run.cache_hit for run in hits)
    hit_note = (
        f"median of {len(hits)}: {_seconds([r.wall_seconds for r in hits])} s; "
        + ("every run said `unchanged since run ...`" if all_hits else "NOT every run was a cache hit")
        + f"; retrain DAG {_seconds([r.dag('retrain').run_seconds or 0.0 for r in hits])} s, of which (median) "
        + ", ".join(f"{task} {fmt(seconds, 1)}" for task, seconds in _median_tasks(hits, "retrain").items())
    )
    if environment.usable and good_peers:
        rows.append(
            Row(
                "make_run",
                hit_measure,
                _with_accuracy(hit_wall, median([r.accuracy for r in hits if r.accuracy is not None])),
                fmt(peer_wall, 1),
                fmt(ratio(hit_wall, peer_wall)),
                hit_note,
            )
        )
    else:
        reason = environment.reason or "; ".join(peer.error for peer in peers)
        rows.append(
            Row("make_run", hit_measure, fmt(hit_wall, 1), note=f"{hit_note}; peer: could not be run: {reason}")
        )
    phases = {name: median([float(answer["phases"][name]) for answer, _ in plains]) for name in plains[0][0]["phases"]}
    rows.append(
        Row(
            "make_run",
            "warm make run, trained, vs the plain script (load, fit, evaluate, log one MLflow run): wall s",
            _with_accuracy(trained_wall, trained_accuracy),
            _with_accuracy(plain_wall, plain_accuracy),
            fmt(ratio(trained_wall, plain_wall)),
            f"median of {len(plains)}: {_seconds([seconds for _, seconds in plains])} s (cold first run "
            f"{plain_cold[1]:.1f} s, not compared); same small_cnn, tf-keras Adam over a cosine decay, batch, epochs "
            "and samples per epoch (originals repeated, not augmented); plain phases (s): "
            f"{', '.join(f'{name} {fmt(value, 1)}' for name, value in phases.items())}",
        )
    )
    promote_trained = [r.dag("promote").run_seconds for r in trained]
    promote_hits = [r.dag("promote").run_seconds for r in hits]
    infra = [
        float(task["seconds"] or 0.0)
        for r in trained
        for task in r.dag("promote").tasks
        if task["task_id"] == "infra_validate"
    ]
    promote_wall = median([value for value in promote_trained if value is not None])
    rows.append(
        Row(
            "make_run",
            f"promote DAG warm, in make run after a trained retrain: run s (target < {PROMOTE_TARGET_SECONDS:.0f})",
            fmt(promote_wall, 1),
            note=f"DAG run start -> end in the DB, median of {_seconds([v or 0.0 for v in promote_trained])}; "
            f"infra_validate {_seconds(infra)} s; after a cache hit (nothing new to promote) "
            f"{_seconds([v or 0.0 for v in promote_hits])} s",
        )
    )
    retrain_runs = [r.dag("retrain") for r in trained]
    retrain_wall = median([t.run_seconds for t in retrain_runs if t.run_seconds is not None])
    retrain_tasks = median([t.task_seconds for t in retrain_runs])
    rows.append(
        Row(
            "make_run",
            "warm make run, trained: retrain DAG run s / sum of its task durations",
            fmt(retrain_wall, 1),
            fmt(retrain_tasks, 1),
            fmt(ratio(retrain_wall, retrain_tasks)),
            "in-process DAG.test: the gaps are Airflow's own bookkeeping between tasks",
        )
    )

    sample = _closest_to_median(trained)
    steps = sample.breakdown()
    accounted = sum(seconds for _, seconds, _ in steps if seconds is not None)
    for step, seconds, note in steps:
        rows.append(Row("make_run", f"breakdown ({sample.label}): {step}", fmt(seconds, 2), note=note))
    rows.append(
        Row(
            "make_run",
            f"breakdown ({sample.label}): sum of the steps / process wall",
            fmt(accounted, 1),
            fmt(sample.wall_seconds, 1),
            fmt(ratio(accounted, sample.wall_seconds)),
            "1.00: every second of the process is in one of the steps above",
        )
    )
    for name, values in imports.items():
        measure = name if name.startswith("python") else f"import {name}"
        rows.append(
            Row(
                "make_run",
                f"breakdown: {measure} in a fresh process, s",
                fmt(median(values), 2),
                note=f"median of {len(values)}: {', '.join(f'{value:.2f}' for value in values)}",
            )
        )

    data = {
        "params": str(params),
        "peer_environment": asdict(environment),
        "cold": _run_json(cold),
        "trained": [_run_json(run) for run in trained],
        "cache_hits": [_run_json(run) for run in hits],
        "peer": [asdict(peer) for peer in peers],
        "plain": [{**answer, "wall_seconds": seconds} for answer, seconds in plains],
        "plain_cold": {**plain_cold[0], "wall_seconds": plain_cold[1]},
        "imports": imports,
        "breakdown_of": sample.label,
        "breakdown": [{"step": step, "seconds": seconds, "note": note} for step, seconds, note in steps],
        "medians": {
            "trained_wall_seconds": trained_wall,
            "trained_accuracy": trained_accuracy,
            "cache_hit_wall_seconds": hit_wall,
            "peer_wall_seconds": peer_wall,
            "peer_accuracy": peer_accuracy,
            "plain_wall_seconds": plain_wall,
            "plain_accuracy": plain_accuracy,
            "ratio_trained_to_peer": ratio(trained_wall, peer_wall),
            "ratio_cache_hit_to_peer": ratio(hit_wall, peer_wall),
            "ratio_trained_to_plain": ratio(trained_wall, plain_wall),
            "promote_seconds": promote_wall,
        },
    }
    return Outcome(rows, data)


def _run_json(run: MakeRun) -> dict[str, Any]:
    """A run for results.json, with its DAGs' derived figures."""
    document = asdict(run)
    for dag_id, timing in run.dags.items():
        document["dags"][dag_id].update(
            {"run_seconds": timing.run_seconds, "task_seconds": timing.task_seconds, "gaps": timing.gaps()}
        )
    return document
