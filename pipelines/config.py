"""Typed, frozen, strict configuration loaded once from ``params.yaml``.

Every section of ``params.yaml`` maps to one model below. Unknown keys and values of the
wrong type are refused with a :class:`ConfigError` that names the file and the dotted key,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.errors import ConfigError

PARAMS_ENV = "MLOPS_PARAMS"
"""Environment variable that points at another ``params.yaml``."""

SPLITS = ("train", "val", "test")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DatasetConfig(_Section):
    """What the images are: dataset name, class names, shape after ingestion."""

    name: str = Field("digits", pattern=r"^[A-Za-z0-9_.-]+$")
    classes: tuple[str, ...] = tuple(str(digit) for digit in range(10))
    image_size: tuple[int, int] = (32, 32)
    channels: Literal[1, 3] = 1

    @model_validator(mode="after")
    def _check(self) -> DatasetConfig:
        if len(self.classes) < 2:
            raise ValueError("classes: at least two classes are needed")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes: class names must be unique")
        if min(self.image_size) < 4 or max(self.image_size) > 4096:
            raise ValueError("image_size: each side must be between 4 and 4096")
        return self


class IngestConfig(_Section):
    """Where images come from and how they are split."""

    source: str = "sample"
    split_fractions: dict[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}
    max_image_pixels: int = Field(16_000_000, gt=0)
    max_file_bytes: int = Field(20_000_000, gt=0)

    @model_validator(mode="after")
    def _check(self) -> IngestConfig:
        if set(self.split_fractions) != set(SPLITS):
            raise ValueError(f"split_fractions: keys must be exactly {list(SPLITS)}")
        if any(fraction <= 0 for fraction in self.split_fractions.values()):
            raise ValueError("split_fractions: every fraction must be positive")
        if abs(sum(self.split_fractions.values()) - 1.0) > 1e-6:
            raise ValueError("split_fractions: fractions must add up to 1")
        return self


class ValidateConfig(_Section):
    """Thresholds of the Great Expectations data suite."""

    min_images_per_class_per_split: int = Field(5, ge=1)
    max_class_imbalance_ratio: float = Field(3.0, ge=1.0)
    drift_tolerance: float = Field(0.15, gt=0.0)
    reference_profile: str = "artifacts/reference_profile.json"
    report_dir: str = "artifacts/validation"


class AugmentConfig(_Section):
    """Seeded augmentation of the train split."""

    enabled: bool = True
    seed: int = 42
    copies: int = Field(2, ge=0, le=50)
    rotation_degrees: float = Field(12.0, ge=0.0, le=180.0)
    shift_fraction: float = Field(0.08, ge=0.0, le=0.5)
    zoom_range: float = Field(0.1, ge=0.0, le=0.9)
    brightness: float = Field(0.15, ge=0.0, le=1.0)
    contrast: float = Field(0.15, ge=0.0, le=1.0)
    noise_std: float = Field(0.02, ge=0.0, le=1.0)
    horizontal_flip: bool = False


class VersionConfig(_Section):
    """Where DVC pushes data and where data versions are recorded."""

    remote: str = "artifacts/dvc-remote"
    log: str = "artifacts/data_versions.jsonl"


class TrainConfig(_Section):
    """The model and how it is trained."""

    architecture: Literal["small_cnn", "resnet"] = "small_cnn"
    epochs: int = Field(8, ge=1)
    per_replica_batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(0.002, gt=0.0)
    seed: int = 1234
    use_augmented: bool = True
    shuffle_buffer: int = Field(4096, ge=1)
    mixed_precision: Literal["auto", "off"] = "auto"
    workers: int = Field(1, ge=1, le=64)
    max_restarts: int = Field(1, ge=0, le=10)


class EvaluateConfig(_Section):
    """How the candidate and the champion are compared."""

    bootstrap_samples: int = Field(1000, ge=100)
    seed: int = 0


class GateConfig(_Section):
    """Thresholds a candidate must pass to be registered."""

    min_accuracy: float = Field(0.85, ge=0.0, le=1.0)
    min_macro_f1: float = Field(0.85, ge=0.0, le=1.0)
    primary_metric: Literal["accuracy", "macro_f1"] = "accuracy"
    max_primary_drop: float = Field(0.01, ge=0.0, le=1.0)
    max_class_recall_drop: float = Field(0.05, ge=0.0, le=1.0)


class RegistryConfig(_Section):
    """MLflow experiment and registered model names."""

    experiment: str = "digits-retrain"
    model_name: str = "digits-classifier"


class PromoteConfig(_Section):
    """Infrastructure validation a version must pass before it becomes champion."""

    batch_size: int = Field(64, ge=1)
    latency_batches: int = Field(20, ge=2)
    p95_latency_budget_ms: float = Field(250.0, gt=0.0)
    timeout_seconds: int = Field(300, ge=10)


class ScheduleConfig(_Section):
    """When the retrain DAG runs (``cron: null``: only when new data lands) and what it does after the gate."""

    cron: str | None = "0 3 * * 1"
    auto_promote: bool = False


class Config(_Section):
    """The whole ``params.yaml``."""

    dataset: DatasetConfig = DatasetConfig()
    ingest: IngestConfig = IngestConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    augment: AugmentConfig = AugmentConfig()
    version: VersionConfig = VersionConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    promote: PromoteConfig = PromoteConfig()
    schedule: ScheduleConfig = ScheduleConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    @property
    def validation(self) -> ValidateConfig:
        """The ``validate`` section (named so to avoid pydantic's ``validate`` method)."""
        return self.validate_


def _format_error(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_config(data: object, path: Path) -> Config:
    """Validate already-parsed YAML ``data`` read from ``path`` into a :class:`Config`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        # JSON mode keeps strict typing while accepting YAML lists for tuples.
        return Config.model_validate_json(json.dumps(data))
    except ValidationError as error:
        raise ConfigError(_format_error(path, error)) from None


def default_params_path() -> Path:
    """``$MLOPS_PARAMS`` if set, else ``params.yaml`` in the current directory."""
    return Path(os.environ.get(PARAMS_ENV, "params.yaml"))


def load_config(path: Path | None = None) -> Config:
    """Read and validate ``params.yaml`` (or ``path``); raise :class:`ConfigError` on any problem."""
    path = Path(path) if path is not None else default_params_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read configuration: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_config(data, path)
