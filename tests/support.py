"""Helpers shared by the tests: tiny projects and images, folder sources, service helpers.

Test modules import from here (never from each other); ``conftest.py`` holds the fixtures.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from pipelines.data.manifest import ManifestRow, write_manifest
from pipelines.project import Project

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The repository (params.yaml, dags/, docker/)."""

TINY_CLASSES = ["a", "b", "c"]
PG = "postgres@127.0.0.1:5432"
RUN_TIMEOUT = 1200.0

TRAINING_OVERRIDES: dict[str, dict[str, Any]] = {
    "train": {"epochs": 3, "per_replica_batch_size": 16, "learning_rate": 0.01},
    "gate": {"min_accuracy": 0.0, "min_macro_f1": 0.0, "max_primary_drop": 1.0, "max_class_recall_drop": 1.0},
    "registry": {"experiment": "tiny-retrain", "model_name": "tiny-classifier"},
}

# ------------------------------------------------------------------------------------ projects and images


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


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, keyed by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def make_source(root: Path, classes: tuple[str, ...] = ("a", "b", "c"), per_class: int = 6) -> Path:
    """A folder source with one sub-folder per class of small PNGs."""
    for label_index, label in enumerate(classes):
        (root / label).mkdir(parents=True, exist_ok=True)
        for variant in range(per_class):
            (root / label / f"img{variant}.png").write_bytes(png_bytes(class_image(label_index, variant)))
    return root


def versioned_project(root: Path, overrides: dict[str, dict[str, Any]] | None = None, per_split: int = 8) -> Project:
    """A project with a tiny dataset, augmented and versioned with DVC, ready to train."""
    from pipelines.data.augment import augment_dataset
    from pipelines.data.versioning import version_data

    root.mkdir(parents=True, exist_ok=True)
    merged = {section: dict(values) for section, values in TRAINING_OVERRIDES.items()}
    for section, values in (overrides or {}).items():
        merged.setdefault(section, {}).update(values)
    project = Project.load(write_params(root, merged))
    write_tiny_dataset(project, per_class_per_split=per_split)
    augment_dataset(project)
    version_data(project, source="tiny")
    return project


# ------------------------------------------------------------------------------ services and Airflow


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return int(handle.getsockname()[1])


def wait_http(url: str, timeout: float, what: str, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what} exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status < 500:
                    return
        except urllib.error.HTTPError as error:
            if error.code < 500:
                return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{what} did not answer on {url} within {timeout:.0f} s")


@contextmanager
def postgres_databases(*purposes: str) -> Iterator[dict[str, str]]:
    """Fresh PostgreSQL databases on 127.0.0.1 (trust auth), one per purpose, dropped afterwards."""
    import psycopg2

    suffix = secrets.token_hex(4)
    names = {purpose: f"mlops_it_{purpose}_{suffix}" for purpose in purposes}
    connection = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        for name in names.values():
            cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield names
    finally:
        with connection.cursor() as cursor:
            for name in names.values():
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        connection.close()


class Api:
    """A small client of the Airflow REST API with a bearer token from the simple auth manager."""

    def __init__(self, base_url: str, airflow_home: Path) -> None:
        self.base_url = base_url
        passwords = json.loads((airflow_home / "simple_auth_manager_passwords.json.generated").read_text())
        reply = self.request("POST", "/auth/token", {"username": "admin", "password": passwords["admin"]}, auth=False)
        self.token = str(reply["access_token"])

    def request(self, method: str, path: str, body: dict[str, Any] | None = None, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def wait_for_dag(self, dag_id: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.request("GET", f"/api/v2/dags/{dag_id}")
                return
            except urllib.error.HTTPError:
                time.sleep(3)
        raise AssertionError(f"DAG {dag_id} was not parsed within {timeout:.0f} s")

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        """Trigger a run once the DAG is parsed; return its run id."""
        self.wait_for_dag(dag_id)
        created = self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
        return str(created["dag_run_id"])

    def run(self, dag_id: str, conf: dict[str, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
        """Trigger a run, wait for it to finish; return its state and its task instances by task id."""
        return self.wait_for_run(dag_id, self.trigger(dag_id, conf))

    def wait_for_run(self, dag_id: str, run_id: str) -> tuple[str, dict[str, dict[str, Any]]]:
        """Wait for a run to finish; return its state and its task instances by task id."""
        deadline = time.monotonic() + RUN_TIMEOUT
        state = "queued"
        while time.monotonic() < deadline:
            state = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in ("success", "failed"):
                break
            time.sleep(5)
        instances = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return state, {item["task_id"]: item for item in instances}
