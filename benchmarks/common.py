"""What the benchmarks share: the run context, temporary projects, child processes, table rows, formatting.

Every benchmark works in its own folder under the run's temporary directory, with its own ``params.yaml``
(the repository's, with overrides), so MLflow, DVC and Airflow all use stores inside that folder.
Child processes run ``python -m benchmarks.child ...`` from the repository root with their output in a
log file; a failing child raises :class:`BenchmarkError` carrying the end of that log.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / "benchmarks"
REPO_PARAMS = REPO_ROOT / "params.yaml"

# Variables that would point a benchmark at stores outside its own temporary project.
FOREIGN_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "TF_CONFIG", "AIRFLOW_HOME", "MLOPS_PARAMS")

_STARTED = time.monotonic()


class BenchmarkError(RuntimeError):
    """A benchmark could not be measured (a step or a child process failed)."""


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark is; ``--quick`` shrinks everything for a smoke run."""

    epochs: int | None
    """Training epochs (None: ``train.epochs`` of the repository's params.yaml)."""
    training_rounds: int
    scaling_rounds: int
    ingest_images: int
    parse_repeats: int
    data_half_images: int
    """Generated PNGs of the ``data_half`` benchmark (the issue's scale: 100,000)."""

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        """Full sizes, or the smoke-run sizes."""
        if quick:
            return cls(
                epochs=2,
                training_rounds=1,
                scaling_rounds=1,
                ingest_images=2_000,
                parse_repeats=1,
                data_half_images=2_000,
            )
        return cls(
            epochs=None,
            training_rounds=5,
            scaling_rounds=2,
            ingest_images=20_000,
            parse_repeats=3,
            data_half_images=100_000,
        )


@dataclass(frozen=True)
class Context:
    """One benchmark run: its temporary directory, sizes and output folder."""

    tmp: Path
    quick: bool
    sizes: Sizes
    out_dir: Path = BENCH_DIR

    def folder(self, name: str) -> Path:
        """A fresh folder for one benchmark under the run's temporary directory."""
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=False)
        return path

    def epochs(self) -> int:
        """The number of training epochs every training benchmark uses."""
        if self.sizes.epochs is not None:
            return self.sizes.epochs
        params = yaml.safe_load(REPO_PARAMS.read_text(encoding="utf-8"))
        return int(params["train"]["epochs"])


@dataclass(frozen=True)
class Row:
    """One line of the results table; ``ratio`` is ``value / baseline`` when both are numbers."""

    benchmark: str
    measure: str
    value: str
    baseline: str = ""
    ratio: str = ""
    note: str = ""


@dataclass
class Outcome:
    """What one benchmark produced: its table rows and the data written to results.json."""

    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The JSON form (rows included)."""
        return {**self.data, "rows": [asdict(row) for row in self.rows]}


def log(message: str) -> None:
    """Progress on stderr, with the time since the run started."""
    elapsed = time.monotonic() - _STARTED
    print(f"[bench {elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for the table (``-`` when missing)."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``, or None when either is missing or the baseline is zero."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


def median(values: Sequence[float]) -> float | None:
    """The median, or None for no values."""
    return float(statistics.median(values)) if values else None


def clean_environ() -> None:
    """Drop variables that would send MLflow, DVC, TensorFlow or Airflow outside the temporary projects."""
    for name in FOREIGN_ENV:
        os.environ.pop(name, None)
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def write_params(root: Path, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write ``root/params.yaml``: the repository's params.yaml with section-level overrides."""
    params: dict[str, dict[str, Any]] = yaml.safe_load(REPO_PARAMS.read_text(encoding="utf-8"))
    for section, values in (overrides or {}).items():
        params.setdefault(section, {}).update(values)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def training_overrides(ctx: Context) -> dict[str, dict[str, Any]]:
    """Overrides of every digits training project: the run's epochs; gates open (speed, not quality)."""
    return {
        "train": {"epochs": ctx.epochs()},
        "gate": {"min_accuracy": 0.0, "min_macro_f1": 0.0, "max_primary_drop": 1.0, "max_class_recall_drop": 1.0},
    }


def digits_project(root: Path, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """A project on the built-in digits sample, ingested, validated, augmented and versioned; its params."""
    from pipelines.data.augment import augment_dataset
    from pipelines.data.ingest import ingest
    from pipelines.data.validate import validate_dataset
    from pipelines.data.versioning import version_data
    from pipelines.project import Project

    params = write_params(root, overrides)
    project = Project.load(params)
    log(f"  preparing the digits sample in {root}")
    ingest(project, "sample")
    validate_dataset(project)
    augment_dataset(project)
    version_data(project, source="sample")
    return params


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: this one's (already cleaned) plus ``extra``."""
    env = dict(os.environ)
    env.update({"TF_USE_LEGACY_KERAS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def run_child(
    args: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600.0,
    prefix: Sequence[str] = (),
    module: str = "benchmarks.child",
) -> tuple[dict[str, Any], float]:
    """Run ``python -m MODULE ARGS --out FILE``; return its JSON answer and its wall time in seconds."""
    out = log_path.with_suffix(".json")
    out.unlink(missing_ok=True)
    command = [*prefix, sys.executable, "-m", module, *args, "--out", str(out)]
    started = time.perf_counter()
    with log_path.open("a", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        completed = subprocess.run(
            command,
            cwd=REPO_ROOT,
            env=dict(env) if env is not None else child_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    seconds = time.perf_counter() - started
    if completed.returncode != 0 or not out.is_file():
        raise BenchmarkError(
            f"{module} {' '.join(args[:2])} exited with {completed.returncode} (log {log_path}):\n{tail(log_path)}"
        )
    return json.loads(out.read_text(encoding="utf-8")), seconds
