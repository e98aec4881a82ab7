"""Training quality: the test accuracy behind each training default of ``params.yaml``, by measurement.

``quality``: the pipeline's own training step (:func:`pipelines.training.train.train`, one worker, ``force=True``)
on the digits sample, then its own evaluation (``mlops evaluate``: the logged model scored on the test split,
``test_accuracy`` logged to the run), once per variant of the defaults:

* the defaults (``small_cnn`` on 8x8, Adam at a peak of 0.003 over a cosine decay to 0, 5 epochs, batch 64,
  originals + 2 augmented copies), and the defaults again: the same test accuracy and weights (determinism);
* the defaults with 3 more ``train.seed`` values: min and median over the 4 seeds (the spread is the point);
* 3 and 8 epochs; no augmentation (``train.use_augmented: false``); 32x32 input (its own ingest of the sample);
* SGD (momentum 0.9, peak 0.05) and Adagrad (peak 0.05), over the same cosine decay;
* a constant learning rate: not measured, ``train`` has no setting for it (the cosine decay is built in).

Every variant is a ``params-<variant>.yaml`` next to the project's ``params.yaml`` (its folder is the project root,
so all share one ingested, augmented and versioned sample and one MLflow store). Variants run one after the other
in one process (``python -m benchmarks.quality --run JOB_ID PARAMS ...``; each ``train()`` reseeds Python, NumPy and
TensorFlow and builds a new model), which saves TensorFlow, MLflow and DVC start-up per variant; the defaults are
trained again in a fresh process (determinism across processes, as Airflow tasks run), and so is a variant
trained late in the shared process (nothing carries over); 32x32 has its own process. Training seconds are the
epochs' training time from the job's progress log (validation and checkpoints not included); the wall time of
``train()`` (data lineage checks, MLflow logging of the model, curves and reports; the first ``train()`` of a
process also pays one-time set-up) is beside it. The test split is 15% of the sample (268 images): one image is
0.0037 of accuracy. Validation accuracy, which is what a choice should be made on, is in each note.

``--quick``: the defaults and one other variant (no augmentation) only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import (
    Context,
    Outcome,
    Row,
    digits_project,
    fmt,
    log,
    median,
    ratio,
    run_child,
)

EXTRA_SEEDS = (7, 42, 2024)
"""``train.seed`` values tried besides the default's."""

CONSTANT_RATE_NOTE = (
    "not measured: train has no setting for a constant learning rate (pipelines/training/train.py `_optimizer` "
    "always builds a cosine decay to 0 over the run), and the pipeline's code is not changed for a benchmark"
)


@dataclass(frozen=True)
class Variant:
    """One training configuration: its name, what it changes, its ``train`` overrides and its process."""

    name: str
    changed: str
    train: dict[str, Any] = field(default_factory=dict)
    large_images: bool = False
    """Trained on the 32x32 ingest of the sample instead of the 8x8 one."""
    process: str = "main"
    """Variants of one process are trained one after the other in it (each ``train()`` reseeds everything)."""


def variants(quick: bool) -> list[Variant]:
    """The variants to train, the defaults first (``--quick``: the defaults and one other)."""
    default = Variant("default", "params.yaml as it is")
    no_augment = Variant("no-augment", "train.use_augmented false (originals only)", {"use_augmented": False})
    if quick:
        return [default, no_augment]
    return [
        default,
        *(Variant(f"seed-{seed}", f"train.seed {seed}", {"seed": seed}) for seed in EXTRA_SEEDS),
        Variant("epochs-3", "train.epochs 3", {"epochs": 3}),
        Variant("epochs-8", "train.epochs 8", {"epochs": 8}),
        no_augment,
        Variant(
            "sgd",
            "train.optimizer sgd, momentum 0.9, learning_rate 0.05",
            {"optimizer": "sgd", "momentum": 0.9, "learning_rate": 0.05},
        ),
        Variant(
            "adagrad", "train.optimizer adagrad, learning_rate 0.05", {"optimizer": "adagrad", "learning_rate": 0.05}
        ),
        # Fresh processes: the defaults again (determinism across processes, as Airflow tasks run), and a variant
        # trained late in the main process again on its own (nothing carries over from one train() to the next).
        Variant("default-again", "nothing: the defaults again, in a fresh process", process="repeat"),
        Variant("epochs-3-again", "train.epochs 3 again, in a fresh process", {"epochs": 3}, process="repeat"),
        Variant("image-32", "dataset.image_size [32, 32] (own ingest and augment)", large_images=True, process="large"),
    ]


