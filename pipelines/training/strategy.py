"""Which ``tf.distribute`` strategy to use, decided from the environment.

* ``TF_CONFIG`` naming more than one worker: ``MultiWorkerMirroredStrategy`` (one process per host or per
  GPU, all-reduce over gRPC; NCCL on GPUs);
* otherwise, several GPUs on this host: ``MirroredStrategy``;
* otherwise: the default strategy (one device).

Mixed precision (``mixed_float16``) is used when GPUs are present and ``train.mixed_precision`` is
``auto``. :func:`plan_strategy` is a pure function so the choice is tested without TensorFlow.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Literal

from pipelines.errors import PipelineError

StrategyKind = Literal["multi_worker_mirrored", "mirrored", "default"]


@dataclass(frozen=True)
class StrategyPlan:
    """The strategy to build and this process's place in the cluster."""

    kind: StrategyKind
    num_workers: int
    worker_index: int
    gpus: int
    mixed_precision: bool

    @property
    def is_chief(self) -> bool:
        """Worker 0 is the chief: it alone logs to MLflow and saves the model."""
        return self.worker_index == 0


def plan_strategy(tf_config: str | None, gpus: int, mixed_precision: str = "auto") -> StrategyPlan:
    """Choose the strategy from a ``TF_CONFIG`` JSON string (or None) and the number of local GPUs."""
    workers, index = 1, 0
    if tf_config:
        try:
            parsed = json.loads(tf_config)
            cluster = parsed.get("cluster", {})
            task = parsed.get("task", {})
            chiefs = list(cluster.get("chief", []))
            workers = len(chiefs) + len(cluster.get("worker", []))
            task_type = task.get("type", "worker")
            index = int(task.get("index", 0))
        except (ValueError, AttributeError, TypeError) as error:
            raise PipelineError(f"TF_CONFIG: not a valid cluster description: {error}") from None
        if task_type not in ("worker", "chief"):
            raise PipelineError(f"TF_CONFIG: task type {task_type!r} is not supported (use worker or chief)")
        if task_type == "worker" and chiefs:
            index += len(chiefs)
        if not 0 <= index < max(workers, 1):
            raise PipelineError(f"TF_CONFIG: task index {index} is outside a cluster of {workers} workers")
    use_mixed = mixed_precision == "auto" and gpus > 0
    if workers > 1:
        return StrategyPlan("multi_worker_mirrored", workers, index, gpus, use_mixed)
    if gpus > 1:
        return StrategyPlan("mirrored", 1, 0, gpus, use_mixed)
    return StrategyPlan("default", 1, 0, gpus, use_mixed)


def current_plan(mixed_precision: str = "auto") -> StrategyPlan:
    """The plan for this process: ``$TF_CONFIG`` and the GPUs TensorFlow sees."""
    import tensorflow as tf

    gpus = len(tf.config.list_physical_devices("GPU"))
    return plan_strategy(os.environ.get("TF_CONFIG"), gpus, mixed_precision)


def build_strategy(plan: StrategyPlan) -> Any:
    """Create the ``tf.distribute`` strategy of ``plan`` (and set the mixed-precision policy)."""
    import tensorflow as tf
    import tf_keras

    if plan.mixed_precision:
        tf_keras.mixed_precision.set_global_policy("mixed_float16")
    if plan.kind == "multi_worker_mirrored":
        communication = (
            tf.distribute.experimental.CommunicationImplementation.NCCL
            if plan.gpus
            else tf.distribute.experimental.CommunicationImplementation.RING
        )
        options = tf.distribute.experimental.CommunicationOptions(implementation=communication)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if plan.kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()
