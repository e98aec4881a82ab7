"""The model half on a tiny versioned dataset: train (one process), evaluate, gate, register, in MLflow."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.errors import PipelineError
from pipelines.project import Project
from tests.support import TRAINING_OVERRIDES, versioned_project, write_params, write_tiny_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Project, Any]]:
    """One project (packed: images.zip, augmented.zip) and one finished single-process training run, shared."""
    from pipelines.training.train import train

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("TF_CONFIG", raising=False)
        project = versioned_project(tmp_path_factory.mktemp("training") / "project", packed=True)
        result = train(project, job_id="first")
        yield project, result


def client_for(project: Project) -> Any:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import connect

    connect(project)
    return MlflowClient()


def test_training_run_is_tracked_with_lineage(trained: tuple[Project, Any]) -> None:
    from pipelines.data.versioning import current_version

    project, result = trained
    client = client_for(project)
    run = client.get_run(result.run_id)
    assert result.strategy == "default", f"one CPU process uses the default strategy: {result}"
    assert result.replicas == 1, f"one replica: {result}"
    assert run.data.params["strategy"] == "default", "the strategy is a run param"
    assert run.data.params["global_batch_size"] == "16", "global batch = per-replica batch x 1 replica"
    assert run.data.params["train.epochs"] == "3", "the flattened config is logged"
    assert run.data.tags["data_version"] == current_version(project), "the run names its DVC data version"
    assert run.info.run_name.startswith(f"tiny-{current_version(project)[:8]}-"), "run name: dataset-version-time"
    assert "git_commit" in run.data.tags, "the git commit is tagged (or 'unknown' outside git)"
    history = client.get_metric_history(result.run_id, "val_accuracy")
    assert [m.step for m in history] == [0, 1, 2], f"one val_accuracy point per epoch: {history}"
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    expected = {f"tiny-{split}": current_version(project) for split in ("train", "val", "test")}
    assert inputs == expected, f"one dataset input per split with the DVC version as digest: {inputs}"
    artifacts = {item.path for item in client.list_artifacts(result.run_id)}
    assert {"training_curves.png", "val_confusion_matrix.png", "val_per_class.json"} <= artifacts, artifacts


def test_logged_model_has_signature_and_predicts(trained: tuple[Project, Any]) -> None:
    import mlflow
    import numpy as np

    from pipelines.training.inputs import load_arrays

    project, result = trained
    client_for(project)
    info = mlflow.models.get_model_info(result.model_uri)
    assert info.signature is not None, "the model is logged with a signature"
    images, _ = load_arrays(project, "test")
    predictions = mlflow.pyfunc.load_model(result.model_uri).predict(images)
    assert list(predictions.columns) == ["a", "b", "c", "class"], f"named class columns: {predictions.columns}"
    probabilities = predictions[["a", "b", "c"]].to_numpy()
    assert probabilities.shape == (len(images), 3), f"one probability per class: {probabilities.shape}"
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4), "softmax outputs sum to one"


def test_finished_job_is_not_trained_twice(trained: tuple[Project, Any]) -> None:
    from pipelines.training.train import train

    project, result = trained
    again = train(project, job_id="first")
    assert again.run_id == result.run_id, "re-running a finished job returns its run, without a new one"


def run_count(project: Project) -> int:
    client = client_for(project)
    return len(client.search_runs([client.get_experiment_by_name("tiny-retrain").experiment_id]))


def test_unchanged_data_code_and_params_reuse_the_run(trained: tuple[Project, Any]) -> None:
    from pipelines.training.train import train

    project, result = trained
    before = run_count(project)
    again = train(project, job_id="unchanged")
    assert again.reused, f"nothing changed, so the earlier run is reused: {again}"
    assert again.run_id == result.run_id, "the same run comes back"
    assert run_count(project) == before, "no new MLflow run is created"


def test_force_trains_again_and_training_is_deterministic(trained: tuple[Project, Any]) -> None:
    from pipelines.training.train import train

    project, result = trained
    before = run_count(project)
    forced = train(project, job_id="forced", force=True)
    assert not forced.reused, "force trains even though nothing changed"
    assert forced.run_id != result.run_id, "a new run"
    assert run_count(project) == before + 1, "exactly one new MLflow run"
    assert forced.weights_checksum == result.weights_checksum, "same data, code and params: the same weights"
    assert forced.val_accuracy == result.val_accuracy, "and the same metrics"


def test_changed_data_params_or_code_change_the_fingerprint(trained: tuple[Project, Any], tmp_path: Path) -> None:
    from pipelines.training import fingerprint as fingerprints
    from pipelines.training.train import cached_result

    project, result = trained
    version = result.data_version
    baseline = fingerprints.training_fingerprint(project, version)
    assert cached_result(project, baseline) is not None, "the unchanged inputs find the earlier run"

    other_data = fingerprints.training_fingerprint(project, "f" * 32)
    params = project.config.model_copy(update={"train": project.config.train.model_copy(update={"epochs": 4})})
    other_params = fingerprints.training_fingerprint(Project(project.root, params, project.params_file), version)
    copy = tmp_path / "code"
    for folder in fingerprints.CODE_FOLDERS:
        shutil.copytree(fingerprints.PACKAGE_ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    architectures = copy / "models" / "architectures.py"
    architectures.write_text(architectures.read_text(encoding="utf-8") + "\n# a changed line\n", encoding="utf-8")
    assert fingerprints.code_digests(copy) != fingerprints.code_digests(), "an edited source file changes the digests"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fingerprints, "PACKAGE_ROOT", copy)
        other_code = fingerprints.training_fingerprint(project, version)
    changed = {"data": other_data, "params": other_params, "code": other_code}
    for what, value in changed.items():
        assert value != baseline, f"changed {what} gives another fingerprint"
        assert cached_result(project, value) is None, f"changed {what}: nothing to reuse, so train() trains"
    max_restarts = project.config.model_copy(
        update={"train": project.config.train.model_copy(update={"max_restarts": 5})}
    )
    same = fingerprints.training_fingerprint(Project(project.root, max_restarts, project.params_file), version)
    assert same == baseline, "how often to retry does not change the weights, so it is not in the fingerprint"


def test_evaluate_gate_register_first_model_then_idempotent(trained: tuple[Project, Any]) -> None:
    from pipelines.release.evaluate import evaluate_candidate, gate_candidate
    from pipelines.release.register import register_candidate

    project, result = trained
    evaluation = evaluate_candidate(project, result.run_id)
    assert evaluation.champion_version is None, "no champion exists yet"
    verdict = gate_candidate(project, result.run_id)
    assert verdict.passed, f"first model passes on value thresholds: {verdict}"
    assert not verdict.has_champion, "no champion took part"
    assert "first model" in verdict.note, f"the verdict says no champion was compared: {verdict.note}"
    first = register_candidate(project, result.run_id)
    second = register_candidate(project, result.run_id)
    client = client_for(project)
    versions = client.search_model_versions("name = 'tiny-classifier'")
    assert (first.version, second.version) == ("1", "1"), "registering one run twice gives one version"
    assert len(versions) == 1, f"exactly one version in the registry: {[v.version for v in versions]}"
    version = client.get_model_version_by_alias("tiny-classifier", "challenger")
    assert str(version.version) == "1", "the new version holds the challenger alias"
    assert version.tags["run_id"] == result.run_id, "the version names its run"
    assert version.tags["data_version"] == result.data_version, "the version names its data version"
    assert version.tags["gate"] == "passed", f"the version records its verdict: {version.tags}"
    assert "git_commit" in version.tags, f"the version records the git commit: {version.tags}"
    run_tags = client.get_run(result.run_id).data.tags
    assert run_tags["gate"] == "passed", "the verdict is stored as run tags"


def test_second_run_is_gated_against_the_champion(trained: tuple[Project, Any]) -> None:
    from pipelines.release.evaluate import evaluate_candidate, gate_candidate
    from pipelines.training.train import train

    project, _ = trained
    client = client_for(project)
    client.set_registered_model_alias("tiny-classifier", "champion", "1")
    candidate = train(project, job_id="second", force=True)
    evaluation = evaluate_candidate(project, candidate.run_id)
    assert evaluation.champion_version == "1", "the candidate is compared with the champion"
    assert evaluation.mcnemar_p_value is not None, "paired statistics are computed against the champion"
    verdict = gate_candidate(project, candidate.run_id)
    names = {check.name for check in verdict.checks}
    assert verdict.has_champion, "the verdict records that a champion was compared"
    assert {"max_accuracy_drop", "max_class_recall_drop"} <= names, f"change thresholds are checked: {names}"
    comparison = json.loads(
        Path(client.download_artifacts(candidate.run_id, "evaluation/comparison.json")).read_text(encoding="utf-8")
    )
    assert comparison["bootstrap"]["low"] <= comparison["bootstrap"]["high"], "a bootstrap interval is stored"


def test_class_set_change_fails_the_gate_and_registers_nothing(trained: tuple[Project, Any], tmp_path: Path) -> None:
    from pipelines.release.evaluate import evaluate_candidate, gate_candidate
    from pipelines.release.register import register_candidate
    from pipelines.training.train import train

    project, _ = trained
    client = client_for(project)
    client.set_registered_model_alias("tiny-classifier", "champion", "1")
    before = len(client.search_model_versions("name = 'tiny-classifier'"))
    # Same tracking store, a fourth class in the data.
    other_root = tmp_path / "project"
    shutil.copytree(project.root / "artifacts" / "mlflow", other_root / "artifacts" / "mlflow")
    other = versioned_project(other_root, {"dataset": {"classes": ["a", "b", "c", "d"]}}, per_split=6)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project.root / 'artifacts' / 'mlflow' / 'mlflow.db'}")
        candidate = train(other, job_id="four-classes")
        evaluate_candidate(other, candidate.run_id)
        verdict = gate_candidate(other, candidate.run_id)
        registration = register_candidate(other, candidate.run_id)
    assert not verdict.passed, "a different class set fails the gate"
    assert any(c.name == "class_set" and not c.passed for c in verdict.checks), f"the reason is named: {verdict}"
    assert not registration.registered, "a failed candidate is not registered"
    assert len(client.search_model_versions("name = 'tiny-classifier'")) == before, "the registry is unchanged"
    assert client.get_run(candidate.run_id).data.tags["gate"] == "failed", "the run is tagged gate=failed"


def test_inputs_read_packed_and_loose_datasets_alike_and_only_their_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from pipelines.data.packs import DatasetReader
    from pipelines.training.inputs import load_arrays, make_dataset, split_files

    projects = {}
    for layout in ("loose", "packed"):
        (tmp_path / layout).mkdir()
        projects[layout] = Project.load(write_params(tmp_path / layout))
        write_tiny_dataset(projects[layout], packed=layout == "packed")
    assert (projects["packed"].dataset_dir / "images.zip").is_file(), "one dataset is packed"
    assert (projects["loose"].dataset_dir / "images").is_dir(), "the other is loose, as versions before packs"
    loose_x, loose_y = load_arrays(projects["loose"], "val")
    packed_x, packed_y = load_arrays(projects["packed"], "val")
    assert np.array_equal(loose_x, packed_x), "load_arrays decodes the same pixels from either layout"
    assert np.array_equal(loose_y, packed_y), "and the same labels"

    read: list[str] = []
    real = DatasetReader.read

    def recording(self: DatasetReader, path: str, limit_bytes: int) -> bytes:
        read.append(path)
        return real(self, path, limit_bytes)

    monkeypatch.setattr(DatasetReader, "read", recording)
    batches = {}
    for layout, project in projects.items():
        files = split_files(project, "train")
        read.clear()
        dataset = make_dataset(files, channels=1, batch_size=4, training=False, seed=0, num_shards=2, shard_index=0)
        assert read == list(files.paths[0::2]), f"{layout}: only this worker's shard is read, in order: {read}"
        batches[layout] = [(x.numpy(), y.numpy()) for x, y in dataset]
    assert len(batches["packed"]) == len(batches["loose"]) == 2, "5 images of the shard in batches of 4"
    for (loose_batch, loose_labels), (packed_batch, packed_labels) in zip(
        batches["loose"], batches["packed"], strict=True
    ):
        assert np.array_equal(loose_batch, packed_batch), "make_dataset gives the same pixels from either layout"
        assert np.array_equal(loose_labels, packed_labels), "and the same labels"


def test_unknown_data_version_is_refused(trained: tuple[Project, Any]) -> None:
    from pipelines.training.train import train

    project, _ = trained
    with pytest.raises(PipelineError, match=r"0{32}"):
        train(project, data_version="0" * 32, job_id="unknown-version")


def test_manifest_without_train_rows_is_refused(tmp_path: Path) -> None:
    from pipelines.data.manifest import read_manifest, write_manifest
    from pipelines.data.versioning import version_data
    from pipelines.training.train import train

    project = Project.load(write_params(tmp_path, TRAINING_OVERRIDES))
    rows = [row for row in write_tiny_dataset(project) if row.split != "train"]
    write_manifest(project.manifest_path, rows)
    version_data(project)
    assert all(row.split != "train" for row in read_manifest(project.manifest_path)), "no train rows left"
    with pytest.raises(PipelineError, match="no train rows"):
        train(project)


def test_unreachable_tracking_server_is_retried_then_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.tracking import TrackingError, connect

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLOPS_TRACKING_ATTEMPTS", "3")
    monkeypatch.setenv("MLOPS_TRACKING_BASE_DELAY", "0.05")
    project = Project.load(write_params(tmp_path))
    with pytest.raises(TrackingError, match=r"unreachable .* \(3 attempts\)"):
        connect(project)


REGISTER_ON_ANOTHER_HOST = """
import sys, time
from pathlib import Path
from pipelines.project import Project
from pipelines.release.register import register_candidate
project = Project.load(Path(sys.argv[1]))
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
print(register_candidate(project, sys.argv[2]).version)
"""


def test_two_hosts_registering_one_run_leave_one_version(trained: tuple[Project, Any], tmp_path: Path) -> None:
    """Separate project roots (no shared file lock), one tracking store, the same run registered at once."""
    import os
    import subprocess
    import sys
    import time

    from pipelines.release.register import versions_of_run
    from pipelines.tracking import tracking_uri
    from pipelines.training.train import train

    project, _ = trained
    run_id = train(project, job_id="register-race", force=True).run_id
    client = client_for(project)
    client.set_tag(run_id, "gate", "passed")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(project)}
    start_at = time.time() + 8.0
    hosts = []
    for host in ("host-a", "host-b"):
        root = tmp_path / host
        root.mkdir()
        shutil.copy(project.root / "params.yaml", root / "params.yaml")
        command = [sys.executable, "-c", REGISTER_ON_ANOTHER_HOST, str(root / "params.yaml"), run_id, str(start_at)]
        hosts.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [host.communicate(timeout=180) for host in hosts]
    assert [host.returncode for host in hosts] == [0, 0], f"both registrations complete: {outputs}"
    versions = versions_of_run(client, "tiny-classifier", run_id)
    assert len(versions) == 1, f"one version for the run, whatever the interleaving: {[v.version for v in versions]}"
    answered = {output.strip().splitlines()[-1] for output, _ in outputs}
    assert answered == {str(versions[0].version)}, f"both hosts report the version that stayed: {outputs}"
