"""The monitor: served data against the champion's training profile and test predictions; when to retrain.

One module-scoped registry: a tiny model (its dataset's pixel profile logged with its run, as after
validation), infra-validated and promoted. Each scenario starts the real service (uvicorn in a thread) with
its own log folder, sends images with feedback labels through it, and runs :func:`monitor` on that log:
the dataset's own images (no drift), the same images inverted (1 - x: drift, a class shift, poor live
accuracy), too few images (no verdict). The checks themselves are unit-tested on plain numbers too.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines.data.profile import ClassProfile
from pipelines.project import Project
from pipelines.release.drift_checks import check_accuracy, check_classes, check_pixels, pooled
from tests.support import free_port, versioned_project

MODEL = "tiny-classifier"
MONITOR_SETTINGS: dict[str, Any] = {
    "experiment": "tiny-monitor",
    "window_hours": 1.0,
    "min_images": 20,
    "min_feedback": 10,
    "min_live_accuracy": 0.6,
    "drift_tolerance": 0.15,
    "class_p_value": 0.001,
    "min_class_distance": 0.1,
    "cooldown_hours": 24.0,
}
OVERRIDES: dict[str, dict[str, Any]] = {
    "promote": {"batch_size": 8, "latency_batches": 3, "p95_latency_budget_ms": 10_000.0, "timeout_seconds": 240},
    "serve": {"poll_seconds": 1.0},
    "monitor": MONITOR_SETTINGS,
}
SCENARIO_ENV = ("MLFLOW_TRACKING_URI", "TF_CONFIG", "MLOPS_SERVE_LOG_URI", "MLOPS_SERVE_FEEDBACK_URI")


@dataclass(frozen=True)
class Registry:
    project: Project
    run_id: str
    images: list[np.ndarray]
    """Every image of the dataset (uint8, H x W), in manifest order."""
    labels: list[str]


def write_training_profile(project: Project) -> None:
    """The dataset's per-class pixel profile next to its manifest, as validation writes it (train logs it).

    Written into ``data/``, so the data is versioned again afterwards (training checks its lineage).
    """
    from pipelines.data.manifest import read_manifest
    from pipelines.data.profile import compute_profile, measure_image, profile_path, write_profile

    limits = project.config.ingest
    rows = read_manifest(project.manifest_path)
    stats = [measure_image(project.dataset_dir, row, limits.max_image_pixels, limits.max_file_bytes) for row in rows]
    write_profile(profile_path(project), compute_profile(stats))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    from pipelines.data.manifest import read_manifest
    from pipelines.data.packs import DatasetReader
    from pipelines.data.versioning import version_data
    from pipelines.release.evaluate import evaluate_candidate, gate_candidate
    from pipelines.release.infra_check import infra_validate
    from pipelines.release.promote import set_champion
    from pipelines.release.register import register_candidate
    from pipelines.training.train import train

    with pytest.MonkeyPatch.context() as patch:
        for name in SCENARIO_ENV:
            patch.delenv(name, raising=False)
        project = versioned_project(tmp_path_factory.mktemp("monitor") / "project", OVERRIDES)
        write_training_profile(project)
        version_data(project, source="tiny")  # the profile is part of the data, as after validation
        run_id = train(project, job_id="monitor").run_id
        evaluate_candidate(project, run_id)
        assert gate_candidate(project, run_id).passed, "the tiny model passes its value thresholds"
        version = register_candidate(project, run_id).version
        assert not infra_validate(project, str(version)).skipped, "the version keeps the registry's contract"
        set_champion(project, str(version), "monitor tests")
        rows = read_manifest(project.manifest_path)
        with DatasetReader(project.dataset_dir) as reader:
            pngs = [reader.read(row.path, project.config.ingest.max_file_bytes) for row in rows]
        images = [np.asarray(Image.open(io.BytesIO(png))) for png in pngs]
        yield Registry(project, run_id, images, [row.label for row in rows])


def serve_and_label(registry: Registry, log_dir: Path, images: list[np.ndarray], labels: list[str]) -> dict[str, int]:
    """Send ``images`` through a real service logging to ``log_dir``, then feed every true label back."""
    from pipelines.release.serving.app import create_app
    from pipelines.release.serving.server import running_in_thread

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLOPS_SERVE_LOG_URI", str(log_dir))
        patch.setenv("MLOPS_SERVE_FEEDBACK_URI", str(log_dir.parent / f"{log_dir.name}-feedback"))
        with running_in_thread(create_app(registry.project), "127.0.0.1", port), httpx.Client(timeout=60) as client:
            deadline = time.monotonic() + 60
            while client.get(f"{url}/health").status_code != 200:
                assert time.monotonic() < deadline, "the service loads the champion within 60 s"
                time.sleep(0.1)
            counts = {"served": 0, "labelled": 0}
            for start in range(0, len(images), 16):
                chunk = images[start : start + 16]
                response = client.post(f"{url}/predict", json={"images": [image.tolist() for image in chunk]})
                assert response.status_code == 200, f"the service answers: {response.text}"
                request_id = response.json()["request_id"]
                counts["served"] += len(chunk)
                for index, label in enumerate(labels[start : start + 16]):
                    feedback = {"request_id": request_id, "image_index": index, "label": label}
                    answer = client.post(f"{url}/feedback", json=feedback)
                    assert answer.status_code == 200, f"feedback is accepted: {answer.text}"
                    counts["labelled"] += 1
    return counts


def run_monitor(registry: Registry, log_dir: Path) -> Any:
    from pipelines.release.monitor import monitor

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLOPS_SERVE_LOG_URI", str(log_dir))
        return monitor(registry.project)


def run_artifacts(run_id: str) -> tuple[Any, dict[str, Any], list[str]]:
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)
    report = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/monitor/report.json"))
    names = [item.path for item in client.list_artifacts(run_id, "monitor")]
    return run, report, names


# -------------------------------------------------------------------------------- scenarios


def test_in_distribution_traffic_raises_no_drift(registry: Registry, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    counts = serve_and_label(registry, tmp_path / "log", registry.images, registry.labels)
    report = run_monitor(registry, tmp_path / "log")
    assert report.served_images == counts["served"], f"every served image is in the window: {report.summary()}"
    assert report.champion_version == "1", f"the report names the champion: {report.summary()}"
    assert not report.pixels.drift, f"the dataset's own images do not drift: {report.pixels}"
    assert abs(report.pixels.mean_difference) < 0.05, f"their pixel mean matches training: {report.pixels}"
    assert report.classes.p_value is not None, f"the chi-square p-value is reported: {report.classes}"
    assert not report.classes.shifted, f"no class shift: {report.classes}"
    assert report.accuracy.labelled == counts["labelled"], f"every label is matched: {report.accuracy}"
    assert not report.accuracy.below, f"live accuracy holds: {report.accuracy}"
    assert report.retrain is False, f"no retrain requested: {report.summary()}"

    run, document, names = run_artifacts(report.run_id)
    assert run.data.tags["model_name"] == MODEL, f"the run is linked to the model: {run.data.tags}"
    assert run.data.tags["model_version"] == "1", f"and to the champion version: {run.data.tags}"
    assert run.data.tags["champion_run_id"] == registry.run_id, f"and to its run: {run.data.tags}"
    assert run.data.tags["retrain_requested"] == "false", f"the verdict is a tag: {run.data.tags}"
    assert run.data.metrics["class_p_value"] == pytest.approx(report.classes.p_value), "the p-value is a metric"
    assert "live_accuracy" in run.data.metrics, f"live accuracy is a metric: {run.data.metrics}"
    assert document["classes"]["p_value"] == pytest.approx(report.classes.p_value), "and is in the report"
    assert {"monitor/report.json", "monitor/report.png"} <= set(names), f"the report and its figure: {names}"
    tags = MlflowClient().get_model_version(MODEL, "1").tags
    assert tags["last_monitor_run"] == report.run_id, f"the version points at its last monitoring run: {tags}"


def test_inverted_digits_drift_and_request_a_retrain_once(registry: Registry, tmp_path: Path) -> None:
    inverted = [255 - image for image in registry.images]
    serve_and_label(registry, tmp_path / "log", inverted, registry.labels)
    report = run_monitor(registry, tmp_path / "log")
    assert report.pixels.drift, f"inverted images drift from the training profile: {report.pixels}"
    assert report.pixels.mean_difference > 0.3, f"their pixel mean is far above training's: {report.pixels}"
    assert report.drift_detected, f"drift is detected: {report.summary()}"
    assert report.retrain is True, f"a retrain is requested: {report.summary()}"
    assert any(reason.startswith("input drift") for reason in report.reasons), f"the reason: {report.reasons}"
    assert report.classes.p_value is not None, f"the class test ran: {report.classes}"
    assert report.accuracy.labelled == len(inverted), f"every fed-back label counts: {report.accuracy}"

    again = run_monitor(registry, tmp_path / "log")
    assert again.drift_detected, "the drift is still reported an hour later"
    assert again.retrain is False, f"but the retrain is not requested twice within the cooldown: {again.summary()}"
    assert any("cooldown" in note for note in again.notes), f"the report says why: {again.notes}"
    # The next scenario must not inherit this cooldown.
    from mlflow.tracking import MlflowClient

    MlflowClient().set_tag(report.run_id, "retrain_requested", "false (test cleanup)")


def test_too_few_images_give_no_verdict(registry: Registry, tmp_path: Path) -> None:
    inverted = [255 - image for image in registry.images[:5]]
    serve_and_label(registry, tmp_path / "log", inverted, registry.labels[:5])
    report = run_monitor(registry, tmp_path / "log")
    assert report.served_images == 5, f"five images served: {report.summary()}"
    assert not report.drift_detected, f"five images are not enough for a verdict: {report.summary()}"
    assert any("fewer than monitor.min_images" in note for note in report.notes), f"it says so: {report.notes}"


def test_an_empty_log_is_reported_as_such(registry: Registry, tmp_path: Path) -> None:
    report = run_monitor(registry, tmp_path / "nothing-here")
    assert report.served_images == 0, f"nothing served: {report.summary()}"
    assert report.retrain is False, "no retrain on no data"
    assert report.run_id, "the run is still recorded (a quiet hour is a fact too)"


# -------------------------------------------------------------------------------- the checks


def test_pooled_profile_combines_classes_by_image_count() -> None:
    profile = {"a": ClassProfile(mean=0.2, std=0.1, count=3), "b": ClassProfile(mean=0.6, std=0.1, count=1)}
    found = pooled(profile)
    assert found is not None, "a profile with images pools"
    mean, std = found
    assert mean == pytest.approx(0.3), f"the mean is weighted by image count: {mean}"
    expected = np.sqrt((3 * (0.01 + 0.04) + (0.01 + 0.36)) / 4 - 0.09)
    assert std == pytest.approx(expected), f"the std includes the spread between classes: {std}"
    assert pooled({}) is None, "an empty profile pools to nothing"


def test_pixel_check_flags_a_shift_beyond_the_tolerance() -> None:
    reference = {"a": ClassProfile(mean=0.2, std=0.3, count=10)}
    near = [{"class": "a", "mean": 0.22, "std": 0.3}] * 30
    far = [{"class": "a", "mean": 0.8, "std": 0.3}] * 30
    assert not check_pixels(near, reference, 64, 0.15, 20).drift, "a small difference is no drift"
    shifted = check_pixels(far, reference, 64, 0.15, 20)
    assert shifted.drift, f"a shift of 0.6 is drift: {shifted}"
    assert shifted.per_class["a"]["mean_difference"] == pytest.approx(0.6), f"per class too: {shifted.per_class}"
    assert not check_pixels(far[:10], reference, 64, 0.15, 20).drift, "below monitor.min_images: no verdict"


def test_class_check_is_a_chi_square_test_with_a_distance_guard() -> None:
    expected = {"a": 100, "b": 100, "c": 100}
    same = check_classes(["a"] * 33 + ["b"] * 34 + ["c"] * 33, expected, 0.001, 0.1, 20)
    assert (same.p_value or 0.0) > 0.5, f"the same shares: a high p-value: {same}"
    assert not same.shifted, "no shift"
    collapsed = check_classes(["a"] * 100, expected, 0.001, 0.1, 20)
    assert collapsed.p_value is not None, f"the test ran: {collapsed}"
    assert collapsed.p_value < 1e-10, f"one class only: a tiny p-value: {collapsed}"
    assert collapsed.distance == pytest.approx(2 / 3, abs=0.01), f"total variation distance 2/3: {collapsed}"
    assert collapsed.shifted, "a class shift"
    slight = check_classes(["a"] * 4000 + ["b"] * 3000 + ["c"] * 3000, expected, 0.001, 0.1, 20)
    assert slight.p_value is not None, f"the test ran: {slight}"
    assert slight.p_value < 0.001, f"significant with many images: {slight}"
    assert not slight.shifted, f"but a distance below monitor.min_class_distance is no shift: {slight}"


def test_accuracy_check_uses_the_last_label_of_each_image() -> None:
    predictions = {("r1", 0): "a", ("r1", 1): "b", ("r2", 0): "c"}
    feedback = [
        {"request_id": "r1", "image_index": 0, "label": "b"},
        {"request_id": "r1", "image_index": 0, "label": "a"},
        {"request_id": "r1", "image_index": 1, "label": "b"},
        {"request_id": "r2", "image_index": 0, "label": "a"},
        {"request_id": "unknown", "image_index": 0, "label": "a"},
    ]
    found = check_accuracy(predictions, feedback, 0.9, 2)
    assert (found.labelled, found.correct) == (3, 2), f"three matched labels, two right: {found}"
    assert found.below, f"2/3 is below 0.9: {found}"
    assert not check_accuracy(predictions, feedback, 0.9, 10).below, "below monitor.min_feedback: no verdict"


# -------------------------------------------------------------------------------- the next ingest


@pytest.mark.parametrize("include", [True, False])
def test_kept_feedback_images_join_the_next_ingest(tiny_project: Any, tmp_path: Path, include: bool) -> None:
    import hashlib

    from pipelines.data.ingest import ingest
    from pipelines.data.manifest import read_manifest
    from tests.support import class_image, make_source, png_bytes

    project = tiny_project(
        {"monitor": {"include_feedback": include}, "validate": {"min_images_per_class_per_split": 1}}
    )
    source = make_source(tmp_path / "source", per_class=6)
    kept = png_bytes(class_image(1, 999))
    digest = hashlib.sha256(kept).hexdigest()
    folder = project.path(project.config.serve.feedback_uri) / "b"
    folder.mkdir(parents=True)
    (folder / f"{digest}.png").write_bytes(kept)
    result = ingest(project, f"folder:{source}")
    rows = {row.sha256: row.label for row in read_manifest(project.manifest_path)}
    if include:
        assert result.images == 3 * 6 + 1, f"the source's images plus the kept one: {result}"
        assert rows.get(digest) == "b", "the fed-back image is in the dataset with its fed-back label"
    else:
        assert result.images == 3 * 6, f"monitor.include_feedback off: the source only: {result}"
        assert digest not in rows, "the fed-back image is left out"
