"""Train: fit a candidate model on a DVC data version with a ``tf.distribute`` strategy, log it to MLflow.

:func:`train` is the step (CLI ``mlops train``, Airflow task). It pins the data version, prepares a
job folder (``artifacts/training/<job id>/``), and runs :func:`run_worker` in this process (one worker)
or in N local processes through :mod:`pipelines.training.launcher`. Each worker follows ``TF_CONFIG`` (see
:mod:`pipelines.training.strategy`); ``BackupAndRestore`` checkpoints every epoch into the job folder, so a worker
group that is restarted resumes from its last completed epoch, and a finished job is never trained twice.

Only the chief (worker 0) talks to MLflow, through :class:`~pipelines.training.chief_tracking.ChiefTracker`:
params, per-epoch metrics, dataset lineage, tags, the model (signature and input example), curves, confusion
matrix and per-class table. Its result is written to ``result.json`` in the job folder, which is what
:func:`train` returns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError
from pipelines.files import write_json_atomic
from pipelines.project import Project
from pipelines.training.chief_tracking import RESULT_ARTIFACT, RESULT_FILE, ChiefTracker, TrainResult

JOB_FILE = "job.json"


class TrainingError(PipelineError):
    """Training could not start or did not finish."""


def last_run_id(project: Project) -> str:
    """The MLflow run id of the last training job finished in this project, or ``""``."""
    try:
        return str(json.loads(project.last_train_path.read_text(encoding="utf-8"))["run_id"])
    except (OSError, ValueError, KeyError):
        return ""


def job_dir_for(project: Project, job_id: str) -> Path:
    """The folder of training job ``job_id``: checkpoints, progress, result."""
    safe = "".join(char if char.isalnum() or char in "-_." else "_" for char in job_id)
    return project.training_dir / safe


def train(
    project: Project,
    *,
    data_version: str | None = None,
    workers: int = 1,
    job_id: str | None = None,
    max_restarts: int = 0,
    force: bool = False,
    candidate: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train a candidate on ``data_version`` (default: the workspace's current version) and log it.

    ``workers`` > 1 starts that many local worker processes with ``MultiWorkerMirroredStrategy``.
    Re-running a ``job_id`` whose training finished returns its result without training again;
    re-running one that was interrupted resumes from its last checkpoint. When a finished run has the same
    :func:`~pipelines.training.fingerprint.training_fingerprint` (data, code, parameters), it is returned
    with ``reused=True`` and nothing is trained, unless ``force``. A data version that is not in the version
    log or not in the remote, or a ``data/`` that differs from ``data.dvc``, is refused first
    (:func:`~pipelines.data.lineage.verify_lineage`).

    ``candidate`` (one entry of :func:`pipelines.training.sweep.plan_sweep`) trains a sweep candidate: its
    ``overrides`` change ``train`` settings, and its run is a child of the sweep's ``parent_run_id``.
    """
    from pipelines.data.lineage import verify_lineage
    from pipelines.data.versioning import checkout_data, current_version
    from pipelines.training.fingerprint import training_fingerprint
    from pipelines.training.inputs import split_files

    if workers < 1:
        raise TrainingError(f"--workers must be at least 1, got {workers}")
    candidate = dict(candidate or {})
    overrides = dict(candidate.get("overrides") or {})
    project = with_train_overrides(project, overrides)
    workspace_version = current_version(project)
    if data_version and data_version != workspace_version:
        verify_lineage(project, data_version, check_workspace=False)  # refused before data/ is touched
        checkout_data(project, data_version)
        workspace_version = data_version
    if not workspace_version:
        raise TrainingError(f"{project.root / 'data.dvc'}: no data version yet (run `mlops version` first)")
    verify_lineage(project, workspace_version)  # logged, in the remote, and exactly what data/ holds
    train_files = split_files(project, "train")
    if not train_files.paths:
        raise TrainingError(f"{project.manifest_path}: the manifest has no train rows")

    now = datetime.now(UTC)
    job_id = job_id or f"{now:%Y%m%dT%H%M%S}-{os.getpid()}"
    job_dir = job_dir_for(project, job_id)
    finished = _read_result(job_dir)
    if finished is not None:
        print(f"training job {job_id} already finished: run {finished.run_id}")
        return finished
    fingerprint = training_fingerprint(project, workspace_version)
    cached = None if force else cached_result(project, fingerprint)
    if cached is not None:
        print(
            f"unchanged since run {cached.run_id} ({cached.run_name}): same data version, training code and "
            "parameters; reusing it instead of training (force=true retrains)"
        )
        write_json_atomic(project.last_train_path, asdict(cached))
        return cached
    job_dir.mkdir(parents=True, exist_ok=True)
    job_file = job_dir / JOB_FILE
    if not job_file.exists():
        run_name = f"{project.config.dataset.name}-{workspace_version[:8]}-{now:%Y%m%d-%H%M%S}"
        if overrides:
            run_name += f"-{candidate.get('name', 'candidate')}"
        spec = {
            "data_version": workspace_version,
            "run_name": run_name,
            "job_id": job_id,
            "fingerprint": fingerprint,
            "train_overrides": overrides,
            "candidate": candidate.get("name", ""),
            "parent_run_id": candidate.get("parent_run_id") or "",
        }
        write_json_atomic(job_file, spec)

    if workers == 1:
        run_worker(project, job_dir)
    else:
        from pipelines.training.launcher import run_workers

        run_workers(project.params_path, job_dir, workers, max_restarts=max_restarts)
    result = _read_result(job_dir)
    if result is None:
        raise TrainingError(f"{job_dir}: training ended without a result from the chief")
    write_json_atomic(project.last_train_path, asdict(result))
    return result


