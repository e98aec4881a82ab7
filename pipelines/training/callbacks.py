"""The Keras callbacks of a training worker: a per-epoch progress log, and MLflow's own callback, logging at once.

This module imports tf-keras at the top: import it only inside a training worker.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import tf_keras


class ProgressLog(tf_keras.callbacks.Callback):  # type: ignore[misc]
    """Append each finished epoch (metrics, seconds, samples) to a JSON-lines file; time the epochs."""

    def __init__(self, path: Path, samples_per_epoch: int) -> None:
        super().__init__()
        self.path = path
        self.samples_per_epoch = samples_per_epoch
        self.first_epoch = -1
        self.epoch_seconds: list[float] = []
        self._started = 0.0
        self._trained: float | None = None

    def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        """Remember the first epoch of this attempt (above 0 when resumed from a backup) and start the clock."""
        if self.first_epoch < 0:
            self.first_epoch = epoch
        self._trained = None
        self._started = time.perf_counter()

    def on_test_begin(self, logs: dict[str, float] | None = None) -> None:
        """Stop the training clock when the epoch's validation pass starts (validation is not training)."""
        if self._trained is None:
            self._trained = time.perf_counter() - self._started

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        """Record the epoch's metrics and its training time (without validation and checkpointing)."""
        seconds = self._trained if self._trained is not None else time.perf_counter() - self._started
        self.epoch_seconds.append(seconds)
        record: dict[str, float | int] = {
            "epoch": epoch,
            "seconds": round(seconds, 4),
            "samples": self.samples_per_epoch,
        }
        record.update({key: float(value) for key, value in (logs or {}).items()})
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def samples_per_second(self) -> float:
        """Training throughput; the first epoch (tracing, cache filling) is left out when there are others."""
        timed = self.epoch_seconds[1:] or self.epoch_seconds
        total = sum(timed)
        return self.samples_per_epoch * len(timed) / total if total > 0 else 0.0


def synchronous_mlflow_callback() -> tf_keras.callbacks.Callback:
    """MLflow's ``MlflowCallback`` (per-epoch metrics, optimizer settings, model summary), logging synchronously.

    MLflow's callback queues its metrics for a background thread; ending the run then joins that thread, which
    polls its queue with a one-second timeout, so ``end_run`` waited up to a second per flush (two per run: about
    1.5 s of a 9 s train task, measured with py-spy). A handful of epochs logged directly costs milliseconds.
    """
    import mlflow
    from mlflow.tensorflow.callback import MlflowCallback

    class SynchronousMlflowCallback(MlflowCallback):
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            if self.log_every_epoch and logs is not None:
                mlflow.log_metrics(logs, step=epoch, synchronous=True)

        def on_test_end(self, logs: dict[str, float] | None = None) -> None:
            if logs is not None:
                mlflow.log_metrics({f"validation_{key}": value for key, value in logs.items()}, synchronous=True)

    return SynchronousMlflowCallback()  # type: ignore[no-untyped-call]
