"""Pictures and tables logged to MLflow: training curves, confusion matrix, per-class metrics.

Names are fixed (``training_curves.png``, ``<prefix>_confusion_matrix.png``, ``<prefix>_per_class.json``)
so the MLflow UI shows the same artifacts for every run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.release.metrics import ClassificationMetrics


def headless_pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_progress(job_dir: Path, worker_index: int = 0) -> list[dict[str, float]]:
    """The per-epoch records a worker wrote (the last record wins for an epoch trained twice)."""
    path = job_dir / f"progress-worker-{worker_index}.jsonl"
    if not path.is_file():
        return []
    by_epoch: dict[int, dict[str, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_epoch[int(record["epoch"])] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def log_training_curves(job_dir: Path) -> None:
    """Plot loss and accuracy (train and validation) per epoch and log the figure to the active run."""
    import mlflow

    records = read_progress(job_dir)
    if not records:
        return
    plt = headless_pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [int(record["epoch"]) + 1 for record in records]
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            values = [record[key] for record in records if key in record]
            if len(values) == len(epochs):
                axis.plot(epochs, values, marker="o", label=label)
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.legend()
    figure.tight_layout()
    mlflow.log_figure(figure, "training_curves.png")
    plt.close(figure)


def log_classification_artifacts(metrics: ClassificationMetrics, classes: Sequence[str], prefix: str) -> None:
    """Log a confusion-matrix picture and a per-class precision/recall/F1 table to the active run."""
    import mlflow
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = headless_pyplot()
    figure, axis = plt.subplots(figsize=(6, 5))
    display = ConfusionMatrixDisplay(np.asarray(metrics.confusion_matrix), display_labels=list(classes))
    display.plot(ax=axis, cmap="Blues", values_format="d", text_kw={"fontsize": 8})
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"{prefix} confusion matrix (accuracy {metrics.accuracy:.3f})")
    figure.tight_layout()
    mlflow.log_figure(figure, f"{prefix}_confusion_matrix.png")
    plt.close(figure)
    table = {
        "class": list(classes),
        "precision": [metrics.per_class[name].precision for name in classes],
        "recall": [metrics.per_class[name].recall for name in classes],
        "f1": [metrics.per_class[name].f1 for name in classes],
        "support": [metrics.per_class[name].support for name in classes],
    }
    mlflow.log_table(table, f"{prefix}_per_class.json")