def with_train_overrides(project: Project, overrides: Mapping[str, Any]) -> Project:
    """``project`` with some ``train`` settings replaced (a sweep candidate's), validated like params.yaml."""
    if not overrides:
        return project
    from pipelines.config import TrainConfig

    settings = TrainConfig.model_validate_json(
        json.dumps({**project.config.train.model_dump(mode="json"), **overrides})
    )
    return Project(project.root, project.config.model_copy(update={"train": settings}), project.params_file)


def cached_result(project: Project, fingerprint: str) -> TrainResult | None:
    """The result of the newest finished run tagged with ``fingerprint``, or None (never trained so)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import connect
    from pipelines.training.fingerprint import FINGERPRINT_TAG

    experiment_id = connect(project)
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.{FINGERPRINT_TAG} = '{fingerprint}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    try:
        stored = mlflow.artifacts.load_dict(f"runs:/{runs[0].info.run_id}/{RESULT_ARTIFACT}")
    except Exception:  # a run from before results were logged: train again rather than guess
        return None
    return TrainResult(**{**stored, "reused": True})


def _read_result(job_dir: Path) -> TrainResult | None:
    path = job_dir / RESULT_FILE
    if not path.is_file():
        return None
    return TrainResult(**json.loads(path.read_text(encoding="utf-8")))


def _optimizer(settings: Any, steps_per_epoch: int) -> Any:
    """The configured optimizer over a cosine decay of the learning rate to 0 across the whole run.

    The schedule follows ``optimizer.iterations``, so a group resumed by BackupAndRestore continues it.
    """
    import tf_keras

    rate = tf_keras.optimizers.schedules.CosineDecay(
        settings.learning_rate, decay_steps=settings.epochs * steps_per_epoch
    )
    if settings.optimizer == "sgd":
        return tf_keras.optimizers.SGD(rate, momentum=settings.momentum)
    if settings.optimizer == "adagrad":
        return tf_keras.optimizers.Adagrad(rate)
    return tf_keras.optimizers.Adam(rate)


def run_worker(project: Project, job_dir: Path) -> None:
    """Train as one worker of the cluster in ``$TF_CONFIG`` (or alone), resuming from ``job_dir``'s backup."""
    import tensorflow as tf
    import tf_keras

    from models.architectures import build_model
    from pipelines.training.callbacks import ProgressLog, synchronous_mlflow_callback
    from pipelines.training.inputs import input_shape, make_dataset, split_files
    from pipelines.training.strategy import build_strategy, current_plan

    spec = json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8"))
    project = with_train_overrides(project, spec.get("train_overrides") or {})
    config = project.config
    plan = current_plan(config.train.mixed_precision)
    # Operators (and the fault-injection tests) find a worker's process here.
    (job_dir / f"worker-{plan.worker_index}.pid").write_text(f"{os.getpid()}\n", encoding="utf-8")
    strategy = build_strategy(plan)
    # Same data, code and parameters give the same weights: the training cache relies on it.
    tf_keras.utils.set_random_seed(config.train.seed)
    tf.config.experimental.enable_op_determinism()

    train_files = split_files(project, "train", include_augmented=config.train.use_augmented)
    val_files = split_files(project, "val")
    replicas = int(strategy.num_replicas_in_sync)
    global_batch = config.train.per_replica_batch_size * replicas
    steps_per_epoch = max(1, len(train_files) // global_batch)
    validation_steps = max(1, math.ceil(len(val_files) / global_batch))
    channels = config.dataset.channels

    def dataset_fn(files: Any, training: bool) -> Any:
        def build(context: Any) -> Any:
            return make_dataset(
                files,
                channels=channels,
                batch_size=context.get_per_replica_batch_size(global_batch),
                training=training,
                seed=config.train.seed,
                shuffle_buffer=config.train.shuffle_buffer,
                num_shards=context.num_input_pipelines,
                shard_index=context.input_pipeline_id,
            ).repeat()

        return strategy.distribute_datasets_from_function(build)

    with strategy.scope():
        model = build_model(config.train.architecture, input_shape(project), len(config.dataset.classes))
        model.compile(
            optimizer=_optimizer(config.train, steps_per_epoch),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )

    tracker = ChiefTracker(project, job_dir, spec, plan, replicas, global_batch) if plan.is_chief else None
    progress = ProgressLog(job_dir / f"progress-worker-{plan.worker_index}.jsonl", global_batch * steps_per_epoch)
    callbacks: list[Any] = [tf_keras.callbacks.BackupAndRestore(str(job_dir / "backup")), progress]
    if tracker is not None:
        callbacks.append(synchronous_mlflow_callback())
    history = model.fit(
        dataset_fn(train_files, True),
        validation_data=dataset_fn(val_files, False),
        epochs=config.train.epochs,
        steps_per_epoch=steps_per_epoch,
        validation_steps=validation_steps,
        callbacks=callbacks,
        verbose=2,
    )
    weights = model.get_weights()
    checksum = float(sum(float(tf.reduce_sum(tf.cast(w, tf.float64))) for w in weights))
    summary = {
        "worker_index": plan.worker_index,
        "weights_checksum": checksum,
        "first_epoch": progress.first_epoch,
        "history": {key: [float(v) for v in values] for key, values in history.history.items()},
    }
    write_json_atomic(job_dir / f"worker-{plan.worker_index}.json", summary)
    if tracker is not None:
        tracker.finish(weights, checksum, progress)


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of one worker process started by the launcher (``python -m pipelines.training.train``)."""
    parser = argparse.ArgumentParser(description="one training worker; TF_CONFIG comes from the environment")
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--job-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        run_worker(Project.load(args.params), args.job_dir)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
