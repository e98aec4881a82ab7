"""Where a project's files live, and the names the stages share.

:class:`Project` is the root folder (the one holding ``params.yaml``), its loaded configuration and every
path derived from both. The module-level constants are the names more than one stage uses (MLflow aliases,
the Airflow pool of the DVC workspace, file names), so each has exactly one home.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.config import Config, default_params_path, load_config

MANIFEST_NAME = "manifest.csv"
AUGMENTED_MANIFEST_NAME = "augmented.csv"

CHAMPION_ALIAS = "champion"
"""The registered model version that serves production."""
CHALLENGER_ALIAS = "challenger"
"""The last registered version that passed its gate, waiting for promotion."""
DVC_POOL = "dvc"
"""One-slot Airflow pool: the tasks that change the DVC-tracked workspace never overlap."""


@dataclass(frozen=True)
class Project:
    """A project root (the folder holding ``params.yaml``) and its loaded configuration."""

    root: Path
    config: Config
    params_file: Path | None = None

    @classmethod
    def load(cls, params_path: Path | None = None) -> Project:
        """Load ``params_path`` (default: ``$MLOPS_PARAMS`` or ``./params.yaml``); its folder is the root."""
        path = (Path(params_path) if params_path is not None else default_params_path()).resolve()
        return cls(root=path.parent, config=load_config(path), params_file=path)

    @property
    def params_path(self) -> Path:
        """The configuration file this project was loaded from (for steps that run in a fresh process)."""
        return self.params_file or self.root / "params.yaml"

    def path(self, configured: str) -> Path:
        """A configured path: absolute as given, otherwise relative to the project root."""
        candidate = Path(configured)
        return candidate if candidate.is_absolute() else self.root / candidate

    @property
    def artifacts_dir(self) -> Path:
        """``artifacts/``: everything the pipeline writes that is not versioned data (kept out of git)."""
        return self.root / "artifacts"

    @property
    def staging_dir(self) -> Path:
        """Where steps stage their output before renaming it into place."""
        return self.artifacts_dir / "staging"

    @property
    def logs_dir(self) -> Path:
        """Logs of ``make run``, ``make ui`` and the services they start."""
        return self.artifacts_dir / "logs"

    @property
    def training_dir(self) -> Path:
        """One folder per training job (checkpoints, progress, result)."""
        return self.artifacts_dir / "training"

    @property
    def mlflow_dir(self) -> Path:
        """The project-local MLflow store used when no tracking server is configured."""
        return self.artifacts_dir / "mlflow"

    @property
    def registry_lock_path(self) -> Path:
        """Lock serialising check-then-write registry changes on this host."""
        return self.artifacts_dir / "registry.lock"

    @property
    def last_ingest_path(self) -> Path:
        """What the last ingest read (its source), for the version log."""
        return self.artifacts_dir / "last_ingest.json"

    @property
    def last_train_path(self) -> Path:
        """The last finished training job's result (the CLI's default run id)."""
        return self.artifacts_dir / "last_train.json"

    @property
    def data_dir(self) -> Path:
        """``data/``: the folder DVC versions as a whole (``data.dvc``)."""
        return self.root / "data"

    @property
    def dataset_dir(self) -> Path:
        """``data/<dataset name>/``: images, manifest and augmented copies of the configured dataset."""
        return self.data_dir / self.config.dataset.name

    @property
    def manifest_path(self) -> Path:
        """The manifest written by ingest: one row per image."""
        return self.dataset_dir / MANIFEST_NAME

    @property
    def augmented_manifest_path(self) -> Path:
        """The manifest of augmented train copies written by augment."""
        return self.dataset_dir / AUGMENTED_MANIFEST_NAME
