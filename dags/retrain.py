"""### Retrain.

Scheduled retraining of the image classifier: **ingest -> validate -> augment -> version -> train ->
evaluate -> gate -> register** (and **auto_promote** when the `auto_promote` param is on).

* Runs on the cron in `params.yaml` (`schedule.cron`, weekly by default) **or** when the
  `incoming_images` asset is updated (new data landed).
* Every task calls one function of the `pipelines` package and passes small values on (data version,
  MLflow run id, model version, verdict). Images live in `data/` (versioned by DVC), models in MLflow.
* A candidate that fails its gate fails the **gate** task with the verdict table in its log; nothing
  is registered and the champion is untouched.
* Bad data fails **validate** at once (no retries); the Great Expectations Data Docs report is under
  `artifacts/validation/`.
* With a sweep in `params.yaml` (several candidates: optimizer, learning rate, architecture...), **train**
  becomes **plan_candidates -> train (mapped, one instance per candidate, each on the training queue, a
  child MLflow run of one parent) -> select** (the best on the validation split). Without one (the default)
  it is the single **train** task.
* **train** reuses the last run trained on the same data version, training code and parameters instead of
  training again (nothing new is registered); the `force` param retrains anyway.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task

from pipelines.platform.orchestration import DEFAULT_ARGS, dag_config, load_project, run_step
from pipelines.project import DVC_POOL
from pipelines.training.backends import job_id_for_run, training_backend, training_queue

CONFIG = dag_config()
INCOMING_IMAGES = Asset(name="incoming_images", uri="mlops://incoming_images")
SCHEDULE = (
    AssetOrTimeSchedule(timetable=CronTriggerTimetable(CONFIG.schedule.cron, timezone="UTC"), assets=INCOMING_IMAGES)
    if CONFIG.schedule.cron
    else INCOMING_IMAGES
)


@dag(
    dag_id="retrain",
    doc_md=__doc__,
    schedule=SCHEDULE,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["mlops", "training", CONFIG.dataset.name],
    params={
        "source": Param(CONFIG.ingest.source, type="string", description="sample, folder:PATH or s3://bucket/prefix"),
        "auto_promote": Param(CONFIG.schedule.auto_promote, type="boolean", description="promote if the gate passes"),
        "force": Param(False, type="boolean", description="train even if data, code and params are unchanged"),
    },
)
def retrain() -> None:
    """Wire the retraining steps; each task body imports and calls one pipeline function."""

    @task(pool=DVC_POOL)
    def ingest() -> dict[str, Any]:
        from pipelines.data.ingest import ingest as ingest_step

        source = get_current_context()["params"]["source"]
        result = run_step(ingest_step, load_project(), source)
        return {"source": result.source, "images": result.images, **result.per_split}

    @task(pool=DVC_POOL, execution_timeout=timedelta(minutes=60))
    def validate(ingested: dict[str, Any]) -> dict[str, Any]:
        from pipelines.data.validate import format_report, validate_or_restore

        report = run_step(validate_or_restore, load_project())
        print(format_report(report))
        return {"images": report.images, "drift_checked": report.drift_checked}

    @task(pool=DVC_POOL)
    def augment(validated: dict[str, Any]) -> int:
        from pipelines.data.augment import augment_dataset

        return run_step(augment_dataset, load_project()).images_written

    @task(pool=DVC_POOL)
    def version(augmented: int) -> str:
        from pipelines.data.ingest import last_ingest_source
        from pipelines.data.versioning import version_data

        project = load_project()
        result = run_step(version_data, project, last_ingest_source(project))
        print(f"data version {result.version} ({'new' if result.is_new else 'unchanged'}), {result.files} files")
        return result.version

    @task
    def plan_candidates(data_version: str) -> list[dict[str, Any]]:
        from pipelines.training.sweep import plan_sweep

        candidates = run_step(plan_sweep, load_project(), data_version)
        print(f"{len(candidates)} candidate(s): {', '.join(str(candidate['name']) for candidate in candidates)}")
        return candidates

    @task(queue=training_queue(), execution_timeout=timedelta(hours=3))
    def train(data_version: str, candidate: dict[str, Any] | None = None) -> str:
        from pipelines.training.train import train as train_step

        context = get_current_context()
        project = load_project()
        job_id = job_id_for_run(context["dag"].dag_id, context["run_id"])
        result = run_step(
            train_step,
            project,
            data_version=data_version,
            workers=project.config.train.workers,
            job_id=f"{job_id}-{candidate['name']}" if candidate else job_id,
            max_restarts=project.config.train.max_restarts,
            force=bool(context["params"]["force"]),
            candidate=candidate,
        )
        return result.run_id

    @task
    def select(candidate_runs: list[str], candidates: list[dict[str, Any]]) -> str:
        from pipelines.training.sweep import select_candidate

        parent = candidates[0].get("parent_run_id") if candidates else None
        selection = run_step(select_candidate, load_project(), list(candidate_runs), parent)
        for row in selection.ranking:
            print(f"  {row['candidate']:<40} {selection.metric} {row[selection.metric]}  run {row['run_id']}")
        print(f"selected {selection.candidate} (run {selection.run_id}) on {selection.metric} = {selection.value:.4f}")
        return selection.run_id

    @task
    def evaluate(candidate_run: str) -> str:
        from pipelines.release.evaluate import evaluate_candidate

        result = run_step(evaluate_candidate, load_project(), candidate_run)
        print(f"candidate accuracy {result.candidate_accuracy:.4f}; champion {result.champion_version or 'none'}")
        return candidate_run

    @task
    def gate(candidate_run: str) -> str:
        from airflow.sdk.exceptions import AirflowFailException

        from pipelines.release.evaluate import gate_candidate

        verdict = run_step(gate_candidate, load_project(), candidate_run)
        print(verdict.format_table())
        if not verdict.passed:
            failing = ", ".join(check.name for check in verdict.failing_checks)
            raise AirflowFailException(f"GATE FAILED ({failing}): run {candidate_run} is not registered")
        return candidate_run

    @task
    def register(candidate_run: str) -> str:
        from pipelines.release.register import register_candidate

        result = run_step(register_candidate, load_project(), candidate_run)
        print(f"run {candidate_run}: {result.reason}, version {result.version}")
        return str(result.version)

    @task
    def auto_promote(model_version: str) -> str:
        from airflow.sdk.exceptions import AirflowSkipException

        from pipelines.platform.orchestration import triggering_user
        from pipelines.release.promote import promote

        context = get_current_context()
        if not context["params"]["auto_promote"]:
            raise AirflowSkipException("auto_promote is off: promote with the promote DAG")
        reason = f"auto_promote by retrain run {context['run_id']}"
        result = run_step(promote, load_project(), model_version, reason, actor=triggering_user(context))
        return result.version

    # Task outputs are XComArgs here and values when the tasks run (mypy: arg-type is off for dags/).
    ingested = ingest()
    validated = validate(ingested)
    augmented = augment(validated)
    data_version = version(augmented)
    if training_backend() == "kubernetes":
        from pipelines.training.kubernetes import kubernetes_training

        if len(CONFIG.sweep.plan()) > 1:
            raise ValueError("sweep: candidate sweeps run on the local backend (Celery queue), not on kubernetes")
        candidate_run = kubernetes_training(data_version)
    elif len(CONFIG.sweep.plan()) == 1:
        candidate_run = train(data_version)
    else:
        candidates = plan_candidates(data_version)
        candidate_runs = train.partial(data_version=data_version).expand(candidate=candidates)
        candidate_run = select(candidate_runs, candidates)
    evaluated_run = evaluate(candidate_run)
    passed_run = gate(evaluated_run)
    model_version = register(passed_run)
    auto_promote(model_version)


retrain()
