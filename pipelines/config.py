"""Typed, frozen, strict configuration loaded once from ``params.yaml``.

Every section of ``params.yaml`` maps to one model below. Unknown keys and values of the
wrong type are refused with a :class:`ConfigError` that names the file and the dotted key,
so a typo never silently falls back to a default. Values that would break a later step or switch a
check off are refused the same way: an infinite or NaN number anywhere (every float of every section),
a dataset or class name that is not one plain folder name, a ``schedule.cron`` that Airflow's cron
parser (croniter) would reject, an unknown image format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.errors import ConfigError

PARAMS_ENV = "MLOPS_PARAMS"
"""Environment variable that points at another ``params.yaml``."""

SPLITS = ("train", "val", "test")

ImageFormat = Literal["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"]
"""Image formats ingest may decode (Pillow's names); ``ingest.image_formats`` picks among them."""

DEFAULT_IMAGE_FORMATS: tuple[ImageFormat, ...] = ("PNG", "JPEG", "BMP", "GIF", "WEBP")

_DATASET_NAME_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def _plain_folder_name(value: str) -> str:
    """``value`` if it is one plain folder name (it becomes a folder under ``data/``), else ValueError."""
    if not value or value in (".", ".."):
        raise ValueError(f"{value!r} is not a folder name")
    if any(character in value for character in "/\\\0"):
        raise ValueError(f"{value!r} must be one plain folder name (no '/', '\\' or NUL)")
    if value.startswith("."):
        raise ValueError(f"{value!r} must not start with '.' (hidden folders are skipped)")
    if any(ord(character) < 32 or ord(character) == 127 for character in value):
        raise ValueError(f"{value!r} must not contain control characters")
    return value


def _dataset_name(value: str) -> str:
    _plain_folder_name(value)
    if not set(value) <= _DATASET_NAME_CHARACTERS:
        raise ValueError(f"{value!r} may hold only letters, digits, '_', '-' and '.'")
    return value


FolderName = Annotated[str, AfterValidator(_plain_folder_name)]
"""A string that is one plain folder name: not empty, ``.`` or ``..``; no ``/``, ``\\``, NUL; no leading dot."""


class _Section(BaseModel):
    # allow_inf_nan=False: an infinite or NaN threshold would silently switch its check off.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class DatasetConfig(_Section):
    """What the images are: dataset name, class names, shape after ingestion."""

    name: Annotated[str, AfterValidator(_dataset_name)] = "digits"
    classes: tuple[FolderName, ...] = tuple(str(digit) for digit in range(10))
    image_size: tuple[int, int] = (8, 8)
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
    image_formats: tuple[ImageFormat, ...] = DEFAULT_IMAGE_FORMATS

    @field_validator("image_formats")
    @classmethod
    def _check_formats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("name at least one format")
        if len(set(value)) != len(value):
            raise ValueError("each format may appear once")
        return value

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
    optimizer: Literal["adam", "sgd", "adagrad"] = "adam"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """Momentum of ``sgd`` (the other optimizers ignore it)."""
    epochs: int = Field(5, ge=1)
    per_replica_batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(0.003, gt=0.0)
    seed: int = 1234
    use_augmented: bool = True
    shuffle_buffer: int = Field(4096, ge=1)
    mixed_precision: Literal["auto", "off"] = "auto"
    workers: int = Field(1, ge=1, le=64)
    max_restarts: int = Field(1, ge=0, le=10)


SweptKey = Literal["architecture", "optimizer", "momentum", "epochs", "per_replica_batch_size", "learning_rate"]
"""The ``train`` settings a sweep may vary."""
SWEPT_KEYS: tuple[SweptKey, ...] = (
    "architecture",
    "optimizer",
    "momentum",
    "epochs",
    "per_replica_batch_size",
    "learning_rate",
)


class CandidateConfig(_Section):
    """One candidate of a sweep: a name and the ``train`` settings it changes (the rest come from ``train``)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,40}$")] | None = None
    architecture: Literal["small_cnn", "resnet"] | None = None
    optimizer: Literal["adam", "sgd", "adagrad"] | None = None
    momentum: float | None = Field(None, ge=0.0, lt=1.0)
    epochs: int | None = Field(None, ge=1)
    per_replica_batch_size: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0.0)

    def overrides(self) -> dict[str, object]:
        """The ``train`` settings this candidate sets."""
        return {key: value for key in SWEPT_KEYS if (value := getattr(self, key)) is not None}


class SweepConfig(_Section):
    """Several candidates trained side by side, the best on the validation split going on to the gate.

    ``candidates`` lists them explicitly; ``grid`` maps ``train`` settings to lists of values and adds every
    combination. Neither: one candidate, the ``train`` section as it is. More than ``max_candidates`` in all is
    refused, so a grid cannot grow without bound.
    """

    candidates: tuple[CandidateConfig, ...] = ()
    grid: dict[SweptKey, tuple[str | int | float, ...]] = {}
    max_candidates: int = Field(6, ge=1, le=32)
    select_metric: Literal["val_accuracy", "val_macro_f1"] = "val_accuracy"

    @model_validator(mode="after")
    def _bounded(self) -> SweepConfig:
        size = len(self.candidates) + _grid_size(self.grid)
        if size > self.max_candidates:
            raise ValueError(f"the sweep holds {size} candidates, more than sweep.max_candidates={self.max_candidates}")
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"sweep.grid.{key}: give at least one value")
            CandidateConfig.model_validate_json(json.dumps({key: values[0]}))  # types and bounds of the key
        return self

    def plan(self) -> list[dict[str, object]]:
        """Every candidate as ``{"name": ..., "overrides": {...}}``; one unnamed empty one when none is set."""
        import itertools

        planned: list[dict[str, object]] = []
        for index, candidate in enumerate(self.candidates):
            planned.append({"name": candidate.name or f"c{index}", "overrides": candidate.overrides()})
        keys = sorted(self.grid)
        for values in itertools.product(*(self.grid[key] for key in keys)) if keys else ():
            overrides = CandidateConfig.model_validate_json(json.dumps(dict(zip(keys, values, strict=True))))
            name = "-".join(f"{key}={value}" for key, value in zip(keys, values, strict=True))
            planned.append({"name": name[:40], "overrides": overrides.overrides()})
        return planned or [{"name": "default", "overrides": {}}]


def _grid_size(grid: Mapping[SweptKey, tuple[object, ...]]) -> int:
    size = 1
    for values in grid.values():
        size *= len(values)
    return size if grid else 0


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

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        """Parse the expression as Airflow's ``CronTriggerTimetable`` does (croniter, with Airflow's presets)."""
        if value is None:
            return None
        from croniter import CroniterBadCronError, CroniterBadDateError, croniter  # type: ignore[import-untyped]

        presets = {
            "@hourly": "0 * * * *",
            "@daily": "0 0 * * *",
            "@weekly": "0 0 * * 0",
            "@monthly": "0 0 1 * *",
            "@quarterly": "0 0 1 */3 *",
            "@yearly": "0 0 1 1 *",
        }
        try:
            croniter(presets.get(value, value))
        except (CroniterBadCronError, CroniterBadDateError, ValueError, KeyError) as error:
            raise ValueError(f"{value!r} is not a valid cron expression ({error})") from None
        return value


def _service_url(value: str) -> str:
    """``value`` if it is an http(s) URL, optionally prefixed ``dns+`` (every address the name resolves to)."""
    if not value.removeprefix("dns+").startswith(("http://", "https://")):
        raise ValueError(f"{value!r} is not an http:// or https:// URL (optionally prefixed dns+)")
    return value.rstrip("/")


class ServeConfig(_Section):
    """The prediction service: where it listens, how it batches, what it accepts, where it logs."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    endpoints: tuple[Annotated[str, AfterValidator(_service_url)], ...] = ("http://127.0.0.1:8000",)
    require_running: bool = False
    poll_seconds: float = Field(30.0, gt=0.0, le=86400.0)
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_batch_wait_ms: float = Field(3.0, ge=0.0, le=1000.0)
    max_queue_images: int = Field(2048, ge=1)
    max_images_per_request: int = Field(16, ge=1, le=1024)
    max_request_bytes: int = Field(8_000_000, gt=0)
    check_tolerance: float = Field(1e-4, gt=0.0, le=1.0)
    deploy_timeout_seconds: float = Field(300.0, gt=0.0)
    status_timeout_seconds: float = Field(2.0, gt=0.0, le=60.0)
    log_uri: str = "artifacts/predictions"
    log_max_bytes: int = Field(5_000_000, ge=1000)
    log_max_files: int = Field(20, ge=1)
    log_rotate_seconds: float = Field(300.0, gt=0.0)
    feedback_requests: int = Field(1000, ge=0)
    feedback_uri: str = "artifacts/feedback"


