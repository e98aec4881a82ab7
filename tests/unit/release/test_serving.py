"""The prediction service on a real uvicorn (127.0.0.1, a free port) over a real MLflow registry.

One module-scoped registry: a tiny model trained, evaluated, gated, registered and infra-validated by the
pipeline (version 1), served by one service started before any version is champion. Later versions: the same
run registered again (a good swap target) and broken ones (a model logged before the registry's contract, a
model whose SavedModel is missing, a model that does not reproduce its logged infra batch). Request loops are
bounded in count and time; everything started is stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines.project import Project
from tests.support import REPO_ROOT, free_port, png_bytes, run_mlops, versioned_project

MODEL = "tiny-classifier"
TOKEN = secrets.token_urlsafe(24)
"""The admin token of the test service: generated per run, never written anywhere."""
SERVICE_ENV = ("MLFLOW_TRACKING_URI", "TF_CONFIG", "MLOPS_SERVE_ENDPOINTS", "MLOPS_SERVE_LOG_URI")
SERVICE_ENV += ("MLOPS_SERVE_FEEDBACK_URI", "MLOPS_SERVE_TOKEN")


@dataclass(frozen=True)
class Served:
    """The registry's project, the run behind version 1, and the running service."""

    project: Project
    run_id: str
    url: str
    root: Path


def overrides(port: int) -> dict[str, dict[str, Any]]:
    """Small limits (so every refusal is cheap to provoke) and a fast alias poll."""
    return {
        "promote": {"batch_size": 8, "latency_batches": 3, "p95_latency_budget_ms": 10_000.0, "timeout_seconds": 240},
        "ingest": {"max_file_bytes": 50_000, "max_image_pixels": 40_000},
        "serve": {
            "port": port,
            "endpoints": [f"http://127.0.0.1:{port}"],
            "poll_seconds": 0.5,
            "max_images_per_request": 16,
            "max_request_bytes": 200_000,
            "deploy_timeout_seconds": 60.0,
            "feedback_requests": 200,
            "log_rotate_seconds": 3600.0,
        },
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from pipelines.release.evaluate import evaluate_candidate, gate_candidate
    from pipelines.release.infra_check import infra_validate
    from pipelines.release.register import register_candidate
    from pipelines.release.serving.app import create_app
    from pipelines.release.serving.server import running_in_thread
    from pipelines.training.train import train

    with pytest.MonkeyPatch.context() as patch:
        for name in SERVICE_ENV:
            patch.delenv(name, raising=False)
        root = tmp_path_factory.mktemp("serving")
        port = free_port()
        project = versioned_project(root / "project", overrides(port))
        run_id = train(project, job_id="serving").run_id
        evaluate_candidate(project, run_id)
        assert gate_candidate(project, run_id).passed, "the tiny model passes its value thresholds"
        assert register_candidate(project, run_id).version == "1", "the first registered version is 1"
        assert not infra_validate(project, "1").skipped, "version 1 keeps the registry's contract"
        with running_in_thread(create_app(project, token=TOKEN), "127.0.0.1", port):
            yield Served(project, run_id, f"http://127.0.0.1:{port}", root)


# ------------------------------------------------------------------------------------------ helpers


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout:.0f} s")


def served_version(url: str) -> str | None:
    try:
        response = httpx.get(f"{url}/model", timeout=5)
    except httpx.HTTPError:
        return None
    return str(response.json()["version"]) if response.status_code == 200 else None


def champion(project: Project) -> str | None:
    from pipelines.release.evaluate import champion_version
    from pipelines.tracking import connect

    connect(project)
    found = champion_version(MODEL)
    return str(found.version) if found is not None else None


def make_champion(served: Served, version: str, *, forced: bool = False) -> None:
    """Move the alias to ``version`` (when it is not there yet) and wait until the service serves it."""
    from pipelines.release.promote import set_champion

    if champion(served.project) != version:
        set_champion(served.project, version, f"tests: serve version {version}", forced=forced)
    wait_for(lambda: served_version(served.url) == version, 60, f"the service serves version {version}")


@pytest.fixture
def good_champion(served: Served) -> str:
    """The version being served, a good one (version 1 unless a test left another good one)."""
    current = served_version(served.url)
    if current is None or champion(served.project) != current:
        make_champion(served, "1")
        current = "1"
    return current


def split_test_files(project: Project) -> tuple[list[Path], list[int]]:
    """The test split's PNGs (read from the dataset, packed or not) as files, in the order of ``load_arrays``."""
    from pipelines.training.inputs import read_images, split_files

    folder = project.root.parent / "test-images"
    images, labels = read_images(split_files(project, "test"))
    paths = [folder / f"{index:03d}.png" for index in range(len(images))]
    if not folder.is_dir():
        folder.mkdir()
        for path, data in zip(paths, images, strict=True):
            path.write_bytes(data)
    return paths, labels


