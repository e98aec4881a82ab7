"""Shared fixtures: a throw-away project folder with its own params.yaml and tiny generated images."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.manifest import ManifestRow, write_manifest
from pipelines.project import Project
from tests.cluster_support import free_port

TINY_CLASSES = ["a", "b", "c"]


def write_params(root: Path, overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write a params.yaml for a tiny 3-class 8x8 grayscale dataset, with section overrides."""
    params: dict[str, dict[str, Any]] = {
        "dataset": {"name": "tiny", "classes": list(TINY_CLASSES), "image_size": [8, 8], "channels": 1},
        "ingest": {"source": "sample"},
        "validate": {"min_images_per_class_per_split": 1, "max_class_imbalance_ratio": 3.0},
        "augment": {"copies": 2, "seed": 7},
        "version": {"remote": "artifacts/dvc-remote", "log": "artifacts/data_versions.jsonl"},
    }
    for section, values in (overrides or {}).items():
        params.setdefault(section, {}).update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode a uint8 array (H, W) or (H, W, C) as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def class_image(label_index: int, variant: int, size: int = 8) -> np.ndarray:
    """A deterministic grayscale image: a class-specific pattern plus a variant-specific speck."""
    rng = np.random.default_rng(1000 * label_index + variant)
    pixels = np.zeros((size, size), dtype=np.uint8)
    pixels[:, label_index % size] = 200
    pixels[label_index % size, :] = 120
    pixels += rng.integers(0, 40, size=(size, size), dtype=np.uint8)
    return pixels


@pytest.fixture
def tiny_project(tmp_path: Path) -> Callable[..., Project]:
    """Factory: ``tiny_project(overrides=None)`` writes params.yaml in a fresh folder and loads it."""

    def factory(overrides: dict[str, dict[str, Any]] | None = None) -> Project:
        root = tmp_path / "project"
        root.mkdir(exist_ok=True)
        return Project.load(write_params(root, overrides))

    return factory


def write_tiny_dataset(project: Project, per_class_per_split: int = 3) -> list[ManifestRow]:
    """Write images and a manifest straight into ``data/<name>/`` (no ingest), splits assigned in turn."""
    rows: list[ManifestRow] = []
    size = project.config.dataset.image_size[0]
    for label_index, label in enumerate(project.config.dataset.classes):
        for split_index, split in enumerate(("train", "val", "test")):
            for number in range(per_class_per_split):
                pixels = class_image(label_index, 100 * split_index + number, size)
                data = png_bytes(pixels)
                digest = hashlib.sha256(data).hexdigest()
                relative = f"images/{label}/{digest[:16]}.png"
                target = project.dataset_dir / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                rows.append(ManifestRow(relative, label, split, size, size, 1, len(data), digest))
    write_manifest(project.manifest_path, rows)
    return rows


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with a ``mlops-data`` bucket; dummy credentials in the environment."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="mlops-data")
    try:
        yield endpoint
    finally:
        server.stop()
