"""The candidate sweep: planning candidates from params.yaml, and selecting one on the validation split."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from pipelines.config import ConfigError, SweepConfig, parse_config
from pipelines.project import Project

ProjectFactory = Callable[..., Project]


def sweep(data: dict[str, Any]) -> SweepConfig:
    return SweepConfig.model_validate_json(json.dumps(data))


def test_no_sweep_is_one_default_candidate() -> None:
    assert sweep({}).plan() == [{"name": "default", "overrides": {}}], "without a sweep: one candidate, train as is"


def test_candidates_and_grid_are_planned_in_order_with_names() -> None:
    plan = sweep(
        {
            "candidates": [{"name": "sgd", "optimizer": "sgd", "learning_rate": 0.05}, {"optimizer": "adagrad"}],
            "grid": {"learning_rate": [0.001, 0.003], "architecture": ["small_cnn"]},
        }
    ).plan()
    names = [candidate["name"] for candidate in plan]
    assert names[:2] == ["sgd", "c1"], f"listed candidates first, unnamed ones numbered: {names}"
    assert plan[0]["overrides"] == {"optimizer": "sgd", "learning_rate": 0.05}, "only the settings it changes"
    grid = [candidate["overrides"] for candidate in plan[2:]]
    assert grid == [
        {"architecture": "small_cnn", "learning_rate": 0.001},
        {"architecture": "small_cnn", "learning_rate": 0.003},
    ], f"every combination of the grid: {grid}"


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"grid": {"learning_rate": [0.1, 0.2, 0.3], "epochs": [1, 2, 3]}}, "sweep.max_candidates"),
        ({"grid": {"learning_rate": []}}, "sweep"),
        ({"grid": {"dropout": [0.1]}}, "sweep.grid.dropout"),
        ({"candidates": [{"learning_rate": -1.0}]}, "sweep.candidates.0.learning_rate"),
        ({"candidates": [{"optimizer": "rmsprop"}]}, "sweep.candidates.0.optimizer"),
        ({"candidates": [{"name": "a/b"}]}, "sweep.candidates.0.name"),
    ],
)
def test_a_bad_sweep_is_refused_naming_the_key(section: dict[str, Any], key: str, tmp_path: Any) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config({"sweep": section}, tmp_path / "params.yaml")
    assert key in str(refused.value), f"the message names {key}: {refused.value}"


def test_a_candidate_overrides_train_settings_validated(tiny_project: ProjectFactory) -> None:
    from pipelines.errors import PipelineError
    from pipelines.training.train import with_train_overrides

    project = tiny_project()
    changed = with_train_overrides(project, {"optimizer": "sgd", "learning_rate": 0.05})
    assert (changed.config.train.optimizer, changed.config.train.learning_rate) == ("sgd", 0.05), "overridden"
    assert changed.config.train.epochs == project.config.train.epochs, "the rest comes from train"
    with pytest.raises((PipelineError, ValueError)):
        with_train_overrides(project, {"epochs": 0})


def log_candidate(name: str, metrics: dict[str, float]) -> str:
    import mlflow

    with mlflow.start_run(run_name=name, tags={"candidate": name}) as run:
        mlflow.log_metrics(metrics)
    return str(run.info.run_id)


def test_select_takes_the_best_validation_score_and_breaks_ties(tiny_project: ProjectFactory) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import connect
    from pipelines.training.sweep import select_candidate

    project = tiny_project()
    connect(project)
    runs = [
        log_candidate("low", {"val_accuracy": 0.90, "val_macro_f1": 0.99, "val_loss": 0.1, "test_accuracy": 1.0}),
        log_candidate("tied-worse-f1", {"val_accuracy": 0.95, "val_macro_f1": 0.90, "val_loss": 0.1}),
        log_candidate("tied-better-f1", {"val_accuracy": 0.95, "val_macro_f1": 0.94, "val_loss": 0.5}),
        log_candidate("tied-same-f1-lower-loss", {"val_accuracy": 0.95, "val_macro_f1": 0.94, "val_loss": 0.2}),
    ]
    parent = log_candidate("parent", {})
    selection = select_candidate(project, runs, parent)
    assert selection.candidate == "tied-same-f1-lower-loss", (
        f"best val_accuracy, then val_macro_f1, then lower val_loss (never the test split): {selection.ranking}"
    )
    assert [row["candidate"] for row in selection.ranking][-1] == "low", "the worst comes last"
    tags = MlflowClient().get_run(parent).data.tags
    assert tags["sweep.selected_run_id"] == selection.run_id, "the parent run records the choice"
    again = select_candidate(project, [runs[2], runs[1]])
    assert again.candidate == "tied-better-f1", "order only breaks a tie that every score leaves"
