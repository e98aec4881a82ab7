"""The chief's MLflow run of a training job, and the result it records.

Only the chief (worker 0) talks to MLflow: :class:`ChiefTracker` starts the run (or resumes it after a restart,
from ``mlflow_run_id`` in the job folder), logs params, tags and dataset lineage, and at the end the model
(signature and input example), curves, confusion matrix and per-class table. The :class:`TrainResult` it writes
to ``result.json`` in the job folder, and logs as ``training/result.json``, is what
:func:`pipelines.training.train.train` returns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.files import write_json_atomic
from pipelines.project import Project

if TYPE_CHECKING:
    from pipelines.training.callbacks import ProgressLog

RESULT_FILE = "result.json"
RUN_ID_FILE = "mlflow_run_id"
RESULT_ARTIFACT = "training/result.json"


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


class ChiefTracker:
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
            lambda: (
                mlflow.start_run(run_id=previous)
                if previous
                else mlflow.start_run(run_name=spec["run_name"], parent_run_id=spec.get("parent_run_id") or None)
            ),
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
        if spec.get("candidate"):
            tags["candidate"] = spec["candidate"]
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
        """Log the trained model, its validation metrics and artifacts; end the run and write ``result.json``."""
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
        mlflow.end_run()
        write_json_atomic(self.job_dir / RESULT_FILE, asdict(result))
