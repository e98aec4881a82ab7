"""Train: fit a candidate model on a DVC data version with a ``tf.distribute`` strategy, log it to MLflow.

:func:`train` is the step (CLI ``mlops train``, Airflow task). It pins the data version, prepares a
job folder (``artifacts/training/<job id>/``), and runs :func:`run_worker` in this process (one worker)
or in N local processes through :mod:`pipelines.training.launcher`. Each worker follows ``TF_CONFIG`` (see
:mod:`pipelines.training.strategy`); ``BackupAndRestore`` checkpoints every epoch into the job folder, so a worker
group that is restarted resumes from its last completed epoch, and a finished job is never trained twice.

Only the chief (worker 0) talks to MLflow: params, per-epoch metrics, dataset lineage, tags, the model
(signature and input example), curves, confusion matrix and per-class table. Its result is written to
``result.json`` in the job folder, which is what :func:`train` returns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import PipelineError
from pipelines.files import write_json_atomic
from pipelines.project import Project

if TYPE_CHECKING:
    from pipelines.training.callbacks import ProgressLog

JOB_FILE = "job.json"
RESULT_FILE = "result.json"
RUN_ID_FILE = "mlflow_run_id"
RESULT_ARTIFACT = "training/result.json"


class TrainingError(PipelineError):
    """Training could not start or did not finish."""


@dataclass(frozen=True)
class TrainResult:
    """What a finished training job produced: the MLflow run, its model and how it was trained."""

    run_id: str
    run_name: str
    model_uri: str
    data_version: str
    strategy: str
    replicas: int
    global_batch_size: int
    epochs: int
    first_epoch_of_last_attempt: int
    val_accuracy: float
    samples_per_second: float
    weights_checksum: float
    job_dir: str
    reused: bool = False
    """True when an earlier run with the same data, code and parameters was returned instead of training."""


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
) -> TrainResult:
    """Train a candidate on ``data_version`` (default: the workspace's current version) and log it.

    ``workers`` > 1 starts that many local worker processes with ``MultiWorkerMirroredStrategy``.
    Re-running a ``job_id`` whose training finished returns its result without training again;
    re-running one that was interrupted resumes from its last checkpoint. When a finished run has the same
    :func:`~pipelines.training.fingerprint.training_fingerprint` (data, code, parameters), it is returned
    with ``reused=True`` and nothing is trained, unless ``force``.
    """
    from pipelines.data.versioning import checkout_data, current_version
    from pipelines.training.fingerprint import training_fingerprint
    from pipelines.training.inputs import split_files

    if workers < 1:
        raise TrainingError(f"--workers must be at least 1, got {workers}")
    workspace_version = current_version(project)
    if data_version and data_version != workspace_version:
        checkout_data(project, data_version)
        workspace_version = data_version
    if not workspace_version:
        raise TrainingError(f"{project.root / 'data.dvc'}: no data version yet (run `mlops version` first)")
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
        spec = {"data_version": workspace_version, "run_name": run_name, "job_id": job_id, "fingerprint": fingerprint}
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


def run_worker(project: Project, job_dir: Path) -> None:
    """Train as one worker of the cluster in ``$TF_CONFIG`` (or alone), resuming from ``job_dir``'s backup."""
    import tensorflow as tf
    import tf_keras

    from models.architectures import build_model
    from pipelines.training.callbacks import ProgressLog
    from pipelines.training.inputs import input_shape, make_dataset, split_files
    from pipelines.training.strategy import build_strategy, current_plan

    config = project.config
    spec = json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8"))
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
            optimizer=tf_keras.optimizers.Adam(config.train.learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )

    tracker = _ChiefTracker(project, job_dir, spec, plan, replicas, global_batch) if plan.is_chief else None
    progress = ProgressLog(job_dir / f"progress-worker-{plan.worker_index}.jsonl", global_batch * steps_per_epoch)
    callbacks: list[Any] = [tf_keras.callbacks.BackupAndRestore(str(job_dir / "backup")), progress]
    if tracker is not None:
        from mlflow.tensorflow.callback import MlflowCallback

        # Per-epoch metrics, the optimizer's settings and the model summary (MLflow ships it untyped).
        callbacks.append(MlflowCallback())  # type: ignore[no-untyped-call]
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


class _ChiefTracker:
    """MLflow logging done by the chief only: run start or resume, per-epoch metrics, model, artifacts."""

    def __init__(
        self, project: Project, job_dir: Path, spec: dict[str, str], plan: Any, replicas: int, global_batch: int
    ) -> None:
        import mlflow

        from pipelines.tracking import airflow_context_tags, connect, flatten, git_commit, with_retries

        self.project, self.job_dir, self.spec, self.plan = project, job_dir, spec, plan
        self.replicas, self.global_batch = replicas, global_batch
        connect(project)
        run_id_file = job_dir / RUN_ID_FILE
        previous = run_id_file.read_text(encoding="utf-8").strip() if run_id_file.exists() else None
        run = with_retries(
            lambda: mlflow.start_run(run_id=previous) if previous else mlflow.start_run(run_name=spec["run_name"]),
            "start the training run",
        )
        self.run_id = str(run.info.run_id)
        if previous:
            return
        run_id_file.write_text(self.run_id + "\n", encoding="utf-8")
        config = project.config
        params = flatten("", config.model_dump(mode="json", by_alias=True))
        params.update({"strategy": plan.kind, "replicas": str(replicas), "global_batch_size": str(global_batch)})
        params["workers"] = str(plan.num_workers)
        mlflow.log_params(params)
        tags = {
            "data_version": spec["data_version"],
            "dataset": config.dataset.name,
            "classes": ",".join(config.dataset.classes),
            "git_commit": git_commit(project.root),
            "training_job": spec["job_id"],
        }
        if spec.get("fingerprint"):
            from pipelines.training.fingerprint import FINGERPRINT_TAG

            tags[FINGERPRINT_TAG] = spec["fingerprint"]
        tags.update(airflow_context_tags())
        mlflow.set_tags(tags)
        self._log_inputs()

    def _log_inputs(self) -> None:
        import mlflow
        import pandas as pd
        from mlflow.data.pandas_dataset import from_pandas

        from pipelines.data.manifest import read_manifest

        version = self.spec["data_version"]
        rows = read_manifest(self.project.manifest_path)
        source = str(self.project.data_dir)
        for split in ("train", "val", "test"):
            frame = pd.DataFrame([asdict(row) for row in rows if row.split == split])
            dataset = from_pandas(
                frame,
                source=source,
                targets="label",
                name=f"{self.project.config.dataset.name}-{split}",
                digest=version,
            )
            mlflow.log_input(dataset, context=split, tags={"data_version": version})

    def finish(self, weights: list[Any], checksum: float, progress: ProgressLog) -> None:
        import mlflow
        import tensorflow as tf

        from models.architectures import build_model
        from pipelines.release.metrics import classification_metrics
        from pipelines.training.inputs import input_shape, load_arrays
        from pipelines.training.model_format import log_model
        from pipelines.training.reports import log_classification_artifacts, log_training_curves

        config = self.project.config
        with tf.distribute.get_strategy().scope():
            plain = build_model(config.train.architecture, input_shape(self.project), len(config.dataset.classes))
        plain.set_weights(weights)
        val_x, val_y = load_arrays(self.project, "val")
        probabilities = plain.predict(val_x, batch_size=256, verbose=0)
        val_metrics = classification_metrics(val_y, probabilities, config.dataset.classes)
        log_model(plain, config.dataset.classes, example=val_x[:5])
        log_training_curves(self.job_dir)
        profile = self.project.dataset_dir / "profile.json"
        if profile.is_file():
            mlflow.log_artifact(str(profile), artifact_path="data")
        log_classification_artifacts(val_metrics, config.dataset.classes, prefix="val")
        samples_per_second = float(progress.samples_per_second())
        mlflow.log_metrics(
            {
                "samples_per_second": samples_per_second,
                "val_macro_f1": val_metrics.macro_f1,
                "weights_checksum": checksum,
            }
        )
        result = TrainResult(
            run_id=self.run_id,
            run_name=self.spec["run_name"],
            model_uri=f"runs:/{self.run_id}/model",
            data_version=self.spec["data_version"],
            strategy=self.plan.kind,
            replicas=self.replicas,
            global_batch_size=self.global_batch,
            epochs=config.train.epochs,
            first_epoch_of_last_attempt=max(progress.first_epoch, 0),
            val_accuracy=float(val_metrics.accuracy),
            samples_per_second=samples_per_second,
            weights_checksum=checksum,
            job_dir=str(self.job_dir),
        )
        mlflow.log_dict(asdict(result), RESULT_ARTIFACT)
        mlflow.flush_async_logging()  # MlflowCallback logs epochs asynchronously
        mlflow.end_run()
        write_json_atomic(self.job_dir / RESULT_FILE, asdict(result))


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
