"""Evaluate and gate a candidate run against the current champion, on the same test split.

:func:`evaluate_candidate` scores the candidate (``runs:/<id>/model``) and the champion
(``models:/<name>@champion``, if any) on the test split of the data version the candidate was trained
on, compares them (McNemar's exact test, bootstrap interval of the accuracy difference), and logs
test metrics and ``evaluation/comparison.json`` to the candidate run.

:func:`gate_candidate` turns that comparison into a :class:`~pipelines.release.gate.Verdict`, stored as run
tags and ``evaluation/verdict.json``, and returns it. Steps hand each other only the run id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.errors import PipelineError
from pipelines.project import CHAMPION_ALIAS, Project
from pipelines.release.gate import Verdict, evaluate_gate
from pipelines.release.metrics import ClassificationMetrics, Comparison, compare_models

COMPARISON_ARTIFACT = "evaluation/comparison.json"
VERDICT_ARTIFACT = "evaluation/verdict.json"
INFRA_BATCH_ARTIFACT = "evaluation/infra_batch.npz"
"""Test images and the candidate's probabilities on them, for infra validation in a clean process."""


class EvaluationError(PipelineError):
    """The candidate could not be evaluated (unknown run, data version mismatch, unreadable model)."""


@dataclass(frozen=True)
class EvaluationResult:
    """Small summary of an evaluation: the run, the champion it was compared with, both accuracies."""

    run_id: str
    champion_version: str | None
    candidate_accuracy: float
    champion_accuracy: float | None
    mcnemar_p_value: float | None


def get_run(run_id: str) -> Any:
    """The MLflow run ``run_id``; an unknown id raises :class:`EvaluationError`."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as error:
        raise EvaluationError(f"run {run_id}: not found in MLflow ({error.error_code})") from None


def champion_version(model_name: str) -> Any | None:
    """The model version holding the ``champion`` alias, or None when there is none yet."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def predict_probabilities(model_uri: str, images: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    """(N, k) class probabilities of the model at ``model_uri``, loaded the way any MLflow user would."""
    import mlflow

    from pipelines.training.model_format import probabilities

    predictions = mlflow.pyfunc.load_model(model_uri).predict(np.asarray(images, dtype=np.float32))
    if hasattr(predictions, "columns"):
        return probabilities(predictions, classes)
    return np.asarray(predictions, dtype=np.float64)  # a version logged before the pyfunc contract


def _champion_metrics_from_run(run_id: str) -> ClassificationMetrics | None:
    import mlflow

    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/{COMPARISON_ARTIFACT}")
    except Exception:
        return None
    return Comparison.model_validate(json.loads(text)).candidate


def evaluate_candidate(project: Project, run_id: str) -> EvaluationResult:
    """Score candidate and champion on the candidate's test split and log the comparison to the run."""
    import mlflow

    from pipelines.data.versioning import current_version
    from pipelines.tracking import connect
    from pipelines.training.inputs import load_arrays
    from pipelines.training.reports import log_classification_artifacts

    connect(project)
    run = get_run(run_id)
    classes = project.config.dataset.classes
    data_version = run.data.tags.get("data_version", "")
    workspace = current_version(project)
    if data_version != workspace:
        raise EvaluationError(
            f"run {run_id} was trained on data version {data_version or '(none)'} but the workspace holds "
            f"{workspace or '(none)'}; restore it with `mlops data checkout {data_version}`"
        )
    champion = champion_version(project.config.registry.model_name)
    champion_label = f"version {champion.version}" if champion is not None else None
    is_champion = champion is not None and champion.run_id == run_id and "evaluated_against" in run.data.tags
    if is_champion or run.data.tags.get("evaluated_against") == (champion_label or "none"):
        against = champion_label or "no champion"
        why = "it is the champion itself" if is_champion else f"already evaluated against {against}"
        print(f"run {run_id}: {why}; reusing its evaluation")
        return _result(run_id, champion, load_comparison(run_id))
    test_x, test_y = load_arrays(project, "test")
    candidate_probabilities = predict_probabilities(f"runs:/{run_id}/model", test_x, classes)

    champion_probabilities = None
    if champion is not None:
        champion_run = get_run(champion.run_id)
        champion_classes = tuple(champion_run.data.tags.get("classes", "").split(","))
        if champion_classes == tuple(classes):
            champion_uri = f"models:/{project.config.registry.model_name}@{CHAMPION_ALIAS}"
            champion_probabilities = predict_probabilities(champion_uri, test_x, classes)
    comparison = compare_models(
        test_y, candidate_probabilities, champion_probabilities, classes, project.config.evaluate
    )
    if champion is not None and comparison.champion is None:
        # Different class sets cannot be scored on the same data: keep the champion's own metrics so the
        # gate's class-set check fails with both sets named.
        champion_metrics = _champion_metrics_from_run(champion.run_id)
        if champion_metrics is not None:
            comparison = Comparison(candidate=comparison.candidate, champion=champion_metrics)

    metrics = {f"test_{name}": value for name, value in comparison.candidate.as_flat_dict().items()}
    if comparison.champion is not None and comparison.mcnemar is not None:
        metrics["champion_test_accuracy"] = comparison.champion.accuracy
        metrics["champion_test_macro_f1"] = comparison.champion.macro_f1
        metrics["mcnemar_p_value"] = comparison.mcnemar.p_value
    if comparison.bootstrap is not None:
        metrics["accuracy_difference"] = comparison.bootstrap.mean_difference
        metrics["accuracy_difference_low"] = comparison.bootstrap.low
        metrics["accuracy_difference_high"] = comparison.bootstrap.high
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics)
        mlflow.log_dict(comparison.model_dump(mode="json"), COMPARISON_ARTIFACT)
        log_classification_artifacts(comparison.candidate, classes, prefix="test")
        _log_infra_batch(test_x, candidate_probabilities, project.config.promote.batch_size)
        mlflow.set_tag("evaluated_against", champion_label or "none")  # last: marks the evaluation complete
    return _result(run_id, champion, comparison)


