"""The registry's contract: a registered model loads and serves with MLflow's own tools, outside this project.

One module-scoped registry: a tiny model trained, evaluated, gated and registered by the pipeline, then
infra-validated and promoted for real. Every consumer here runs in a scrubbed environment (no
``TF_USE_LEGACY_KERAS``, no ``MLOPS_*``, Python in isolated mode), as a user of the registry would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.errors import PromotionError
from pipelines.project import Project
from tests.support import free_port, versioned_project, wait_http

MODEL = "tiny-classifier"
OVERRIDES: dict[str, dict[str, Any]] = {
    "promote": {"batch_size": 8, "latency_batches": 3, "p95_latency_budget_ms": 10_000.0, "timeout_seconds": 240},
}


@dataclass(frozen=True)
class Registry:
    project: Project
    run_id: str
    tracking_uri: str
    batch: Path
    """The infra batch logged at evaluation: test images and the pipeline's probabilities for them."""


def scrubbed_env(tracking_uri: str, home: Path) -> dict[str, str]:
    """What a user of the registry has: a PATH with this Python's tools, a home, the tracking URI."""
    return {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
        "HOME": str(home),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    from mlflow.tracking import MlflowClient

    from pipelines.release.evaluate import INFRA_BATCH_ARTIFACT, evaluate_candidate, gate_candidate
    from pipelines.release.infra_check import infra_validate
    from pipelines.release.promote import set_champion
    from pipelines.release.register import register_candidate
    from pipelines.tracking import connect, tracking_uri
    from pipelines.training.train import train

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("TF_CONFIG", raising=False)
        root = tmp_path_factory.mktemp("contract")
        project = versioned_project(root / "project", OVERRIDES)
        run_id = train(project, job_id="contract").run_id
        evaluate_candidate(project, run_id)
        assert gate_candidate(project, run_id).passed, "the tiny model passes its value thresholds"
        version = register_candidate(project, run_id).version
        assert version == "1", f"the first registered version is 1: {version}"
        report = infra_validate(project, "1")
        assert not report.skipped, f"a version logged by the pipeline keeps the contract: {report}"
        set_champion(project, "1", "contract tests")
        connect(project)
        batch = Path(MlflowClient().download_artifacts(run_id, INFRA_BATCH_ARTIFACT, str(root)))
        yield Registry(project, run_id, tracking_uri(project), batch)


def test_infra_validation_records_the_clean_process_check(registry: Registry) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.release.infra_check import INFRA_TAG

    tag = MlflowClient().get_model_version(MODEL, "1").tags.get(INFRA_TAG, "")
    assert tag.startswith("passed"), f"the version carries the validation's verdict: {tag!r}"
    assert "clean-process load" in tag, f"the tag says how long the clean load took: {tag!r}"
    assert "p95" in tag, f"the tag says the measured latency: {tag!r}"


def test_champion_loads_in_a_scrubbed_process_and_reproduces_the_evaluation(registry: Registry, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json, mlflow, numpy as np
        model = mlflow.pyfunc.load_model("models:/{MODEL}@champion")
        with np.load({str(registry.batch)!r}) as stored:
            images, expected = stored["images"], stored["probabilities"]
        frame = model.predict(images)
        classes = [column for column in frame.columns if column != "class"]
        actual = frame[classes].to_numpy()
        print(json.dumps({{
            "classes": classes,
            "max_difference": float(np.abs(actual - expected).max()),
            "same_predictions": bool((actual.argmax(1) == expected.argmax(1)).all()),
            "class_column_matches": bool((frame["class"].to_numpy() == np.asarray(classes)[actual.argmax(1)]).all()),
        }}))
        """
    )
    completed = subprocess.run(
        [sys.executable, "-I", "-c", script],
        env=scrubbed_env(registry.tracking_uri, tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, f"mlflow.pyfunc.load_model works with no project variable: {completed.stderr}"
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["classes"] == ["a", "b", "c"], f"the output names the classes: {result}"
    assert result["max_difference"] < 1e-5, f"the same probabilities as the pipeline's evaluation: {result}"
    assert result["same_predictions"], "the same predicted class for every test image"
    assert result["class_column_matches"], "the 'class' column is the most probable class"


def test_mlflow_models_serve_answers_a_request_built_from_the_input_example(registry: Registry, tmp_path: Path) -> None:
    import mlflow

    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion", dst_path=str(tmp_path / "m")))
    request_body = (model_dir / "serving_input_example.json").read_bytes()
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
    ]  # fmt: skip
    log = (tmp_path / "serve.log").open("w+b")
    server = subprocess.Popen(
        command, env=scrubbed_env(registry.tracking_uri, tmp_path), cwd=tmp_path, stdout=log, stderr=log,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, "mlflow models serve", server)  # type: ignore[arg-type]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=request_body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            status, payload = response.status, json.loads(response.read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.seek(0)
        server_log = log.read().decode(errors="replace")[-2000:]
        log.close()
    assert status == 200, f"the scoring server answers: {server_log}"
    predictions = payload["predictions"]
    examples = len(json.loads(request_body)["inputs"])
    assert len(predictions) == examples, f"one prediction per example image: {payload}"
    assert set(predictions[0]) == {"a", "b", "c", "class"}, f"probabilities per class and the class: {predictions[0]}"
    assert abs(sum(predictions[0][name] for name in "abc") - 1.0) < 1e-4, "the probabilities add up to 1"


def log_old_format_version(project: Project) -> str:
    """A version logged the way this project did before the contract: ``mlflow.tensorflow`` of a tf-keras model."""
    import mlflow

    from models.architectures import build_model
    from pipelines.tracking import connect

    connect(project)
    network = build_model("small_cnn", (8, 8, 1), 3)
    example = np.zeros((2, 8, 8, 1), dtype=np.float32)
    with mlflow.start_run(run_name="old-format") as run:
        mlflow.tensorflow.log_model(network, name="model", input_example=example)
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", MODEL, tags={"gate": "passed"})
    return str(version.version)


def test_a_model_that_loads_only_with_a_project_variable_is_refused(registry: Registry, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.release import consumer_check
    from pipelines.release.infra_check import INFRA_TAG, infra_validate
    from pipelines.release.status import collect_status

    old = log_old_format_version(registry.project)
    with pytest.raises(PromotionError, match=r"loads only inside this project .*refusing to promote it"):
        infra_validate(registry.project, old)
    status = collect_status(registry.project)
    assert [item["version"] for item in status["outside_contract"]] == [old], f"status names it: {status}"

    # The clean-process check itself fails on it, not only the metadata check in front of it.
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-I", consumer_check.__file__, "--model-uri", f"models:/{MODEL}/{old}",
         "--batch", str(registry.batch), "--batch-size", "4", "--latency-batches", "2", "--budget-ms", "10000"],
        env=scrubbed_env(registry.tracking_uri, tmp_path), cwd=tmp_path, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert completed.returncode == 1, f"the clean process refuses it ({time.monotonic() - started:.0f} s)"
    assert "does not load in a clean process" in completed.stderr, f"with the reason: {completed.stderr[-500:]}"

    forced = infra_validate(registry.project, old, force=True)
    assert forced.skipped, f"forcing skips the load and says why: {forced}"
    tag = MlflowClient().get_model_version(MODEL, old).tags[INFRA_TAG]
    assert tag.startswith("skipped (forced)"), f"the forced skip is recorded on the version: {tag!r}"
