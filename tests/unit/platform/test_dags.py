"""DAG integrity: the real Airflow parser, run by ``tests/dag_probe.py`` in subprocesses of their own.

This process never imports Airflow. Each probe gets a fresh interpreter whose Airflow home, SQLite metadata
database and JSON output live under pytest's temporary folder; the DAG folder is the repo's ``dags/`` and
``MLOPS_PARAMS`` the repo's ``params.yaml``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.config import Config, load_config
from pipelines.platform.airflow_home import DAGS_FOLDER
from tests.support import REPO_ROOT

REPO = REPO_ROOT
PARAMS = REPO / "params.yaml"
PROBE = REPO_ROOT / "tests" / "dag_probe.py"
PROBE_TIMEOUT_SECONDS = 240
DAG_FILES = sorted(path.name for path in DAGS_FOLDER.glob("*.py"))

HEAVY_MODULES = ("tensorflow", "tf_keras", "keras", "mlflow", "great_expectations", "dvc")
REPORTED_MODULES = ("pandas", "sklearn")
KNOWN_POOLS = {"default_pool", "dvc"}  # ``dvc`` is created by ``pipelines.platform.airflow_home.prepare``
SMALL_XCOM_RETURNS = {
    "str",
    "int",
    "bool",
    "dict[str, typing.Any]",
    "dict[str, str]",
    "dict[str, int]",
    "dict[str, bool]",
    "list[dict[str, typing.Any]]",  # the sweep's candidates: bounded by sweep.max_candidates (at most 32)
}

RETRAIN_ORDER = ["ingest", "validate", "augment", "version", "train", "evaluate", "gate", "register", "auto_promote"]
SWEEP_ORDER = [
    "ingest",
    "validate",
    "augment",
    "version",
    "plan_candidates",
    "train",
    "select",
    "evaluate",
    "gate",
    "register",
    "auto_promote",
]
# train also takes the data version; select reads the plan (the sweep's parent run).
SWEEP_EXTRA_EDGES = [("version", "train"), ("plan_candidates", "select")]
PROMOTE_ORDER = ["resolve", "check_gate", "infra_validate", "set_champion", "deploy"]
MONITOR_ORDER = ["check", "request_retrain"]

# (label, run conf, accepted?): checked the way Airflow checks a run conf when it creates the run.
PROMOTE_CONFS: list[tuple[str, dict[str, Any], bool]] = [
    ("reason-only", {"reason": "weekly retrain passed its gate"}, True),
    ("version-number", {"version": "12", "reason": "r"}, True),
    ("rollback", {"version": "previous", "reason": "r"}, True),
    ("forced", {"version": "challenger", "reason": "r", "force": True}, True),
    ("no-conf", {}, False),
    ("empty-reason", {"reason": ""}, False),
    ("version-abc", {"version": "abc", "reason": "r"}, False),
    ("version-with-suffix", {"version": "12abc", "reason": "r"}, False),
    ("force-not-boolean", {"force": "yes", "reason": "r"}, False),
]
RETRAIN_CONFS: list[tuple[str, dict[str, Any], bool]] = [
    ("scheduled-no-conf", {}, True),
    ("folder-source", {"source": "folder:/tmp/images"}, True),
    ("auto-promote-not-boolean", {"auto_promote": "yes"}, False),
]


def probe_env(home: Path, sql_alchemy_conn: str) -> dict[str, str]:
    """The probe's environment: this one without any Airflow or MLOPS setting, plus the project's own."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW", "_AIRFLOW", "MLOPS_"))}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql_alchemy_conn,
            "MLOPS_PARAMS": str(PARAMS),
        }
    )
    return env


def run_probe(workdir: Path, env: dict[str, str], mode: str, *args: str) -> dict[str, Any]:
    """Run ``dag_probe.py MODE ARGS... OUT`` in ``workdir``; return the JSON it wrote to OUT."""
    out = workdir / f"probe-{mode}.json"
    completed = subprocess.run(
        [sys.executable, str(PROBE), mode, *args, str(out)],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_SECONDS,
        check=False,
    )
    failure = f"probe {mode} {' '.join(args)} failed with exit {completed.returncode}:\n{completed.stderr[-6000:]}"
    assert completed.returncode == 0, failure
    assert out.exists(), f"probe {mode} wrote no {out.name}:\n{completed.stderr[-6000:]}"
    report: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return report


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(PARAMS)


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The DagBag of the repo's ``dags/``, parsed once in a subprocess and dumped as JSON."""
    workdir = tmp_path_factory.mktemp("dagbag")
    home = workdir / "airflow_home"
    env = probe_env(home, f"sqlite:///{home / 'airflow.db'}")
    cases = {
        "promote": [conf for _, conf, _ in PROMOTE_CONFS],
        "retrain": [conf for _, conf, _ in RETRAIN_CONFS],
    }
    return run_probe(workdir, env, "dagbag", json.dumps(cases))