class MonitorConfig(_Section):
    """What the hourly monitor compares, and the thresholds that request a retrain."""

    experiment: str = "digits-monitor"
    window_hours: float = Field(6.0, gt=0.0, le=24.0 * 90)
    max_records: int = Field(100_000, ge=1)
    min_images: int = Field(50, ge=1)
    drift_tolerance: float = Field(0.15, gt=0.0)
    class_p_value: float = Field(0.001, gt=0.0, lt=1.0)
    min_class_distance: float = Field(0.1, ge=0.0, le=1.0)
    min_feedback: int = Field(20, ge=1)
    min_live_accuracy: float = Field(0.85, ge=0.0, le=1.0)
    cooldown_hours: float = Field(24.0, ge=0.0)
    include_feedback: bool = True


class Config(_Section):
    """The whole ``params.yaml``."""

    dataset: DatasetConfig = DatasetConfig()
    ingest: IngestConfig = IngestConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    augment: AugmentConfig = AugmentConfig()
    version: VersionConfig = VersionConfig()
    train: TrainConfig = TrainConfig()
    sweep: SweepConfig = SweepConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    promote: PromoteConfig = PromoteConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    serve: ServeConfig = ServeConfig()
    monitor: MonitorConfig = MonitorConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True, allow_inf_nan=False)

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
