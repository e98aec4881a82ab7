"""A candidate sweep through Airflow: mapped train task instances, one selected on validation, gated, registered."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.project import Project
from tests.support import make_source, write_params

pytestmark = pytest.mark.slow

MODEL = "sweep-classifier"
CANDIDATES = [
    {"name": "adam", "optimizer": "adam", "learning_rate": 0.01},
    {"name": "sgd-slow", "optimizer": "sgd", "learning_rate": 0.0001},
    {"name": "adagrad", "optimizer": "adagrad", "learning_rate": 0.05},
]


HOPELESS = [{"name": f"frozen-{index}", "optimizer": "sgd", "learning_rate": 1e-9, "epochs": 1} for index in (1, 2)]
"""Candidates that cannot learn anything: a learning rate of 1e-9 leaves them at chance (about 0.33)."""


def overrides(candidates: list[dict[str, Any]], min_accuracy: float = 0.0) -> dict[str, dict[str, Any]]:
    return {
        "validate": {"min_images_per_class_per_split": 2, "max_class_imbalance_ratio": 3.0},
        "train": {"epochs": 3, "per_replica_batch_size": 16},
        "sweep": {"candidates": candidates},
        "gate": {"min_accuracy": min_accuracy, "min_macro_f1": 0.0, "max_primary_drop": 1.0,
                 "max_class_recall_drop": 1.0},
        "registry": {"experiment": "sweep-retrain", "model_name": MODEL},
    }  # fmt: skip


class Sweep:
    """A project whose params.yaml holds a three-candidate sweep, and its Airflow home."""

    def __init__(self, root: Path, source: Path) -> None:
        from pipelines.platform.airflow_home import prepare

        self.root, self.source = root, source
        self.project = Project.load(write_params(root, overrides(CANDIDATES)))
        self.env = prepare(root)
        self.logs = root / "artifacts" / "logs"
        self.runs = 0

    def retrain(self) -> tuple[bool, dict[str, str]]:
        from pipelines.platform.local_airflow import dags_test, task_states

        self.runs += 1
        conf = {"source": f"folder:{self.source}", "auto_promote": False, "force": True}
        succeeded, run_id = dags_test(self.env, "retrain", self.logs / f"{self.runs:02d}-retrain.log", conf=conf)
        return succeeded, dict(task_states(self.env, "retrain", run_id))

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        from pipelines.tracking import connect

        connect(Project.load(self.root / "params.yaml"))
        return MlflowClient()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sweep]:
    base = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("MLFLOW_TRACKING_URI", "TF_CONFIG", "AIRFLOW_HOME", "MLOPS_PARAMS"):
            patch.delenv(name, raising=False)
        (base / "project").mkdir()
        yield Sweep(base / "project", make_source(base / "source", per_class=30))


def test_every_candidate_trains_as_a_mapped_task_and_the_best_on_validation_is_registered(sweep: Sweep) -> None:
    succeeded, states = sweep.retrain()
    assert succeeded, f"the sweep's retrain succeeds: {states}"
    assert [states[f"train[{index}]"] for index in range(3)] == ["success"] * 3, f"three mapped instances: {states}"
    assert states["select"] == "success", "one candidate was selected"
    client = sweep.client()
    experiment = client.get_experiment_by_name("sweep-retrain").experiment_id
    runs = client.search_runs([experiment])
    parents = [run for run in runs if "sweep.candidates" in run.data.tags]
    assert len(parents) == 1, f"one parent run: {[run.info.run_name for run in runs]}"
    parent = parents[0]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(run.data.tags["candidate"] for run in children) == sorted(c["name"] for c in CANDIDATES), (
        "every candidate is a child run of the sweep"
    )
    assert {"train.optimizer", "train.learning_rate"} <= set(children[0].data.params), (
        "children log their settings under the same names, so the MLflow UI compares them side by side"
    )
    best = max(children, key=lambda run: run.data.metrics["val_accuracy"])
    selected = parent.data.tags["sweep.selected_run_id"]
    assert client.get_run(selected).data.metrics["val_accuracy"] == best.data.metrics["val_accuracy"], (
        "the selected candidate has the best validation accuracy"
    )
    registered = client.search_model_versions(f"name = '{MODEL}'")
    assert [version.run_id for version in registered] == [selected], "only the selected candidate is registered"
    others = [run for run in children if run.info.run_id != selected]
    assert all("gate" not in run.data.tags for run in others), "the others are never gated"


def test_a_sweep_whose_candidates_all_fail_their_gate_registers_nothing(sweep: Sweep) -> None:
    write_params(sweep.root, overrides(HOPELESS, min_accuracy=0.9))
    before = len(sweep.client().search_model_versions(f"name = '{MODEL}'"))
    succeeded, states = sweep.retrain()
    assert not succeeded, "the run fails at the gate"
    assert states["gate"] == "failed", f"the selected candidate fails its gate: {states}"
    assert states["register"] == "upstream_failed", "nothing is registered"
    assert len(sweep.client().search_model_versions(f"name = '{MODEL}'")) == before, "the registry is unchanged"