def register_copy(project: Project, run_id: str) -> str:
    """Register the same run again: a new version, identical weights, tagged as gated and infra-validated."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.release.infra_check import INFRA_TAG
    from pipelines.tracking import connect

    connect(project)
    version = str(mlflow.register_model(f"runs:/{run_id}/model", MODEL).version)
    client = MlflowClient()
    client.set_model_version_tag(MODEL, version, "gate", "passed")
    client.set_model_version_tag(MODEL, version, INFRA_TAG, "passed (tests: the same run as version 1)")
    return version


def register_broken(project: Project, run_id: str, kind: str, folder: Path) -> str:
    """A version that must never serve: ``old-format``, ``missing-saved-model`` or ``wrong-predictions``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.release.evaluate import INFRA_BATCH_ARTIFACT
    from pipelines.tracking import connect

    connect(project)
    with mlflow.start_run(run_name=f"broken-{kind}") as run:
        if kind == "old-format":  # how this project logged models before the registry's contract
            from models.architectures import build_model

            network = build_model("small_cnn", (8, 8, 1), 3)
            mlflow.tensorflow.log_model(network, name="model", input_example=np.zeros((2, 8, 8, 1), dtype=np.float32))
        else:
            model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=str(folder / "m")))
            batch = Path(MlflowClient().download_artifacts(run_id, INFRA_BATCH_ARTIFACT, str(folder)))
            if kind == "missing-saved-model":
                removed = list(model_dir.rglob("saved_model.pb"))
                assert removed, f"the model folder holds a SavedModel: {sorted(model_dir.rglob('*'))}"
                for path in removed:
                    path.unlink()
            else:
                with np.load(batch) as stored:
                    images, probabilities = stored["images"], stored["probabilities"]
                np.savez_compressed(batch, images=images, probabilities=probabilities[:, ::-1])
            mlflow.log_artifacts(str(model_dir), "model")
            mlflow.log_artifact(str(batch), INFRA_BATCH_ARTIFACT.rsplit("/", 1)[0])
    return str(mlflow.register_model(f"runs:/{run.info.run_id}/model", MODEL, tags={"gate": "passed"}).version)


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample of the service's Prometheus metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        sample_name, _, sample_labels = sample.partition("{")
        found = ",".join(sorted(sample_labels.rstrip("}").split(","))) if sample_labels else ""
        if sample_name == name and found == wanted:
            return float(value)
    return 0.0


def predict_file(url: str, data: bytes, name: str = "x.png") -> httpx.Response:
    return httpx.post(f"{url}/predict", files={"image": (name, data)}, timeout=30)


def image_bytes(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


# ----------------------------------------------------------------------- no champion, then a promotion


def test_no_champion_answers_503_then_a_promotion_is_served_by_polling(served: Served) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.release.promote import set_champion
    from pipelines.release.serving.app import create_app
    from pipelines.release.serving.server import running_in_thread

    if champion(served.project) is not None:
        MlflowClient().delete_registered_model_alias(MODEL, "champion")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running_in_thread(create_app(served.project, token=None), "127.0.0.1", port):
        wait_for(
            lambda: httpx.get(f"{url}/health").json()["status"] == "no champion", 30, "the service saw no champion"
        )
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503, f"not ready without a champion: {health.text}"
        answer = predict_file(url, png_bytes(np.zeros((8, 8), dtype=np.uint8)))
        assert answer.status_code == 503, f"/predict answers 503 with no champion: {answer.text}"
        assert "no champion" in answer.json()["detail"], f"and says so: {answer.text}"
        assert httpx.get(f"{url}/model").status_code == 503, "/model has nothing to describe"
        admin = httpx.post(f"{url}/admin/deploy", headers={"Authorization": "Bearer anything"})
        assert admin.status_code == 403, f"without a configured token the admin endpoint is disabled: {admin.text}"
        assert "MLOPS_SERVE_TOKEN" in admin.json()["detail"], f"the refusal says why: {admin.text}"

        set_champion(served.project, "1", "tests: first champion")
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, 60, "the poller loaded the new champion")
        answer = predict_file(url, png_bytes(np.zeros((8, 8), dtype=np.uint8)))
        assert answer.status_code == 200, f"the promoted version answers: {answer.text}"
        assert answer.json()["model_version"] == "1", f"and names its version: {answer.json()}"
    wait_for(lambda: served_version(served.url) == "1", 60, "the module's service follows the alias too")


# -------------------------------------------------------------------------------- predictions