def the_dag(dagbag: dict[str, Any], dag_id: str) -> dict[str, Any]:
    assert dag_id in dagbag["dags"], f"DAG {dag_id!r} was not parsed; parsed: {dagbag['dag_ids']}"
    dag: dict[str, Any] = dagbag["dags"][dag_id]
    return dag


def tasks_by_id(dag: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {task["task_id"]: task for task in dag["tasks"]}


# 1. No import errors, exactly the project's DAGs.


def test_probe_used_the_repo_dags_folder_without_examples(dagbag: dict[str, Any]) -> None:
    assert Path(dagbag["dags_folder"]) == REPO / "dags", f"Airflow parsed {dagbag['dags_folder']}, not {REPO / 'dags'}"
    assert dagbag["load_examples"] is False, "AIRFLOW__CORE__LOAD_EXAMPLES=False did not reach Airflow"


def test_dagbag_has_no_import_errors(dagbag: dict[str, Any]) -> None:
    errors = "\n\n".join(f"{path}:\n{error}" for path, error in dagbag["import_errors"].items())
    assert not dagbag["import_errors"], f"DAG files fail to import:\n{errors}"


def test_dagbag_holds_exactly_the_project_dags(dagbag: dict[str, Any]) -> None:
    assert set(dagbag["dag_ids"]) == {"retrain", "promote", "monitor"}, f"unexpected DAG ids {dagbag['dag_ids']}"


def test_dag_parsing_emits_no_warnings(dagbag: dict[str, Any]) -> None:
    assert not dagbag["captured_warnings"], f"parsing the DAGs warns: {dagbag['captured_warnings']}"


# 2. Light imports: nothing heavy is imported when a DAG file is parsed.


@pytest.mark.parametrize("dag_file", DAG_FILES)
def test_dag_file_imports_stay_light(
    dag_file: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, record_property: Any
) -> None:
    home = tmp_path / "airflow_home"
    report = run_probe(
        tmp_path, probe_env(home, f"sqlite:///{home / 'airflow.db'}"), "imports", str(DAGS_FOLDER / dag_file)
    )
    loaded = report["loaded"]
    heavy = [name for name in HEAVY_MODULES if loaded[name]]
    assert not heavy, f"importing dags/{dag_file} loads {heavy}: move those imports inside the task bodies"

    # Timings are reported, never asserted (speed is measured by the benchmarks).
    timing = {key: round(report[key], 3) for key in ("framework_seconds", "dag_file_seconds", "total_seconds")}
    reported = {name: loaded[name] for name in REPORTED_MODULES}
    summary_path = tmp_path_factory.getbasetemp() / "dag_import_report.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    summary[dag_file] = {**timing, "loaded": loaded}
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True), encoding="utf-8")
    for key, value in timing.items():
        record_property(key, value)
    print(f"dags/{dag_file}: import {timing} (also loaded: {reported}); report {summary_path}")


# 3. No database, network, Variable or Connection access at parse time.


@pytest.mark.parametrize("dag_file", DAG_FILES)
def test_dag_file_parses_without_db_or_connections(dag_file: str, tmp_path: Path) -> None:
    # The metadata DB is a SQLite file in a folder that does not exist: opening it could only fail. On top,
    # the probe makes every DB-API, SQLAlchemy, socket, Variable and Connection access raise and records it.
    unreachable = tmp_path / "no_such_dir" / "airflow.db"
    env = probe_env(tmp_path / "airflow_home", f"sqlite:///{unreachable}")
    report = run_probe(tmp_path, env, "guarded", str(DAGS_FOLDER / dag_file))

    assert not report["import_errors"], f"dags/{dag_file} fails to parse without a database: {report['import_errors']}"
    assert report["dag_ids"], f"dags/{dag_file} defines no DAG"
    attempts = "\n".join(f"- {a['kind']}: {a['detail']}\n{a['stack']}" for a in report["attempts"])
    assert not report["attempts"], f"parsing dags/{dag_file} reaches out at parse time:\n{attempts}"
    self_test = report["self_test"]
    assert self_test["tried"], "the guard self-test tried nothing"
    assert self_test["blocked"] == self_test["tried"], (
        f"the guard missed some accesses (tried {self_test['tried']}, blocked {self_test['blocked']}): "
        "a clean result would prove nothing"
    )
    assert not unreachable.parent.exists(), "something created the unreachable database folder"


