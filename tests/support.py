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


def write_tiny_dataset(project: Project, per_class_per_split: int = 3, packed: bool = False) -> list[ManifestRow]:
    """Write images and a manifest straight into ``data/<name>/`` (no ingest), splits assigned in turn.

    The images are loose files (``images/<label>/<sha16>.png``, the layout of versions before packs), or,
    with ``packed``, the members of ``images.zip`` as ingest writes them.
    """
    from pipelines.data.packs import pack_path, write_pack

    rows: list[ManifestRow] = []
    members: list[tuple[str, bytes]] = []
    size = project.config.dataset.image_size[0]
    for label_index, label in enumerate(project.config.dataset.classes):
        for split_index, split in enumerate(("train", "val", "test")):
            for number in range(per_class_per_split):
                pixels = class_image(label_index, 100 * split_index + number, size)
                data = png_bytes(pixels)
                digest = hashlib.sha256(data).hexdigest()
                relative = f"images/{label}/{digest[:16]}.png"
                if packed:
                    members.append((relative, data))
                else:
                    target = project.dataset_dir / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                rows.append(ManifestRow(relative, label, split, size, size, 1, len(data), digest))
    if packed:
        project.dataset_dir.mkdir(parents=True, exist_ok=True)
        write_pack(pack_path(project.dataset_dir, "images"), members)
    write_manifest(project.manifest_path, rows)
    return rows


def read_image(project: Project, path: str) -> bytes:
    """The bytes of the dataset image at manifest path ``path``, from its pack or loose file (the pipeline's reader)."""
    from pipelines.data.packs import DatasetReader

    with DatasetReader(project.dataset_dir) as reader:
        return reader.read(path, project.config.ingest.max_file_bytes)


def image_pixels(project: Project, path: str) -> np.ndarray:
    """The decoded pixels (uint8) of the dataset image at manifest path ``path``."""
    with Image.open(io.BytesIO(read_image(project, path))) as image:
        return np.asarray(image).copy()


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


def versioned_project(
    root: Path, overrides: dict[str, dict[str, Any]] | None = None, per_split: int = 8, packed: bool = False
) -> Project:
    """A project with a tiny dataset, augmented and versioned with DVC, ready to train.

    The original images are loose files (a version from before packs) or, with ``packed``, ``images.zip``.
    """
    from pipelines.data.augment import augment_dataset
    from pipelines.data.versioning import version_data

    root.mkdir(parents=True, exist_ok=True)
    merged = {section: dict(values) for section, values in TRAINING_OVERRIDES.items()}
    for section, values in (overrides or {}).items():
        merged.setdefault(section, {}).update(values)
    project = Project.load(write_params(root, merged))
    write_tiny_dataset(project, per_class_per_split=per_split, packed=packed)
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


# ------------------------------------------------------------------------------------ hostile input


def protected_state(project: Project) -> dict[str, str]:
    """sha256 of everything a refused or failed step must leave as it was, keyed by path under the root.

    The versioned data (``data/``), ``data.dvc``, the version log and the local MLflow store (registry).
    """
    state: dict[str, str] = {}
    for top in (
        project.data_dir,
        project.root / "data.dvc",
        project.path(project.config.version.log),
        project.mlflow_dir,
    ):
        files = [top] if top.is_file() else sorted(path for path in top.rglob("*") if path.is_file())
        for path in files:
            state[str(path.relative_to(project.root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def staging_leftovers(project: Project) -> list[str]:
    """Whatever is left under ``artifacts/staging`` and hidden inside the dataset folder."""
    left = sorted(str(path) for path in project.staging_dir.rglob("*")) if project.staging_dir.exists() else []
    if project.dataset_dir.exists():
        left += sorted(str(path) for path in project.dataset_dir.iterdir() if path.name.startswith("."))
    return left


def run_mlops(project: Project, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``mlops --params <project> ARGS`` in a fresh process (killed after ``timeout`` seconds)."""
    import sys

    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "--params", str(project.params_path), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


_KILLED_RUN = """
import os, signal, sys
from pipelines.cli import main
from pipelines.data.staging import StagingArea

from pipelines.data.packs import PackWriter

after_writes, after_replace_to = int(sys.argv[1]), sys.argv[2]
real_write, real_add, real_replace, writes = StagingArea.write, PackWriter.add, os.replace, [0]

def counted():
    writes[0] += 1
    if after_writes and writes[0] > after_writes:
        os.kill(os.getpid(), signal.SIGKILL)

def write(self, path, data):
    counted()
    real_write(self, path, data)

def add(self, name, data):
    counted()
    real_add(self, name, data)

def replace(source, target, **options):
    real_replace(source, target, **options)
    if after_replace_to and os.fspath(target).endswith(after_replace_to):
        os.kill(os.getpid(), signal.SIGKILL)

StagingArea.write, PackWriter.add, os.replace = write, add, replace
sys.exit(main(sys.argv[3:]))
"""


def run_mlops_killed(
    project: Project, *args: str, after_writes: int = 0, after_replace_to: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run ``mlops ARGS`` in a fresh process that SIGKILLs itself mid-run.

    ``after_writes``: once that many staged files or pack members are written; ``after_replace_to``: right
    after a rename onto a path ending so (in the middle of publishing the staged output).
    """
    import sys

    return subprocess.run(
        [
            sys.executable,
            "-c",
            _KILLED_RUN,
            str(after_writes),
            after_replace_to,
            "--params",
            str(project.params_path),
            *args,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def manifest_matches_files(dataset_dir: Path, manifest: Path) -> list[str]:
    """Differences between a manifest and the images it lists (empty when every row matches its image).

    Images are read through the pipeline's reader (the pack, or the loose files when there is none); an image
    of the pack, or a file of the folder, that the manifest does not list is a difference too.
    """
    from pipelines.data.manifest import read_manifest
    from pipelines.data.packs import DatasetReader, DatasetReadError

    problems = []
    rows = read_manifest(manifest)
    with DatasetReader(dataset_dir) as reader:
        for row in rows:
            try:
                data = reader.read(row.path, 1 << 30)
            except DatasetReadError as error:
                problems.append(f"{row.path}: listed, cannot be read ({error.reason})")
                continue
            if hashlib.sha256(data).hexdigest() != row.sha256:
                problems.append(f"{row.path}: sha256 differs from the manifest")
        listed = {row.path for row in rows}
        kind = rows[0].path.split("/")[0] if rows else ""
        folder = dataset_dir / kind
        try:
            members = reader.members(kind)
        except DatasetReadError as error:
            problems.append(f"{error}")
            members = []
        if members is not None:
            present = members
        elif rows and folder.is_dir():
            present = [path.relative_to(dataset_dir).as_posix() for path in folder.rglob("*") if path.is_file()]
        else:
            present = []
    problems.extend(f"{name}: image not in the manifest" for name in sorted(set(present) - listed))
    return problems