def test_served_predictions_equal_offline_predictions_on_the_test_split(served: Served, good_champion: str) -> None:
    from pipelines.release.evaluate import predict_probabilities
    from pipelines.training.inputs import load_arrays

    files, labels = split_test_files(served.project)
    images, _ = load_arrays(served.project, "test")
    classes = served.project.config.dataset.classes
    offline = predict_probabilities(f"models:/{MODEL}/{good_champion}", images, classes)
    served_rows: list[list[float]] = []
    for start in range(0, len(files), 16):
        chunk = files[start : start + 16]
        response = httpx.post(
            f"{served.url}/predict", files=[("image", (path.name, path.read_bytes())) for path in chunk], timeout=60
        )
        assert response.status_code == 200, f"the test images are served: {response.text}"
        document = response.json()
        assert document["model_version"] == good_champion, f"the answer names the served version: {document}"
        assert re.fullmatch(r"[0-9a-f]{32}", document["request_id"]), f"and carries a request id: {document}"
        for prediction, path in zip(document["predictions"], chunk, strict=True):
            assert prediction["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), (
                "a dataset PNG normalises to itself: the service's preprocessing is the pipeline's"
            )
            served_rows.append([prediction["probabilities"][name] for name in classes])
            best = max(prediction["probabilities"], key=prediction["probabilities"].get)
            assert prediction["class"] == best, f"the class is the most probable one: {prediction}"
    difference = float(np.abs(np.asarray(served_rows) - offline).max())
    assert difference < 1e-5, f"served probabilities equal the offline ones on the test split (max |diff| {difference})"
    assert len(served_rows) == len(labels), "one prediction per test image"

    as_json = {"images": [np.asarray(Image.open(path)).tolist() for path in files[:4]]}
    response = httpx.post(f"{served.url}/predict", json=as_json, timeout=60)
    assert response.status_code == 200, f"the same images as JSON pixel arrays are served: {response.text}"
    rows = [[item["probabilities"][name] for name in classes] for item in response.json()["predictions"]]
    assert np.abs(np.asarray(rows) - offline[:4]).max() < 1e-5, "JSON pixels give the same probabilities"
    raw = httpx.post(
        f"{served.url}/predict", content=files[0].read_bytes(), headers={"Content-Type": "image/png"}, timeout=30
    )
    assert raw.status_code == 200, f"a raw image body is served: {raw.text}"
    assert raw.json()["predictions"][0]["sha256"] == hashlib.sha256(files[0].read_bytes()).hexdigest(), "same image"


def test_model_endpoint_describes_the_served_version(served: Served, good_champion: str) -> None:
    from mlflow.tracking import MlflowClient

    document = httpx.get(f"{served.url}/model", timeout=10).json()
    registered = MlflowClient().get_model_version(MODEL, good_champion)
    assert document["version"] == good_champion, f"/model names the version: {document}"
    assert document["run_id"] == registered.run_id, f"and its run: {document}"
    assert document["data_version"] == registered.tags["data_version"], f"its data version: {document}"
    assert document["git_commit"] == registered.tags.get("git_commit", ""), f"its git commit: {document}"
    for key in ("promoted_at", "promoted_by", "promotion_reason"):
        assert document[key] == registered.tags[key], f"{key} comes from the registry: {document}"
    assert document["classes"] == ["a", "b", "c"], f"the classes it predicts: {document}"
    assert document["check_max_abs_difference"] <= 1e-4, f"it passed its infra-batch check: {document}"
    health = httpx.get(f"{served.url}/health", timeout=10)
    assert health.status_code == 200, f"ready with a model: {health.text}"
    assert health.json()["version"] == good_champion, f"/health names the version: {health.text}"


def test_concurrent_requests_are_batched(served: Served, good_champion: str) -> None:
    data = png_bytes(np.full((8, 8), 60, dtype=np.uint8))
    calls_before = metric(served.url, "mlops_serve_batch_images_count")
    images_before = metric(served.url, "mlops_serve_batch_images_sum")
    failures: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=30) as session:
            for _ in range(15):
                response = session.post(f"{served.url}/predict", files={"image": ("x.png", data)})
                if response.status_code != 200:
                    failures.append(response.text)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, f"every concurrent request is answered: {failures[:3]}"
    calls = metric(served.url, "mlops_serve_batch_images_count") - calls_before
    images = metric(served.url, "mlops_serve_batch_images_sum") - images_before
    assert images == 8 * 15, f"every image went to the model once: {images}"
    assert calls < images, f"concurrent requests share model calls: {images:.0f} images in {calls:.0f} calls"


# -------------------------------------------------------------------------------- bad input