def _result(run_id: str, champion: Any | None, comparison: Comparison) -> EvaluationResult:
    return EvaluationResult(
        run_id=run_id,
        champion_version=str(champion.version) if champion is not None else None,
        candidate_accuracy=comparison.candidate.accuracy,
        champion_accuracy=comparison.champion.accuracy if comparison.champion is not None else None,
        mcnemar_p_value=comparison.mcnemar.p_value if comparison.mcnemar is not None else None,
    )


def _log_infra_batch(images: np.ndarray, probabilities: np.ndarray, batch_size: int) -> None:
    """Log test images and the candidate's probabilities on them: what infra validation must reproduce.

    Stored with the run, so a version can be checked in a clean process on any host, for any data version.
    """
    import tempfile
    from pathlib import Path

    import mlflow

    count = min(len(images), max(4 * batch_size, 256))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / INFRA_BATCH_ARTIFACT.rsplit("/", 1)[-1]
        np.savez_compressed(path, images=images[:count].astype(np.float32), probabilities=probabilities[:count])
        mlflow.log_artifact(str(path), artifact_path=INFRA_BATCH_ARTIFACT.rsplit("/", 1)[0])


def load_comparison(run_id: str) -> Comparison:
    """The comparison that :func:`evaluate_candidate` logged to ``run_id``."""
    import mlflow

    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/{COMPARISON_ARTIFACT}")
    except Exception as error:
        raise EvaluationError(f"run {run_id}: no evaluation found (run `mlops evaluate` first): {error}") from None
    return Comparison.model_validate(json.loads(text))


def gate_candidate(project: Project, run_id: str) -> Verdict:
    """Judge the evaluated run against the gate thresholds; store the verdict on the run and return it."""
    import mlflow

    from pipelines.tracking import connect

    connect(project)
    get_run(run_id)
    comparison = load_comparison(run_id)
    champion = champion_version(project.config.registry.model_name) if comparison.champion is not None else None
    label = f"version {champion.version}" if champion is not None else None
    verdict = evaluate_gate(comparison.candidate, comparison.champion, project.config.gate, champion_label=label)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags(verdict.as_tags())
        mlflow.log_dict(verdict.model_dump(mode="json"), VERDICT_ARTIFACT)
    return verdict


def load_verdict(run_id: str) -> Verdict | None:
    """The verdict stored on ``run_id``, or None if it was never gated."""
    import mlflow

    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/{VERDICT_ARTIFACT}")
    except Exception:
        return None
    return Verdict.model_validate(json.loads(text))
