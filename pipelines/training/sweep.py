"""A candidate sweep: several models trained side by side, the best on the VALIDATION split going on.

:func:`plan_sweep` turns ``sweep`` in ``params.yaml`` into candidates (each a name and the ``train`` settings
it changes) and, when there are several, opens one MLflow parent run whose children they become, so the
MLflow UI shows them side by side with the same parameter and metric names (``train.learning_rate``,
``val_accuracy``...). The retrain DAG maps its ``train`` task over the candidates, each on the training queue.
:func:`select_candidate` then picks one on the validation split (never the test split, which stays unseen
until the gate): the highest ``sweep.select_metric``; ties go to the higher ``val_macro_f1``, then the lower
``val_loss``, then the earlier candidate in the plan. It records the choice on the parent run. Only the
selected run is evaluated, gated and registered. With a single candidate (the default) there is no parent
run and the candidate is the run the retrain has always made.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipelines.errors import PipelineError
from pipelines.project import Project

TIE_BREAKS = ("val_macro_f1", "val_loss")


@dataclass(frozen=True)
class Selection:
    """The chosen run, why, and every candidate's validation scores (small: it travels as an XCom)."""

    run_id: str
    candidate: str
    metric: str
    value: float
    ranking: list[dict[str, Any]]


def plan_sweep(project: Project, data_version: str) -> list[dict[str, Any]]:
    """The candidates to train; with several, also the MLflow parent run they are children of."""
    import mlflow

    from pipelines.tracking import connect, with_retries

    candidates = project.config.sweep.plan()
    if len(candidates) == 1:
        return [{**candidates[0], "parent_run_id": None}]
    connect(project)
    name = f"{project.config.dataset.name}-{data_version[:8]}-sweep-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    parent = with_retries(lambda: mlflow.start_run(run_name=name), "open the sweep's parent run")
    try:
        mlflow.set_tags({"data_version": data_version, "sweep.candidates": str(len(candidates))})
        mlflow.log_dict({"candidates": candidates}, "sweep/plan.json")
    finally:
        mlflow.end_run()
    return [{**candidate, "parent_run_id": parent.info.run_id} for candidate in candidates]


def _score(metrics: dict[str, Any], name: str) -> float:
    value = metrics.get(name)
    return float(value) if value is not None and math.isfinite(value) else -math.inf


def select_candidate(project: Project, run_ids: Sequence[str], parent_run_id: str | None = None) -> Selection:
    """The candidate run with the best validation score (see the module docstring for the tie-breaks)."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import connect

    if not run_ids:
        raise PipelineError("sweep: no candidate finished training; nothing to select")
    connect(project)
    client = MlflowClient()
    metric = project.config.sweep.select_metric
    ranking: list[dict[str, Any]] = []
    for order, run_id in enumerate(run_ids):
        run = client.get_run(run_id)
        metrics = dict(run.data.metrics)
        ranking.append(
            {
                "run_id": run_id,
                "candidate": run.data.tags.get("candidate", "default"),
                "order": order,
                metric: metrics.get(metric),
                **{name: metrics.get(name) for name in TIE_BREAKS},
            }
        )

    def rank(row: dict[str, Any]) -> tuple[float, float, float, int]:
        loss = row.get("val_loss")
        lower_loss = float(loss) if loss is not None and math.isfinite(loss) else math.inf
        return (-_score(row, metric), -_score(row, "val_macro_f1"), lower_loss, int(row["order"]))

    ranking.sort(key=rank)
    best = ranking[0]
    if best[metric] is None:
        raise PipelineError(f"sweep: no candidate logged {metric}; cannot select one")
    selection = Selection(best["run_id"], best["candidate"], metric, float(best[metric]), ranking)
    if parent_run_id:
        client.set_tag(parent_run_id, "sweep.selected_run_id", selection.run_id)
        client.set_tag(parent_run_id, "sweep.selected_candidate", selection.candidate)
        client.log_metric(parent_run_id, f"best_{metric}", selection.value)
        record = {"metric": metric, "tie_breaks": TIE_BREAKS, "ranking": ranking}
        client.log_dict(parent_run_id, record, "sweep/selection.json")
    return selection
