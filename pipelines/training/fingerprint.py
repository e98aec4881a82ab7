"""What makes two trainings the same: the data version, the training code, the training parameters, the libraries.

:func:`training_fingerprint` hashes them into one value that the chief tags its MLflow run with
(``training_fingerprint``). A retrain whose fingerprint matches a finished run reuses that run instead of
training again (the same inputs give the same model: training is deterministic), so it registers nothing new.
Anything that can change the trained weights is in it: the data version (augmented copies included), the
``dataset`` and ``train`` sections of ``params.yaml`` (but not ``max_restarts``, which only says how often to
retry), every source file under ``models/`` and ``pipelines/training/``, and the TensorFlow and tf-keras versions.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from pipelines.project import Project

FINGERPRINT_TAG = "training_fingerprint"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
CODE_FOLDERS = ("models", "pipelines/training")
LIBRARIES = ("tensorflow", "tf-keras")
NOT_AFFECTING_WEIGHTS = ("max_restarts",)


def code_digests(root: Path | None = None) -> dict[str, str]:
    """sha256 of every Python and template file of the training code, keyed by its path under ``root``."""
    root = root or PACKAGE_ROOT
    digests: dict[str, str] = {}
    for folder in CODE_FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                digests[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def training_fingerprint(project: Project, data_version: str) -> str:
    """The fingerprint of training ``project``'s configuration on ``data_version`` with this code."""
    train = project.config.train.model_dump(mode="json")
    for key in NOT_AFFECTING_WEIGHTS:
        train.pop(key, None)
    payload = {
        "data_version": data_version,
        "dataset": project.config.dataset.model_dump(mode="json"),
        "train": train,
        "code": code_digests(),
        "libraries": {name: metadata.version(name) for name in LIBRARIES},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