# 4. Structure of each DAG.


@pytest.mark.parametrize("dag_id", ["retrain", "promote", "monitor"])
def test_dag_settings(dagbag: dict[str, Any], dag_id: str) -> None:
    dag = the_dag(dagbag, dag_id)
    assert dag["tags"], f"{dag_id} has no tags"
    assert (dag["doc_md"] or "").strip(), f"{dag_id} has no doc_md"
    assert dag["catchup"] is False, f"{dag_id} must not catch up on missed runs"
    assert dag["max_active_runs"] == 1, f"{dag_id} must run one at a time, max_active_runs={dag['max_active_runs']}"
    for task in dag["tasks"]:
        assert task["retries"] >= 2, f"{dag_id}.{task['task_id']} has retries={task['retries']}, expected >= 2"
        timeout = task["execution_timeout_s"]
        assert timeout is not None, f"{dag_id}.{task['task_id']} has no execution_timeout"
        assert timeout > 0, f"{dag_id}.{task['task_id']} has execution_timeout {timeout} s"


def assert_chain(dag: dict[str, Any], order: list[str], extra_edges: list[tuple[str, str]] | None = None) -> None:
    """The DAG is exactly the chain ``order[0] -> order[1] -> ...`` plus ``extra_edges``: no other task or edge."""
    tasks = tasks_by_id(dag)
    extra = extra_edges or []
    assert sorted(tasks) == sorted(order), f"{dag['dag_id']} has tasks {sorted(tasks)}, expected {order}"
    for index, task_id in enumerate(order):
        expected_down = sorted(order[index + 1 : index + 2] + [down for up, down in extra if up == task_id])
        expected_up = sorted(
            (order[index - 1 : index] if index else []) + [up for up, down in extra if down == task_id]
        )
        task = tasks[task_id]
        assert sorted(task["downstream"]) == expected_down, (
            f"{dag['dag_id']}.{task_id} feeds {task['downstream']}, expected {expected_down}"
        )
        assert sorted(task["upstream"]) == expected_up, (
            f"{dag['dag_id']}.{task_id} waits on {task['upstream']}, expected {expected_up}"
        )


def test_retrain_task_order(dagbag: dict[str, Any]) -> None:
    assert_chain(the_dag(dagbag, "retrain"), RETRAIN_ORDER)