BLACK_300 = np.zeros((300, 300), dtype=np.uint8)
NOISE_150 = np.random.default_rng(0).integers(0, 256, size=(150, 150, 3), dtype=np.uint8)
BAD_REQUESTS: dict[str, tuple[Callable[[], dict[str, Any]], int, str]] = {
    "not-an-image": (lambda: {"files": {"image": ("x.png", b"hello, not an image")}}, 422, r"not a readable image"),
    "tiff-not-in-the-allowlist": (
        lambda: {"files": {"image": ("x.tif", image_bytes(np.zeros((8, 8), np.uint8), "TIFF"))}},
        415,
        r"TIFF.*a format not in ingest\.image_formats",
    ),
    "empty-file": (lambda: {"files": {"image": ("x.png", b"")}}, 422, r"empty \(0 bytes\)"),
    "image-too-many-bytes": (
        lambda: {"files": {"image": ("x.png", png_bytes(NOISE_150))}},
        413,
        r"bytes, over ingest\.max_file_bytes=50000",
    ),
    "image-too-many-pixels": (
        lambda: {"files": {"image": ("x.png", png_bytes(BLACK_300))}},
        413,
        r"300x300 pixels, more than ingest\.max_image_pixels=40000",
    ),
    "body-too-large-by-content-length": (
        lambda: {"files": {"image": ("x.png", b"\0" * 300_000)}},
        413,
        r"over serve\.max_request_bytes=200000",
    ),
    "body-too-large-while-read": (
        lambda: {"content": iter([b"\0" * 30_000] * 10), "headers": {"Content-Type": "image/png"}},
        413,
        r"over serve\.max_request_bytes=200000",
    ),
    "too-many-images": (
        lambda: {"files": [("image", (f"{i}.png", png_bytes(np.zeros((8, 8), np.uint8)))) for i in range(17)]},
        413,
        r"at most 16|more than 16 images",
    ),
    "no-image-in-the-form": (lambda: {"files": {"note": (None, b"just text")}}, 422, r"holds no image"),
    "wrong-content-type": (
        lambda: {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
        415,
        r"Content-Type 'text/plain' is not accepted",
    ),
    "json-not-json": (
        lambda: {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
        400,
        r"not valid JSON",
    ),
    "json-deeply-nested": (
        lambda: {"content": b"[" * 100_000, "headers": {"Content-Type": "application/json"}},
        400,
        r"not valid JSON",
    ),
    "json-wrong-key": (lambda: {"json": {"pictures": []}}, 422, r'expected \{"images"'),
    "json-no-image": (lambda: {"json": {"images": []}}, 422, r"holds no image"),
    "json-ragged": (lambda: {"json": {"images": [[[1, 2], [3]]]}}, 422, r"image 0: not a rectangular array"),
    "json-strings": (lambda: {"json": {"images": [[["a"]]]}}, 422, r"image 0: not a rectangular array of numbers"),
    "json-four-dimensions": (lambda: {"json": {"images": [[[[[0]]]]]}}, 422, r"image 0: shape \[1, 1, 1, 1\]"),
    "json-two-channels": (lambda: {"json": {"images": [[[[0, 0]]]]}}, 422, r"C = 1, 3 or 4"),
    "json-out-of-range": (lambda: {"json": {"images": [[[300]]]}}, 422, r"from 0 to 255"),
    "json-fractions": (lambda: {"json": {"images": [[[0.5]]]}}, 422, r"whole numbers 0-255"),
    "json-too-many-pixels": (
        lambda: {"json": {"images": [[[0] * 210] * 200]}},
        413,
        r"210x200 pixels, more than ingest\.max_image_pixels=40000",
    ),
    "json-too-many-images": (lambda: {"json": {"images": [[[0]]] * 17}}, 413, r"at most 16"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_naming_the_problem(served: Served, good_champion: str, case: str) -> None:
    build, status, message = BAD_REQUESTS[case]
    response = httpx.post(f"{served.url}/predict", timeout=30, **build())
    assert response.status_code == status, f"{case}: expected {status}, got {response.status_code}: {response.text}"
    detail = response.json()["detail"]
    assert re.search(message, detail), f"{case}: the message names the problem: {detail!r}"


def test_bad_input_never_breaks_the_service(served: Served, good_champion: str) -> None:
    for case, (build, _, _) in BAD_REQUESTS.items():
        response = httpx.post(f"{served.url}/predict", timeout=30, **build())
        assert 400 <= response.status_code < 500, f"{case}: a client error, never a 5xx: {response.status_code}"
    assert httpx.get(f"{served.url}/health", timeout=10).status_code == 200, "the service is still ready"
    answer = predict_file(served.url, png_bytes(np.zeros((8, 8), dtype=np.uint8)))
    assert answer.status_code == 200, f"and still answers good requests: {answer.text}"
    assert metric(served.url, "mlops_serve_errors_total", kind="too_many_pixels") >= 2, "refusals are counted by kind"
    assert metric(served.url, "mlops_serve_errors_total", kind="internal") == 0, "no request hit an internal error"


def test_admin_deploy_requires_the_token(served: Served, good_champion: str) -> None:
    url = f"{served.url}/admin/deploy"
    missing = httpx.post(url, timeout=10)
    assert missing.status_code == 401, f"no token: 401: {missing.text}"
    assert missing.headers.get("www-authenticate") == "Bearer", "the 401 names the scheme"
    wrong = httpx.post(url, headers={"Authorization": f"Bearer {TOKEN}x"}, timeout=10)
    assert wrong.status_code == 401, f"a wrong token: 401: {wrong.text}"
    assert TOKEN not in wrong.text, "the refusal never echoes a token"
    right = httpx.post(url, headers={"Authorization": f"Bearer {TOKEN}"}, json={"version": good_champion}, timeout=60)
    assert right.status_code == 200, f"the right token deploys: {right.text}"
    assert right.json() == {**right.json(), "version": good_champion, "changed": False}, (
        f"nothing to change: {right.text}"
    )


# -------------------------------------------------------------------------------- swaps


def test_a_swap_under_concurrent_requests_loses_none(served: Served, good_champion: str) -> None:
    from pipelines.release.promote import set_champion
    from pipelines.release.serving.client import deploy_champion

    new = register_copy(served.project, served.run_id)
    data = png_bytes(np.full((8, 8), 90, dtype=np.uint8))
    stop = threading.Event()
    results: list[list[tuple[float, float, int, str]]] = [[] for _ in range(4)]

    def client(out: list[tuple[float, float, int, str]]) -> None:
        with httpx.Client(timeout=30) as session:
            for _ in range(400):
                if stop.is_set():
                    return
                started = time.monotonic()
                response = session.post(f"{served.url}/predict", files={"image": ("x.png", data)})
                version = response.json().get("model_version", "") if response.status_code == 200 else ""
                out.append((started, time.monotonic(), response.status_code, version))

    threads = [threading.Thread(target=client, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    swap_started = time.monotonic()
    set_champion(served.project, new, "tests: swap under load")
    report = deploy_champion(served.project, new, token=TOKEN)
    swap_done = time.monotonic()
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)

    answers = [answer for out in results for answer in out]
    failed = [answer for answer in answers if answer[2] != 200]
    assert not failed, f"no request failed during the swap: {failed[:5]}"
    assert [outcome.state for outcome in report.outcomes] in (["deployed"], ["unchanged"]), report.summary()
    for out in results:
        versions = [version for *_, version in out]
        changes = sum(1 for before, after in itertools.pairwise(versions) if before != after)
        assert changes <= 1, f"each client sees the version change at most once: {versions}"
    before = {version for started, ended, _, version in answers if ended < swap_started}
    after = {version for started, ended, _, version in answers if started > swap_done}
    assert before == {good_champion}, f"requests finished before the swap were served by {good_champion}: {before}"
    assert after == {new}, f"requests started after the deploy returned are served by {new}: {after}"
    assert served_version(served.url) == new, "the service serves the new version"


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("old-format", r"not as a pyfunc-savedmodel/1 pyfunc"),
        ("missing-saved-model", r"does not load"),
        ("wrong-predictions", r"differ from those logged at evaluation by"),
    ],
)
def test_a_broken_version_never_serves_and_deploy_fails_with_the_reason(
    served: Served, good_champion: str, kind: str, reason: str, tmp_path: Path
) -> None:
    from pipelines.release.promote import set_champion
    from pipelines.release.serving.client import DeployError, deploy_champion

    broken = register_broken(served.project, served.run_id, kind, tmp_path)
    set_champion(served.project, broken, f"tests: a broken version ({kind})", forced=True)
    with pytest.raises(DeployError, match=rf"{re.escape(served.url)} refused it: .*{reason}") as raised:
        deploy_champion(served.project, broken, token=TOKEN)
    assert f"version {broken}" in str(raised.value), f"the failure names the version: {raised.value}"
    time.sleep(1.5)  # three polls of the alias: the poller must not load it either
    document = httpx.get(f"{served.url}/model", timeout=10).json()
    assert document["version"] == good_champion, f"the old version keeps serving: {document}"
    assert re.search(reason, document["failed"][broken]), f"/model says why the new one was refused: {document}"
    answer = predict_file(served.url, png_bytes(np.zeros((8, 8), dtype=np.uint8)))
    assert answer.status_code == 200, f"requests are still answered: {answer.text}"
    assert answer.json()["model_version"] == good_champion, "by the old version"

    set_champion(served.project, good_champion, "tests: roll back from the broken version")
    rolled_back = deploy_champion(served.project, good_champion, token=None)
    assert [outcome.state for outcome in rolled_back.outcomes] == ["deployed"], rolled_back.summary()


def test_deploy_is_skipped_when_no_service_runs_unless_one_is_required(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.release.serving.client import ServicesUnreachableError, deploy_champion

    nowhere = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLOPS_SERVE_ENDPOINTS", nowhere)
    report = deploy_champion(served.project, "1", token=TOKEN)
    assert report.skipped, f"no service answers: the deploy is skipped: {report.summary()}"
    assert nowhere in report.skipped, f"and names where it looked: {report.skipped}"
    strict = replace(
        served.project,
        config=served.project.config.model_copy(
            update={"serve": served.project.config.serve.model_copy(update={"require_running": True})}
        ),
    )
    with pytest.raises(ServicesUnreachableError, match=re.escape(nowhere)):
        deploy_champion(strict, "1", token=TOKEN)
    monkeypatch.setenv("MLOPS_SERVE_ENDPOINTS", "")
    assert deploy_champion(served.project, "1").skipped, "no endpoint configured: skipped"


# -------------------------------------------------------------------------------- log and feedback


def test_requests_and_feedback_are_logged_and_opted_in_images_kept(served: Served, good_champion: str) -> None:
    from datetime import UTC, datetime, timedelta

    from pipelines.release.serving.prediction_log import read_records

    since = datetime.now(UTC) - timedelta(seconds=1)
    files, labels = split_test_files(served.project)
    response = httpx.post(
        f"{served.url}/predict", files=[("image", (path.name, path.read_bytes())) for path in files[:2]], timeout=30
    )
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    label = served.project.config.dataset.classes[labels[1]]
    kept = httpx.post(
        f"{served.url}/feedback",
        json={"request_id": request_id, "image_index": 1, "label": label, "keep_image": True},
        timeout=30,
    )
    assert kept.status_code == 200, f"feedback is accepted: {kept.text}"
    assert kept.json()["image_kept"] is True, f"and the image kept: {kept.text}"
    stored = (
        served.project.path(served.project.config.serve.feedback_uri)
        / label
        / f"{hashlib.sha256(files[1].read_bytes()).hexdigest()}.png"
    )
    assert stored.read_bytes() == files[1].read_bytes(), f"the normalised image is stored for the next ingest: {stored}"
    plain = httpx.post(f"{served.url}/feedback", json={"request_id": request_id, "image_index": 0, "label": label})
    assert plain.status_code == 200, f"feedback without keeping the image: {plain.text}"

    def logged() -> list[dict[str, Any]]:  # the log reaches the file within a second (FLUSH_SECONDS)
        records = read_records(served.project, since, 10_000).records
        found = [record for record in records if record["request_id"] == request_id]
        return found if len(found) == 3 else []

    mine = wait_for(logged, 10, "the prediction and both feedback records are in the log")
    kinds = sorted(record["kind"] for record in mine)
    assert kinds == ["feedback", "feedback", "prediction"], f"one prediction and two feedback records: {mine}"
    prediction = next(record for record in mine if record["kind"] == "prediction")
    assert prediction["model_version"] == good_champion, f"the record names the version: {prediction}"
    assert set(prediction["images"][0]) == {"sha256", "mean", "std", "class", "confidence"}, prediction
    assert len(json.dumps(prediction)) < 600, f"a bounded record, no pixels: {len(json.dumps(prediction))} bytes"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"request_id": "0" * 32, "image_index": 0, "label": "a"}, 404, r"unknown to this service"),
        (
            {"request_id": "REQUEST", "image_index": 0, "label": "zebra"},
            422,
            r"label 'zebra' is not one of the classes",
        ),
        ({"request_id": "REQUEST", "image_index": 5, "label": "a"}, 422, r"image_index 5: request .* holds 1 images"),
        ({"request_id": "REQUEST", "image_index": "0", "label": "a"}, 422, r"image_index must be an integer"),
        ({"request_id": "REQUEST", "label": "a"}, 422, r"expected \{"),
        ({"request_id": "REQUEST", "image_index": 0, "label": "a", "extra": 1}, 422, r"unknown keys \['extra'\]"),
        ("not json", 400, r"not valid JSON"),
    ],
)
def test_bad_feedback_gets_a_4xx_naming_the_problem(
    served: Served, good_champion: str, body: Any, status: int, message: str
) -> None:
    answer = predict_file(served.url, png_bytes(np.zeros((8, 8), dtype=np.uint8)))
    request_id = answer.json()["request_id"]
    if isinstance(body, dict):
        body = {key: (request_id if value == "REQUEST" else value) for key, value in body.items()}
        response = httpx.post(f"{served.url}/feedback", json=body, timeout=10)
    else:
        response = httpx.post(f"{served.url}/feedback", content=body, timeout=10)
    assert response.status_code == status, f"{body}: expected {status}: {response.status_code} {response.text}"
    assert re.search(message, response.json()["detail"]), f"the message names the problem: {response.text}"


