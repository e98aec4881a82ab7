"""Where a project's files live: the root folder, its configuration and the paths derived from both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.config import Config, default_params_path, load_config

MANIFEST_NAME = "manifest.csv"
AUGMENTED_MANIFEST_NAME = "augmented.csv"


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
