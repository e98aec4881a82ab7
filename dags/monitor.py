"""### Monitor.

Hourly: compare what the prediction service served over the last `monitor.window_hours` with what the
champion was trained and tested on, and close the loop back to retraining.

Steps: **check** (pixel statistics of the served images against the champion's training profile, the served
class distribution against its test predictions by a chi-square test, live accuracy on the fed-back labels;
the report is an MLflow run in the `monitor.experiment` experiment, linked to the champion version) ->
**request_retrain** (when drift or live accuracy crosses the thresholds in `params.yaml`: updates the
`incoming_images` asset, so the `retrain` DAG runs on the old data plus the fed-back images, gated and
promoted as usual; otherwise skipped, and no asset event is emitted).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Asset, CronTriggerTimetable, dag, task

from pipelines.platform.orchestration import DEFAULT_ARGS, load_project, run_step

INCOMING_IMAGES = Asset(name="incoming_images", uri="mlops://incoming_images")
"""The asset the retrain DAG is scheduled on (dags/retrain.py declares the same name and URI)."""


@dag(
    dag_id="monitor",
    doc_md=__doc__,
    schedule=CronTriggerTimetable("0 * * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["mlops", "monitoring"],
)
def monitor() -> None:
    """Wire the monitoring steps; the task bodies import and call the pipeline function."""

    @task(execution_timeout=timedelta(minutes=20))
    def check() -> dict[str, Any]:
        from pipelines.release.monitor import monitor as monitor_step

        report = run_step(monitor_step, load_project())
        print(report.summary())
        return {
            "champion_version": report.champion_version,
            "served_images": report.served_images,
            "drift_detected": report.drift_detected,
            "retrain": report.retrain,
            "reasons": report.reasons,
            "run_id": report.run_id,
        }

    @task(outlets=[INCOMING_IMAGES], execution_timeout=timedelta(minutes=5))
    def request_retrain(checked: dict[str, Any]) -> str:
        from airflow.sdk import get_current_context
        from airflow.sdk.exceptions import AirflowSkipException

        if not checked["retrain"]:
            raise AirflowSkipException("no retrain needed: " + ("; ".join(checked["reasons"]) or "no drift"))
        context = get_current_context()
        context["outlet_events"][INCOMING_IMAGES].extra = {
            "reason": "; ".join(checked["reasons"]),
            "monitor_run_id": checked["run_id"],
            "champion_version": checked["champion_version"],
        }
        print(f"retrain requested: {'; '.join(checked['reasons'])}")
        return str(checked["run_id"])

    request_retrain(check())


monitor()