def test_the_log_rotates_and_stays_bounded(tiny_project: Callable[..., Project]) -> None:
    from datetime import UTC, datetime, timedelta

    from pipelines.release.serving.prediction_log import PredictionLog, now_iso, read_records

    project = tiny_project({"serve": {"log_max_bytes": 2000, "log_max_files": 3}})
    since = datetime.now(UTC) - timedelta(seconds=1)
    log = PredictionLog(project)
    for number in range(200):
        log.write({"kind": "prediction", "request_id": f"r{number}", "time": now_iso(), "images": []})
    log.close()
    folder = project.path(project.config.serve.log_uri)
    files = sorted(path.name for path in folder.iterdir())
    assert len(files) <= 3, f"at most serve.log_max_files rotated files are kept: {files}"
    assert all(path.stat().st_size < 2200 for path in folder.iterdir()), "each file stops near serve.log_max_bytes"
    records = read_records(project, since, 1000).records
    assert records, "the newest records are still readable"
    assert records[-1]["request_id"] == "r199", f"the newest record is the last one written: {records[-1]}"


def test_an_s3_log_is_uploaded_on_rotation_and_read_back(
    tiny_project: Callable[..., Project], s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime, timedelta

    import boto3

    from pipelines.release.serving.prediction_log import PredictionLog, now_iso, read_records

    monkeypatch.setenv("MLOPS_SERVE_LOG_URI", "s3://mlops-data/predictions")
    project = tiny_project({"serve": {"log_max_bytes": 2000}})
    since = datetime.now(UTC) - timedelta(seconds=1)
    log = PredictionLog(project)
    for number in range(60):
        log.write({"kind": "prediction", "request_id": f"r{number}", "time": now_iso(), "images": []})
    log.close()
    listed = boto3.client("s3").list_objects_v2(Bucket="mlops-data", Prefix="predictions/").get("Contents", [])
    assert len(listed) >= 2, f"the rotated files were uploaded: {[item['Key'] for item in listed]}"
    assert not log.upload_errors, f"no upload failed: {log.upload_errors}"
    spool = project.artifacts_dir / "predictions-spool"
    assert not list(spool.glob("predictions-*.jsonl")), "uploaded files leave the local spool"
    ids = [record["request_id"] for record in read_records(project, since, 1000).records]
    assert ids == [f"r{number}" for number in range(60)], f"the monitor reads every record back, in order: {ids[:5]}"


# -------------------------------------------------------------------------------- batching unit


def test_the_batcher_groups_requests_and_refuses_beyond_its_queue() -> None:
    import pandas as pd

    from pipelines.release.serving.batching import MicroBatcher, OverloadedError
    from pipelines.release.serving.model_slot import ServedModel

    calls: list[int] = []

    class Doubling:
        def predict(self, images: np.ndarray) -> Any:
            calls.append(len(images))
            time.sleep(0.01)
            flat = images.reshape(len(images), -1)[:, :1].astype(np.float64)
            return pd.DataFrame({"a": flat[:, 0] * 2, "b": flat[:, 0] * 3})

    model = ServedModel("m", "1", "run", ("a", "b"), Doubling(), {}, "", 0.0, 0.0)

    async def scenario() -> tuple[list[np.ndarray], str]:
        batcher = MicroBatcher(max_batch_size=8, max_wait_seconds=0.005, max_queue_images=20)
        await batcher.start()
        try:
            images = [np.full((1, 2, 2, 1), index, dtype=np.float32) for index in range(20)]
            answers = await asyncio.gather(*(batcher.predict(model, image) for image in images))
            flood = [batcher.predict(model, np.zeros((3, 2, 2, 1), np.float32)) for _ in range(8)]
            outcomes = await asyncio.gather(*flood, return_exceptions=True)
            refused = [str(item) for item in outcomes if isinstance(item, OverloadedError)]
        finally:
            await batcher.stop()
        return list(answers), refused[0] if refused else ""

    answers, refusal = asyncio.run(scenario())
    for index, answer in enumerate(answers):
        assert answer.tolist() == [[2.0 * index, 3.0 * index]], f"request {index} gets its own rows: {answer}"
    assert max(calls) <= 8, f"no batch exceeds max_batch_size: {calls}"
    assert len(calls) < 20 + 8, f"requests share model calls: {calls}"
    assert "serve.max_queue_images=20" in refusal, f"beyond the queue bound a request is refused: {refusal!r}"


# -------------------------------------------------------------------------------- status and CLI


def test_status_shows_what_each_service_serves(
    served: Served, good_champion: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.release.status import collect_status, format_status

    nowhere = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLOPS_SERVE_ENDPOINTS", f"{served.url},{nowhere}")
    started = time.monotonic()
    status = collect_status(served.project)
    services = {item["endpoint"]: item for item in status["services"]}
    assert services[served.url]["state"] == "serving", f"the running service: {services}"
    assert services[served.url]["version"] == good_champion, f"and the version it serves: {services}"
    assert services[nowhere]["state"] == "not running", f"a service that is down: {services}"
    assert time.monotonic() - started < 30, "status stays quick with a service down (bounded timeout)"
    text = format_status(status)
    assert f"{served.url}  version {good_champion}" in text, f"the status text names it: {text}"
    assert f"{nowhere}  not running" in text, f"and the one that is down: {text}"


def test_mlops_predict_prints_class_confidence_and_version(served: Served, good_champion: str) -> None:
    files, _ = split_test_files(served.project)
    completed = run_mlops(served.project, "predict", str(files[0]), str(files[1]), timeout=120)
    assert completed.returncode == 0, f"mlops predict succeeds: {completed.stderr}"
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 2, f"one line per file: {completed.stdout}"
    for line, path in zip(lines, files[:2], strict=True):
        assert line.startswith(f"{path}: class "), f"the line names the file and the class: {line}"
        assert f"model version {good_champion}" in line, f"and the model version: {line}"
        assert "confidence 0." in line or "confidence 1." in line, f"and the confidence: {line}"
    missing = run_mlops(served.project, "predict", str(served.root / "missing.png"), timeout=120)
    assert missing.returncode == 1, f"a file that cannot be read fails the command: {missing.stdout}"
    assert "cannot read the file" in missing.stdout, f"naming the problem: {missing.stdout}"


# -------------------------------------------------------------------------------- Kubernetes


def render_manifests(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLOPS_SERVE_TOKEN": FAKE_SECRET, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
    return subprocess.run(
        [sys.executable, "-m", "pipelines.release.serving.kubernetes", "render", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


FAKE_SECRET = "not-in-any-manifest-5521"
K8S_ARGS = ("--image", "registry.example.com:5000/team/mlops-airflow:1.2.3", "--namespace", "ml", "--replicas", "4")


@pytest.mark.parametrize("version", ["1.33.0", "latest"])
def test_kubernetes_manifests_validate_and_gate_traffic_on_health(version: str) -> None:
    import kubernetes_validate  # type: ignore[import-untyped, unused-ignore]
    import yaml

    completed = render_manifests(*K8S_ARGS)
    assert completed.returncode == 0, f"render succeeds: {completed.stderr}"
    assert FAKE_SECRET not in completed.stdout, "no credential reaches the manifests"
    deployment, service, headless = yaml.safe_load_all(completed.stdout)
    schema_version = kubernetes_validate.latest_version() if version == "latest" else version
    for document in (deployment, service, headless):
        try:
            kubernetes_validate.validate(document, schema_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{document['kind']} {document['metadata']['name']} is not valid Kubernetes {version}: {error}")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] == 4, "the replicas asked for"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health", "traffic only once a model is ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/metrics", "a pod waiting for a champion is not killed"
    assert container["envFrom"] == [{"secretRef": {"name": "mlops-serving"}}], "credentials come from the Secret"
    assert container["command"][-5:] == ["serve", "--host", "0.0.0.0", "--port", "8000"], container["command"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, "updates never drop capacity"
    for svc in (service, headless):
        assert svc["spec"]["selector"] == pod["metadata"]["labels"], f"{svc['metadata']['name']} selects the pods"
    assert headless["spec"]["clusterIP"] == "None", "the replicas Service is headless: its name lists every pod"
    endpoint = "dns+http://mlops-serving-replicas.ml.svc.cluster.local:8000"
    assert f"MLOPS_SERVE_ENDPOINTS={endpoint}" in completed.stdout, "render says what to give the deploy task"


def test_kubernetes_render_refuses_a_password_in_the_tracking_uri() -> None:
    completed = render_manifests(*K8S_ARGS, "--tracking-uri", f"https://admin:{FAKE_SECRET}@mlflow.example.com")
    assert completed.returncode == 2, f"refused: {completed.stdout}"
    assert "--tracking-uri" in completed.stderr, f"naming the option: {completed.stderr}"
    assert "Secret" in completed.stderr, f"and where credentials belong: {completed.stderr}"


def test_endpoints_with_dns_prefix_reach_every_address_of_the_name() -> None:
    from pipelines.release.serving.client import replicas

    found = replicas("dns+http://localhost:8000")
    assert found, "localhost resolves"
    assert all(replica.host_header == "localhost:8000" for replica in found), f"the Host header is kept: {found}"
    assert {replica.url for replica in found} <= {"http://127.0.0.1:8000", "http://[::1]:8000"}, found
    plain = replicas("http://localhost:8000")
    assert [replica.url for replica in plain] == ["http://localhost:8000"], "without dns+ the URL is used as is"