def variant_params(project_params: Path, variant: Variant) -> Path:
    """``params-<variant>.yaml`` beside ``project_params``: the same settings with the variant's ``train`` changes."""
    if not variant.train:
        return project_params
    params: dict[str, dict[str, Any]] = yaml.safe_load(project_params.read_text(encoding="utf-8"))
    params["train"].update(variant.train)
    path = project_params.with_name(f"params-{variant.name}.yaml")
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def run_process(runs: list[tuple[str, Path]], log_path: Path, timeout: float = 3600.0) -> list[dict[str, Any]]:
    """Train and evaluate each ``(job id, params)`` in order in one fresh process; one answer per run."""
    args = [part for job_id, params in runs for part in ("--run", job_id, str(params))]
    reply, seconds = run_child(args, log_path, timeout=timeout, module="benchmarks.quality")
    answers: list[dict[str, Any]] = reply["runs"]
    return [{**answer, "process_seconds": seconds, "log": str(log_path)} for answer in answers]


def bench_quality(ctx: Context) -> Outcome:
    """Test accuracy and training seconds of the defaults and of one change at a time (see the module doc)."""
    root = ctx.folder("quality")
    logs = root / "logs"
    logs.mkdir()
    plan = variants(ctx.quick)
    prepare_seconds: dict[str, float] = {}
    started = time.perf_counter()
    projects = {False: digits_project(root / "project-8x8")}
    prepare_seconds["8x8"] = time.perf_counter() - started
    if any(variant.large_images for variant in plan):
        started = time.perf_counter()
        projects[True] = digits_project(root / "project-32x32", {"dataset": {"image_size": [32, 32]}})
        prepare_seconds["32x32"] = time.perf_counter() - started

    results: dict[str, dict[str, Any]] = {}
    for process in dict.fromkeys(variant.process for variant in plan):
        group = [variant for variant in plan if variant.process == process]
        log(f"  process {process}: {', '.join(variant.name for variant in group)}")
        runs = [(f"quality-{v.name}", variant_params(projects[v.large_images], v)) for v in group]
        answers = run_process(runs, logs / f"{process}.log")
        for variant, answer in zip(group, answers, strict=True):
            results[variant.name] = {"changed": variant.changed, "train_overrides": variant.train, **answer}
            fit = fmt(answer.get("fit_seconds"), 1)
            log(f"  {variant.name}: test accuracy {answer['test_accuracy']:.4f}, fit {fit} s")

    default = results["default"]
    base = float(default["test_accuracy"])
    rows = [_row("default", default, base, "params.yaml as it is")]

    if "default-again" in results:
        rows.append(_determinism_row(results, base))
    else:
        rows.append(Row("quality", "determinism: the defaults trained twice", "-", note="not run in --quick"))

    seeded = [name for name in results if name.startswith("seed-")]
    if seeded:
        accuracies = {"1234 (default)": base} | {
            name.removeprefix("seed-"): float(results[name]["test_accuracy"]) for name in seeded
        }
        values = list(accuracies.values())
        lowest = min(values)
        rows.append(
            Row(
                "quality",
                f"test accuracy: min over {len(values)} train.seed values (defaults otherwise)",
                fmt(lowest, 4),
                fmt(base, 4),
                fmt(ratio(lowest, base), 4),
                f"median {fmt(median(values), 4)}, max {fmt(max(values), 4)}; per seed: "
                + ", ".join(f"{seed} {value:.4f}" for seed, value in accuracies.items())
                + "; val accuracy: "
                + ", ".join(f"{results[name]['val_accuracy']:.4f}" for name in seeded)
                + "; fit s: "
                + ", ".join(fmt(results[name].get("fit_seconds"), 1) for name in seeded),
            )
        )

    for variant in plan:
        if variant.name == "default" or variant.name.startswith("seed-") or variant.process == "repeat":
            continue
        rows.append(_row(variant.name, results[variant.name], base, variant.changed))
    if not ctx.quick:
        rows.append(Row("quality", "test accuracy: constant learning rate", "skipped", note=CONSTANT_RATE_NOTE))

    data = {
        "default_test_accuracy": base,
        "variants": results,
        "prepare_seconds": prepare_seconds,
        "constant_learning_rate": CONSTANT_RATE_NOTE,
        "test_images": default.get("test_images"),
    }
    return Outcome(rows, data)


