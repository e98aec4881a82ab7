"""Probe the DAG files with the real Airflow parser, in a process of its own (for ``test_dags.py``).

The test process never imports Airflow: each probe runs in a fresh interpreter whose environment (Airflow
home, DAG folder, metadata database URL, ``MLOPS_PARAMS``) the test sets, and writes what it found as JSON.

Modes (the last argument is always the JSON file to write):

* ``dagbag CASES OUT``: parse the DAG folder with ``DagBag``; dump import errors, warnings and, for each DAG,
  its settings, schedule, params, tasks, and whether each run conf of ``CASES`` (a JSON object
  ``{dag_id: [conf, ...]}``) passes the check Airflow makes when a run is created.
* ``imports FILE OUT``: import one DAG file from its path; time it; say which heavy libraries got loaded.
* ``guarded FILE OUT``: parse one DAG file with ``DagBag`` while every database connection, network
  connection and Airflow Variable or Connection lookup is refused and recorded; then check the guard itself.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
import sqlite3
import sys
import time
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

WATCHED_MODULES = ("tensorflow", "tf_keras", "keras", "mlflow", "great_expectations", "dvc", "pandas", "sklearn")


def write(out: Path, report: dict[str, Any]) -> None:
    out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str), encoding="utf-8")


def return_hint(function: Callable[..., Any]) -> str:
    """The resolved return annotation of a task callable: ``str``, ``int``, ``dict[str, typing.Any]``..."""
    try:
        hints = typing.get_type_hints(function)
    except Exception as error:  # an annotation that does not resolve is itself a finding
        return f"UNRESOLVED: {type(error).__name__}: {error}"
    if "return" not in hints:
        return "MISSING"
    hint = hints["return"]
    return hint.__name__ if isinstance(hint, type) else repr(hint)


def asset_names(condition: Any) -> set[str]:
    """The names of the assets an asset condition (an asset, or ``AssetAny``/``AssetAll`` of them) waits for."""
    nested = getattr(condition, "objects", None)
    if nested is not None:
        return set().union(*(asset_names(part) for part in nested))
    return {condition.name}


def describe_schedule(dag: Any, serialized: Any) -> dict[str, Any]:
    """The SDK timetable as written in the DAG file and the scheduler's view of it after serialization."""
    timetable = dag.timetable
    inner = getattr(timetable, "timetable", timetable)
    condition = getattr(timetable, "asset_condition", None)
    assets = sorted(asset_names(condition)) if condition is not None else []
    return {
        "sdk_class": type(timetable).__name__,
        "inner_class": type(inner).__name__,
        "cron": getattr(inner, "expression", None),
        "timezone": str(getattr(inner, "timezone", "")) or None,
        "assets": assets,
        "serialized_class": type(serialized.timetable).__name__,
        "summary": serialized.timetable.summary,
        "description": serialized.timetable.description,
        "can_be_scheduled": serialized.timetable.can_be_scheduled,
    }


