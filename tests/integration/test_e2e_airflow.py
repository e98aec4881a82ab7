"""End to end through Airflow: real ``retrain`` and ``promote`` DAG runs (``airflow dags test``) on SQLite.

One project, one Airflow home, the scenarios in order: they build on each other the way a team's week
does (first model, promotion, a second retrain, a refused promotion, a rollback, bad data).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.project import Project
from tests.support import class_image, make_source, png_bytes, write_params

pytestmark = pytest.mark.slow

OVERRIDES: dict[str, dict[str, Any]] = {
    "validate": {"min_images_per_class_per_split": 2, "max_class_imbalance_ratio": 3.0},
    "train": {"epochs": 3, "per_replica_batch_size": 16, "learning_rate": 0.01},
    "gate": {"min_accuracy": 0.0, "min_macro_f1": 0.0, "max_primary_drop": 1.0, "max_class_recall_drop": 1.0},
    "registry": {"experiment": "e2e-retrain", "model_name": "e2e-classifier"},
    "promote": {"p95_latency_budget_ms": 5000},
}


class Pipeline:
    """The project, its Airflow environment and helpers to trigger DAG runs and read MLflow."""

    def __init__(self, root: Path, source: Path) -> None:
        from pipelines.platform.airflow_home import prepare

        self.root = root
        self.source = source
        self.project = Project.load(write_params(root, OVERRIDES))
        self.env = prepare(root)
        self.logs = root / "artifacts" / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.runs = 0

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> tuple[bool, dict[str, str]]:
        from pipelines.platform.local_airflow import dags_test, task_states

        self.runs += 1
        succeeded, run_id = dags_test(self.env, dag_id, self.logs / f"{self.runs:02d}-{dag_id}.log", conf=conf)
        return succeeded, dict(task_states(self.env, dag_id, run_id))

    def retrain(self, source: Path | None = None, force: bool = False) -> tuple[bool, dict[str, str]]:
        conf = {"source": f"folder:{source or self.source}", "auto_promote": False, "force": force}
        return self.trigger("retrain", conf)

    def promote(self, version: str, reason: str, force: bool = False) -> tuple[bool, dict[str, str]]:
        return self.trigger("promote", {"version": version, "reason": reason, "force": force})

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        from pipelines.tracking import connect

        connect(self.project)
        return MlflowClient()

    def alias(self, alias: str) -> str | None:
        from pipelines.release.evaluate import champion_version

        self.client()
        if alias == "champion":
            found = champion_version("e2e-classifier")
            return str(found.version) if found is not None else None
        try:
            return str(self.client().get_model_version_by_alias("e2e-classifier", alias).version)
        except Exception:
            return None

    def experiment_id(self) -> str:
        return str(self.client().get_experiment_by_name("e2e-retrain").experiment_id)

    def log_text(self) -> str:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in sorted(self.logs.glob("*.log")))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    base = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("MLFLOW_TRACKING_URI", "TF_CONFIG", "AIRFLOW_HOME", "MLOPS_PARAMS"):
            patch.delenv(name, raising=False)
        root = base / "project"
        root.mkdir()
        yield Pipeline(root, make_source(base / "source", per_class=30))


def test_first_retrain_registers_version_one_as_challenger(pipeline: Pipeline) -> None:
    from pipelines.data.versioning import current_version

    succeeded, states = pipeline.retrain()
    assert succeeded, f"the first retrain succeeds: {states}"
    expected = ["ingest", "validate", "augment", "version", "train", "evaluate", "gate", "register"]
    assert all(states[task] == "success" for task in expected), f"every step ran as a task instance: {states}"
    assert states["auto_promote"] == "skipped", "auto_promote is off by default"
    assert pipeline.alias("challenger") == "1", "version 1 holds the challenger alias"
    assert pipeline.alias("champion") is None, "nothing is champion before a promotion"
    version = pipeline.client().get_model_version("e2e-classifier", "1")
    assert version.tags["data_version"] == current_version(pipeline.project), "the version names its data version"
    assert version.tags["airflow.dag_id"] == "retrain", "the version names its Airflow DAG"
    assert version.tags["airflow.run_id"].startswith("manual__"), f"and its Airflow run: {version.tags}"
    assert pipeline.client().get_run(version.run_id).info.status == "FINISHED", "its MLflow run is finished"


def test_promote_makes_the_challenger_champion_with_audit_tags(pipeline: Pipeline) -> None:
    succeeded, states = pipeline.promote("challenger", "first production model")
    assert succeeded, f"promotion succeeds: {states}"
    assert list(states.values()) == ["success"] * 4 + ["skipped"], (
        f"resolve, check_gate, infra_validate, set_champion; deploy skipped (no prediction service runs): {states}"
    )
    assert pipeline.alias("champion") == "1", "version 1 is champion"
    tags = pipeline.client().get_model_version("e2e-classifier", "1").tags
    assert tags["promotion_reason"] == "first production model", f"the reason is recorded: {tags}"
    assert tags["replaced_version"] == "none", "it replaced no champion"
    assert tags["promoted_by"], "who promoted it is recorded"
    assert tags["promoted_at"], "when it was promoted is recorded"


def test_second_retrain_on_unchanged_inputs_reuses_the_candidate(pipeline: Pipeline) -> None:
    from pipelines.data.versioning import current_version, list_versions

    before = current_version(pipeline.project)
    runs_before = len(pipeline.client().search_runs([pipeline.experiment_id()]))
    succeeded, states = pipeline.retrain()
    assert succeeded, f"the second retrain succeeds: {states}"
    assert current_version(pipeline.project) == before, "same data gives the same DVC version"
    assert len(list_versions(pipeline.project)) == 1, "and no new entry in the version log"
    assert "unchanged since run" in pipeline.log_text(), "the train task says it reused the earlier run"
    assert len(pipeline.client().search_runs([pipeline.experiment_id()])) == runs_before, "no new MLflow run"
    registered = pipeline.client().search_model_versions("name = 'e2e-classifier'")
    assert [str(version.version) for version in registered] == ["1"], "no new registered version"
    assert pipeline.alias("challenger") == "1", "the challenger is still version 1"


def test_forced_retrain_trains_again_and_gates_against_the_champion(pipeline: Pipeline) -> None:
    succeeded, states = pipeline.retrain(force=True)
    assert succeeded, f"the forced retrain succeeds: {states}"
    client = pipeline.client()
    latest = client.get_model_version("e2e-classifier", "2")
    run_tags = client.get_run(latest.run_id).data.tags
    assert run_tags["gate.baseline"].startswith("champion (version 1)"), f"gated against the champion: {run_tags}"
    first = client.get_run(client.get_model_version("e2e-classifier", "1").run_id).data.metrics
    assert client.get_run(latest.run_id).data.metrics["test_accuracy"] == first["test_accuracy"], (
        "training is deterministic: the same inputs give the same test accuracy in another process"
    )
    assert pipeline.alias("challenger") == "2", "the new candidate is the challenger"
    assert pipeline.alias("champion") == "1", "the champion is untouched until a promotion"


def test_promoting_a_version_whose_gate_failed_is_refused(pipeline: Pipeline) -> None:
    import mlflow

    client = pipeline.client()
    run_id = client.get_model_version("e2e-classifier", "2").run_id
    # A version registered by hand from a candidate whose gate failed.
    failed = mlflow.register_model(f"runs:/{run_id}/model", "e2e-classifier", tags={"gate": "failed"})
    succeeded, states = pipeline.promote(str(failed.version), "try the rejected one")
    assert not succeeded, "the promotion run fails"
    assert states["check_gate"] == "failed", f"it stops at check_gate: {states}"
    assert states["set_champion"] == "upstream_failed", "the alias is never moved"
    assert pipeline.alias("champion") == "1", "the champion is unchanged"
    assert "gate failed" in pipeline.log_text(), "the task log says why"


def test_rollback_restores_the_previous_champion_and_history_shows_every_change(pipeline: Pipeline) -> None:
    from pipelines.release.champion_ledger import champion_history

    assert pipeline.promote("2", "better candidate")[0], "version 2 is promoted"
    assert pipeline.alias("champion") == "2", "version 2 is champion"
    assert pipeline.promote("previous", "roll back: complaints")[0], "the rollback run succeeds"
    assert pipeline.alias("champion") == "1", "the previous champion is back"
    history = champion_history(pipeline.project)
    assert [(entry.version, entry.previous) for entry in history] == [("1", None), ("2", "1"), ("1", "2")], history
    assert history[-1].action == "rollback", "the last change is recorded as a rollback"
    assert history[-1].reason == "roll back: complaints", "with its reason"


def test_corrupt_or_invalid_data_fails_early_and_changes_nothing(pipeline: Pipeline, tmp_path: Path) -> None:
    from pipelines.data.versioning import current_version

    version_before = current_version(pipeline.project)
    versions_before = len(pipeline.client().search_model_versions("name = 'e2e-classifier'"))
    manifest_before = pipeline.project.manifest_path.read_bytes()

    corrupt = tmp_path / "corrupt"
    shutil.copytree(pipeline.source, corrupt)
    (corrupt / "a" / "broken.png").write_bytes(png_bytes(class_image(0, 4242))[:40])
    succeeded, states = pipeline.retrain(corrupt)
    assert not succeeded, "a retrain fed a corrupt image fails"
    assert states["ingest"] == "failed", f"the corrupt image is refused when it is read: {states}"
    assert states["train"] == "upstream_failed", "nothing downstream runs"

    too_few = tmp_path / "too_few"
    shutil.copytree(pipeline.source, too_few)
    for path in sorted((too_few / "c").iterdir())[2:]:
        path.unlink()
    succeeded, states = pipeline.retrain(too_few)
    assert not succeeded, "a retrain on data that fails its expectations fails"
    assert states["validate"] == "failed", f"it fails at validation: {states}"
    assert states["version"] == "upstream_failed", "the bad data is never versioned"
    assert "dataset failed validation" in pipeline.log_text(), "the log shows the failed expectations"

    assert current_version(pipeline.project) == version_before, "the data version is unchanged"
    assert pipeline.project.manifest_path.read_bytes() == manifest_before, "data/ is back at the versioned data"
    assert pipeline.alias("champion") == "1", "the champion is unchanged"
    registered = len(pipeline.client().search_model_versions("name = 'e2e-classifier'"))
    assert registered == versions_before, "nothing was registered"
