"""Parse time of each DAG file: ``import airflow.sdk``, then the DAG file alone, in a fresh process per file.

Airflow's DAG processor re-imports DAG files continually, with ``airflow.sdk`` already loaded; the DAG
file's own import is therefore the figure of interest. The child also lists the heavy modules (TensorFlow,
MLflow, pandas...) the DAG file pulled in, which a DAG file should never do at the top.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import REPO_ROOT, Context, Outcome, Row, child_env, fmt, log, median, ratio, run_child


def bench_parse(ctx: Context) -> Outcome:
    """For each ``dags/*.py``: median seconds of ``import airflow.sdk`` and of the DAG file's import."""
    root = ctx.folder("parse")
    env = child_env({"AIRFLOW_HOME": str(root / "airflow_home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"})
    files = sorted((REPO_ROOT / "dags").glob("*.py"))
    if not files:
        return Outcome([Row("parse", "DAG files", "0", note="no dags/*.py")], {"files": {}})
    repeats = ctx.sizes.parse_repeats
    rows: list[Row] = []
    results: dict[str, Any] = {}
    for path in files:
        runs = []
        for index in range(repeats):
            log(f"  {path.name}: fresh process {index + 1}/{repeats}")
            answer, _ = run_child(["parse-dag", "--file", str(path)], root / f"{path.stem}-{index}.log", env=env)
            runs.append(answer)
        sdk = median([float(run["sdk_seconds"]) for run in runs])
        dag = median([float(run["dag_seconds"]) for run in runs])
        heavy = sorted({name for run in runs for name in run["heavy_modules_added"]})
        results[path.name] = {"sdk_seconds": sdk, "dag_seconds": dag, "heavy_modules_added": heavy, "runs": runs}
        rows.append(
            Row(
                "parse",
                f"s: import dags/{path.name} (after airflow.sdk)",
                fmt(dag, 3),
                fmt(sdk, 3),
                fmt(ratio(dag, sdk)),
                f"baseline = import airflow.sdk; median of {repeats}; heavy modules pulled in: "
                + (", ".join(heavy) if heavy else "none"),
            )
        )
    return Outcome(rows, {"files": results, "repeats": repeats})