def test_a_sweep_maps_train_over_its_candidates_and_selects_one(tmp_path: Path) -> None:
    params = yaml.safe_load(PARAMS.read_text(encoding="utf-8"))
    params["sweep"] = {"candidates": [{"optimizer": "sgd", "learning_rate": 0.05}, {"optimizer": "adagrad"}]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    home = tmp_path / "airflow_home"
    env = {**probe_env(home, f"sqlite:///{home / 'airflow.db'}"), "MLOPS_PARAMS": str(tmp_path / "params.yaml")}
    dag = the_dag(run_probe(tmp_path, env, "dagbag", json.dumps({})), "retrain")
    assert_chain(dag, SWEEP_ORDER, SWEEP_EXTRA_EDGES)
    assert tasks_by_id(dag)["train"]["is_mapped"], "train is mapped over the candidates"


def test_promote_task_order(dagbag: dict[str, Any]) -> None:
    assert_chain(the_dag(dagbag, "promote"), PROMOTE_ORDER)


def test_monitor_task_order_and_schedule(dagbag: dict[str, Any]) -> None:
    dag = the_dag(dagbag, "monitor")
    assert_chain(dag, MONITOR_ORDER)
    assert dag["schedule"]["serialized_class"] == "CronTriggerTimetable", f"monitor runs on a cron: {dag['schedule']}"
    assert dag["schedule"]["cron"] == "0 * * * *", f"hourly: {dag['schedule']}"


def test_retrain_dvc_tasks_share_the_dvc_pool(dagbag: dict[str, Any]) -> None:
    tasks = tasks_by_id(the_dag(dagbag, "retrain"))
    for task_id in ("ingest", "augment", "version"):
        assert tasks[task_id]["pool"] == "dvc", f"retrain.{task_id} runs in pool {tasks[task_id]['pool']!r}, not 'dvc'"


def test_tasks_use_only_pools_that_exist(dagbag: dict[str, Any]) -> None:
    for dag in dagbag["dags"].values():
        for task in dag["tasks"]:
            assert task["pool"] in KNOWN_POOLS, (
                f"{dag['dag_id']}.{task['task_id']} uses pool {task['pool']!r}, which nothing creates ({KNOWN_POOLS})"
            )


def test_retrain_runs_on_its_cron_or_when_images_arrive(dagbag: dict[str, Any], config: Config) -> None:
    schedule = the_dag(dagbag, "retrain")["schedule"]
    assert schedule["sdk_class"] == "AssetOrTimeSchedule", f"retrain's schedule is a {schedule['sdk_class']}"
    assert schedule["serialized_class"] == "AssetOrTimeSchedule", (
        f"the scheduler sees a {schedule['serialized_class']}, not an asset-or-time schedule"
    )
    assert schedule["inner_class"] == "CronTriggerTimetable", f"the time part is a {schedule['inner_class']}"
    assert schedule["cron"] == config.schedule.cron, (
        f"retrain's cron {schedule['cron']!r} is not params.yaml's schedule.cron {config.schedule.cron!r}"
    )
    assert config.schedule.cron in schedule["summary"], f"the UI summary {schedule['summary']!r} lacks the cron"
    assert schedule["timezone"] == "UTC", f"the cron is read in {schedule['timezone']}, params.yaml says UTC"
    assert schedule["assets"] == ["incoming_images"], f"retrain waits on assets {schedule['assets']}"
    assert schedule["can_be_scheduled"] is True, "the scheduler would never start retrain"


def test_retrain_params_default_to_params_yaml(dagbag: dict[str, Any], config: Config) -> None:
    params = the_dag(dagbag, "retrain")["params"]
    assert params["source"]["default"] == config.ingest.source, f"source defaults to {params['source']['default']!r}"
    assert params["auto_promote"]["default"] is config.schedule.auto_promote, (
        f"auto_promote defaults to {params['auto_promote']['default']!r}"
    )


@pytest.mark.parametrize(
    ("index", "conf", "accepted"),
    [pytest.param(i, conf, accepted, id=label) for i, (label, conf, accepted) in enumerate(RETRAIN_CONFS)],
)
def test_retrain_run_conf_is_validated(
    dagbag: dict[str, Any], index: int, conf: dict[str, Any], accepted: bool
) -> None:
    check = the_dag(dagbag, "retrain")["conf_checks"][index]
    assert check["conf"] == conf, f"probe results are out of order: {check['conf']} != {conf}"
    assert check["ok"] is accepted, f"retrain conf {conf}: accepted={check['ok']}, expected {accepted}: {check}"


def test_promote_is_never_scheduled(dagbag: dict[str, Any]) -> None:
    dag = the_dag(dagbag, "promote")
    assert dag["schedule_is_none"] is True, "promote must have schedule=None"
    assert dag["schedule"]["serialized_class"] == "NullTimetable", f"promote's timetable: {dag['schedule']}"
    assert dag["schedule"]["can_be_scheduled"] is False, "the scheduler would start promote on its own"


def test_promote_params(dagbag: dict[str, Any]) -> None:
    params = the_dag(dagbag, "promote")["params"]
    assert set(params) == {"version", "reason", "force"}, f"promote's params are {sorted(params)}"
    assert params["version"]["default"] == "challenger", f"version defaults to {params['version']['default']!r}"
    assert params["force"]["default"] is False, f"force defaults to {params['force']['default']!r}"
    assert params["reason"]["schema"].get("minLength", 0) >= 1, f"reason may be empty: {params['reason']['schema']}"
    assert not params["reason"]["default"], "reason must have no usable default: whoever promotes says why"


@pytest.mark.parametrize(
    ("index", "conf", "accepted"),
    [pytest.param(i, conf, accepted, id=label) for i, (label, conf, accepted) in enumerate(PROMOTE_CONFS)],
)
def test_promote_run_conf_is_validated(
    dagbag: dict[str, Any], index: int, conf: dict[str, Any], accepted: bool
) -> None:
    check = the_dag(dagbag, "promote")["conf_checks"][index]
    assert check["conf"] == conf, f"probe results are out of order: {check['conf']} != {conf}"
    assert check["ok"] is accepted, f"promote conf {conf}: accepted={check['ok']}, expected {accepted}: {check}"
    if accepted:
        expected = {"version": "challenger", "force": False, **conf}
        assert check["values"] == expected, f"promote conf {conf} resolves to {check['values']}, expected {expected}"


# 5. XCom stays small: tasks return strings, numbers, flags or small dicts of them.


@pytest.mark.parametrize("dag_id", ["retrain", "promote", "monitor"])
def test_task_returns_stay_small(dagbag: dict[str, Any], dag_id: str) -> None:
    for task in the_dag(dagbag, dag_id)["tasks"]:
        assert task["return_hint"] in SMALL_XCOM_RETURNS, (
            f"{dag_id}.{task['task_id']} returns {task['return_hint']}; XComs must stay small ({SMALL_XCOM_RETURNS})"
        )