def _determinism_row(results: dict[str, dict[str, Any]], base: float) -> Row:
    default, again = results["default"], results["default-again"]
    same = (
        again["test_accuracy"] == default["test_accuracy"] and again["weights_checksum"] == default["weights_checksum"]
    )
    note = (
        f"fresh process: test accuracy {float(again['test_accuracy']):.4f}, weights checksum "
        f"{'same' if again['weights_checksum'] == default['weights_checksum'] else 'differs'} "
        f"({again['weights_checksum']!r} vs {default['weights_checksum']!r})"
    )
    late, alone = results.get("epochs-3"), results.get("epochs-3-again")
    if late is not None and alone is not None:
        carried = late["weights_checksum"] == alone["weights_checksum"]
        note += (
            f"; epochs-3 trained 5th in the main process vs alone in a fresh one: weights "
            f"{'same' if carried else 'DIFFER'} (test accuracy {float(late['test_accuracy']):.4f} vs "
            f"{float(alone['test_accuracy']):.4f})"
        )
    return Row(
        "quality",
        "determinism: the defaults trained twice (force), test accuracy and weights",
        "same" if same else "differs",
        fmt(base, 4),
        note=note,
    )


def _row(name: str, result: dict[str, Any], base: float, changed: str) -> Row:
    accuracy = float(result["test_accuracy"])
    return Row(
        "quality",
        f"test accuracy: {name}",
        fmt(accuracy, 4),
        fmt(base, 4),
        fmt(ratio(accuracy, base), 4),
        f"training {fmt(result.get('fit_seconds'), 1)} s over {result['epochs']} epochs (train() wall "
        f"{fmt(float(result['train_seconds']), 1)} s); {result.get('test_errors')} of {result.get('test_images')} "
        f"test images wrong; val accuracy {float(result['val_accuracy']):.4f}; {changed}",
    )


# One fresh process: python -m benchmarks.quality --run JOB_ID PARAMS [--run ...] --out FILE


def _fit_seconds(job_dir: Path) -> float | None:
    """The epochs' training seconds from the job's progress log (validation and checkpoints not included)."""
    progress = job_dir / "progress-worker-0.jsonl"
    if not progress.is_file():
        return None
    lines = progress.read_text(encoding="utf-8").splitlines()
    return sum(float(json.loads(line)["seconds"]) for line in lines if line.strip())


def train_and_evaluate(params: Path, job_id: str) -> dict[str, Any]:
    """Train ``params``'s project (``force``: never a cached run), run ``mlops evaluate`` on it, read the result."""
    from dataclasses import asdict

    import mlflow  # imported before the clock starts, as TensorFlow is
    import tensorflow  # noqa: F401
    import tf_keras  # noqa: F401
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main as mlops
    from pipelines.project import Project
    from pipelines.training.train import train

    project = Project.load(params)
    started = time.perf_counter()
    result = train(project, job_id=job_id, force=True)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    status = mlops(["--params", str(params), "evaluate", "--run-id", result.run_id])
    evaluate_seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"mlops evaluate --run-id {result.run_id} exited with {status}")
    # `mlops evaluate` pointed MLflow at the project's store; read back what it logged on the run.
    metrics = MlflowClient().get_run(result.run_id).data.metrics
    comparison = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/evaluation/comparison.json")
    candidate = comparison.get("candidate", {})
    return {
        **asdict(result),
        "test_accuracy": float(metrics["test_accuracy"]),
        "test_macro_f1": metrics.get("test_macro_f1"),
        "test_images": candidate.get("n"),
        "test_errors": round((1.0 - float(candidate.get("accuracy", 0.0))) * int(candidate.get("n", 0))),
        "train_seconds": train_seconds,
        "fit_seconds": _fit_seconds(Path(result.job_dir)),
        "evaluate_seconds": evaluate_seconds,
        "tracking_uri": mlflow.get_tracking_uri(),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of one fresh process: train and evaluate each ``--run JOB_ID PARAMS`` in order."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(description="train and evaluate variants; write JSON to --out")
    parser.add_argument("--run", nargs=2, action="append", required=True, metavar=("JOB_ID", "PARAMS"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    answers = []
    for position, (job_id, params) in enumerate(args.run, start=1):
        answers.append({**train_and_evaluate(Path(params), job_id), "position_in_process": position})
    payload = {"runs": answers}
    args.out.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