def check_confs(serialized: Any, confs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate each run conf as ``SerializedDAG.create_dagrun`` does: ``params.deep_merge(conf).validate()``."""
    results = []
    for conf in confs:
        try:
            values = serialized.params.deep_merge(conf).validate()
        except Exception as error:
            results.append({"conf": conf, "ok": False, "error": f"{type(error).__name__}: {error}"})
        else:
            results.append({"conf": conf, "ok": True, "values": values})
    return results


def describe_dag(dag: Any, confs: list[dict[str, Any]]) -> dict[str, Any]:
    from airflow.serialization.serialized_objects import DagSerialization

    serialized = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    tasks = []
    for task in dag.tasks:
        timeout = task.execution_timeout
        callable_ = getattr(task, "python_callable", None)
        tasks.append(
            {
                "task_id": task.task_id,
                "operator": type(task).__name__,
                "retries": task.retries,
                "execution_timeout_s": timeout.total_seconds() if timeout is not None else None,
                "pool": task.pool,
                "queue": task.queue,
                "is_mapped": bool(getattr(task, "is_mapped", False)),
                "upstream": sorted(task.upstream_task_ids),
                "downstream": sorted(task.downstream_task_ids),
                "return_hint": return_hint(callable_) if callable_ is not None else "NO_CALLABLE",
            }
        )
    params = {
        name: {"default": dag.params.get_param(name).value, "schema": dag.params.get_param(name).schema}
        for name in dag.params
    }
    return {
        "dag_id": dag.dag_id,
        "fileloc": dag.fileloc,
        "tags": sorted(dag.tags),
        "doc_md": dag.doc_md,
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
        "schedule_is_none": dag.schedule is None,
        "schedule": describe_schedule(dag, serialized),
        "params": params,
        "conf_checks": check_confs(serialized, confs),
        "tasks": tasks,
    }


def probe_dagbag(cases: dict[str, list[dict[str, Any]]], out: Path) -> None:
    from airflow.configuration import conf
    from airflow.dag_processing.dagbag import DagBag

    dags_folder = conf.get("core", "dags_folder")
    bag = DagBag(dag_folder=dags_folder)
    write(
        out,
        {
            "dags_folder": dags_folder,
            "load_examples": conf.getboolean("core", "load_examples"),
            "import_errors": dict(bag.import_errors),
            "captured_warnings": {path: list(found) for path, found in bag.captured_warnings.items()},
            "dag_ids": sorted(bag.dag_ids),
            "dags": {dag_id: describe_dag(dag, cases.get(dag_id, [])) for dag_id, dag in bag.dags.items()},
        },
    )


def probe_imports(dag_file: Path, out: Path) -> None:
    """Import the DAG file from its path in this fresh interpreter; time the framework and the file apart."""
    started = time.perf_counter()
    import airflow.sdk  # noqa: F401  (what every DAG file imports first: timed apart from the file itself)

    framework_done = time.perf_counter()
    name = f"dag_probe_{dag_file.stem}"
    spec = importlib.util.spec_from_file_location(name, dag_file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {dag_file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    finished = time.perf_counter()
    write(
        out,
        {
            "file": str(dag_file),
            "framework_seconds": framework_done - started,
            "dag_file_seconds": finished - framework_done,
            "total_seconds": finished - started,
            "loaded": {module_name: module_name in sys.modules for module_name in WATCHED_MODULES},
        },
    )


class BlockedAtParseTimeError(RuntimeError):
    """Raised by the guard instead of opening a connection."""


class Guard:
    """Refuse and record database, network, Variable and Connection access."""

    def __init__(self) -> None:
        self.attempts: list[dict[str, str]] = []

    def block(self, kind: str, detail: str) -> typing.NoReturn:
        stack = "".join(traceback.format_stack(limit=25)[:-2])
        self.attempts.append({"kind": kind, "detail": detail, "stack": stack})
        raise BlockedAtParseTimeError(f"{kind} at DAG parse time: {detail}")

    def install_low_level(self) -> None:
        """Before Airflow is imported: DB-API (sqlite3), SQLAlchemy engines and pools, sockets."""
        import sqlalchemy.engine
        import sqlalchemy.pool

        guard = self

        def sqlite_connect(database: Any, *args: Any, **kwargs: Any) -> Any:
            guard.block("sqlite3.connect", str(database))

        def engine_connect(engine: Any, *args: Any, **kwargs: Any) -> Any:
            guard.block("Engine.connect", str(engine.url))

        def engine_raw_connection(engine: Any, *args: Any, **kwargs: Any) -> Any:
            guard.block("Engine.raw_connection", str(engine.url))

        def pool_connect(pool: Any, *args: Any, **kwargs: Any) -> Any:
            guard.block("Pool.connect", repr(pool))

        def socket_connect(sock: socket.socket, address: Any, *args: Any, **kwargs: Any) -> Any:
            guard.block("socket.connect", repr(address))

        patches: list[tuple[Any, str, Callable[..., Any]]] = [
            (sqlite3, "connect", sqlite_connect),
            (sqlalchemy.engine.Engine, "connect", engine_connect),
            (sqlalchemy.engine.Engine, "raw_connection", engine_raw_connection),
            (sqlalchemy.pool.Pool, "connect", pool_connect),
            (socket.socket, "connect", socket_connect),
            (socket.socket, "connect_ex", socket_connect),
        ]
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)

    def install_airflow(self) -> None:
        """After the Task SDK is imported: the lookups behind ``Variable.get`` and ``Connection.get``."""
        from airflow.sdk.execution_time import context

        async def async_connection(conn_id: str) -> Any:
            self.block("airflow.sdk async_get_connection", conn_id)

        replacements: dict[str, Callable[..., Any]] = {
            name: self._refuse(f"airflow.sdk {name.lstrip('_')}")
            for name in ("_get_variable", "_get_variable_keys", "_set_variable", "_get_connection")
        }
        replacements["_async_get_connection"] = async_connection
        for name, replacement in replacements.items():
            setattr(context, name, replacement)

    def _refuse(self, kind: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            self.block(kind, repr(args[:1]))

        return refused


def self_test(guard: Guard) -> dict[str, list[str]]:
    """Try what a careless DAG file would do; say what was tried and what the guard blocked (must be all)."""
    import sqlalchemy
    from airflow import settings
    from airflow.sdk import Connection, Variable

    engine: Any = settings.engine
    session_factory: Any = settings.Session
    blocked: list[str] = []
    attempts: list[tuple[str, Callable[[], Any]]] = [
        ("metadata DB through airflow.settings.engine", lambda: engine.connect()),
        ("ORM session query", lambda: session_factory().execute(sqlalchemy.text("select 1"))),
        ("Variable.get", lambda: Variable.get("any_key")),
        ("Connection.get", lambda: Connection.get("any_conn")),
        ("network", lambda: socket.create_connection(("127.0.0.1", 9), timeout=1)),
    ]
    for label, attempt in attempts:
        before = len(guard.attempts)
        # Blocked (recorded) or failed otherwise (not recorded): told apart below.
        with contextlib.suppress(Exception):
            attempt()
        if len(guard.attempts) > before:
            blocked.append(label)
    return {"tried": [label for label, _ in attempts], "blocked": blocked}


def probe_guarded(dag_file: Path, out: Path) -> None:
    guard = Guard()
    guard.install_low_level()
    import airflow.sdk  # noqa: F401

    guard.install_airflow()
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(dag_file))
    parse_attempts = list(guard.attempts)
    write(
        out,
        {
            "file": str(dag_file),
            "import_errors": dict(bag.import_errors),
            "dag_ids": sorted(bag.dag_ids),
            "attempts": parse_attempts,
            "self_test": self_test(guard),
        },
    )


def main(argv: list[str]) -> int:
    mode, *args = argv
    if mode == "dagbag":
        probe_dagbag(json.loads(args[0]), Path(args[1]))
    elif mode == "imports":
        probe_imports(Path(args[0]), Path(args[1]))
    elif mode == "guarded":
        probe_guarded(Path(args[0]), Path(args[1]))
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
