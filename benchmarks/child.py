"""The measured work of the benchmarks, each in a fresh process: ``python -m benchmarks.child COMMAND ... --out FILE``.

Commands (each writes one JSON object to ``--out``):

``train-pipeline``  the pipeline's training step, :func:`pipelines.training.train.train` (1 or N local workers);
``train-baseline``  plain ``model.fit`` on in-memory numpy arrays of the same files, model and optimizer;
``plain-retrain``   a plain script: load the digits, fit, evaluate, log one MLflow run;
``parse-dag``       time ``import airflow.sdk``, then the import of one DAG file;
``gpu-check``       the GPUs TensorFlow sees.

A fresh process per measurement keeps TensorFlow's state (thread pools, traced functions, the seed, the
mixed-precision policy) of one run out of the next. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HEAVY_MODULES = ("tensorflow", "tf_keras", "keras", "mlflow", "great_expectations", "dvc", "pandas", "sklearn")


def _write(out: Path, payload: dict[str, Any]) -> None:
    out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _pin_process(pid: int, cpu: int) -> int:
    """Pin every thread of ``pid`` to ``cpu`` (threads created later inherit it); return how many were pinned."""
    pinned = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), {cpu})
            pinned += 1
        except OSError:
            continue
    return pinned


def _pin_workers(workers_file: Path, cpus: list[int], stop: threading.Event, record: dict[str, Any]) -> None:
    """Pin worker i of the launcher's ``workers.json`` to ``cpus[i]`` until ``stop`` (catches new threads)."""
    while not stop.wait(0.5):
        try:
            pids = [int(pid) for pid in json.loads(workers_file.read_text(encoding="utf-8"))["pids"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        for index, pid in enumerate(pids):
            cpu = cpus[index % len(cpus)]
            if _pin_process(pid, cpu):
                record[str(pid)] = cpu


def _epoch_seconds(progress_file: Path) -> list[float]:
    if not progress_file.is_file():
        return []
    lines = progress_file.read_text(encoding="utf-8").splitlines()
    return [float(json.loads(line)["seconds"]) for line in lines if line.strip()]


def _optimizer(train_cfg: dict[str, Any], steps_per_epoch: int) -> Any:
    """The pipeline's optimizer (``pipelines.training.train._optimizer``), written out plainly.

    ``train.optimizer`` (Adam by default) over a cosine decay of ``train.learning_rate`` to 0 across all
    ``train.epochs * steps_per_epoch`` steps of the run, from tf-keras.
    """
    import tf_keras

    rate = tf_keras.optimizers.schedules.CosineDecay(
        float(train_cfg["learning_rate"]), decay_steps=int(train_cfg["epochs"]) * steps_per_epoch
    )
    name = str(train_cfg.get("optimizer", "adam"))
    if name == "sgd":
        return tf_keras.optimizers.SGD(rate, momentum=float(train_cfg.get("momentum", 0.9)))
    if name == "adagrad":
        return tf_keras.optimizers.Adagrad(rate)
    return tf_keras.optimizers.Adam(rate)


def train_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's training step on the project of ``--params``, as ``train`` runs it."""
    cpus = _cpus()
    pin = bool(args.pin) and len(cpus) >= args.workers
    if pin and args.workers == 1:
        os.sched_setaffinity(0, {cpus[0]})

    from pipelines.project import Project
    from pipelines.training.train import job_dir_for, train

    project = Project.load(args.params)
    job_dir = job_dir_for(project, args.job_id)
    pinned: dict[str, Any] = {}
    stop = threading.Event()
    watcher = None
    if pin and args.workers > 1:
        watcher = threading.Thread(
            target=_pin_workers, args=(job_dir / "workers.json", cpus, stop, pinned), daemon=True
        )
        watcher.start()
    started = time.perf_counter()
    try:
        result = train(project, workers=args.workers, job_id=args.job_id)
    finally:
        stop.set()
        if watcher is not None:
            watcher.join(timeout=5)
    wall = time.perf_counter() - started
    if pin and args.workers == 1:
        pinned = {str(os.getpid()): cpus[0]}
    return {
        **asdict(result),
        "wall_seconds": wall,
        "epoch_seconds": _epoch_seconds(job_dir / "progress-worker-0.jsonl"),
        "pinned": pinned,
        "threads_env": {
            name: os.environ.get(name, "") for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
        },
    }


def _decode_all(files: Any, channels: int) -> Any:
    """A split's PNGs as float32 in [0, 1], shape (N, H, W, C), as ``pipelines.training.inputs.load_arrays`` does."""
    import io

    import numpy as np
    from PIL import Image

    from pipelines.training.inputs import read_images

    mode = "L" if channels == 1 else "RGB"
    images = []
    for png in read_images(files)[0]:
        with Image.open(io.BytesIO(png), formats=["PNG"]) as image:
            images.append(np.asarray(image.convert(mode), dtype=np.float32) / 255.0)
    stacked = np.stack(images)
    return stacked[..., np.newaxis] if stacked.ndim == 3 else stacked


def _epoch_timer() -> Any:
    """A Keras callback timing each epoch from ``on_epoch_begin`` to ``on_epoch_end``, as ProgressLog does."""
    import tf_keras

    class EpochTimer(tf_keras.callbacks.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []
            self._started = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.seconds.append(time.perf_counter() - self._started)

    return EpochTimer()


def train_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """``model.fit(x, y)`` on the same train files (originals + augmented), architecture, optimizer, batch, epochs."""
    from pipelines.project import Project
    from pipelines.training.inputs import input_shape, load_arrays, split_files

    project = Project.load(args.params)
    config = project.config

    import numpy as np
    import tf_keras

    from models.architectures import build_model

    tf_keras.utils.set_random_seed(config.train.seed)
    files = split_files(project, "train", include_augmented=config.train.use_augmented)
    x = _decode_all(files, config.dataset.channels)
    y = np.asarray(files.labels, dtype=np.int64)
    global_batch = config.train.per_replica_batch_size  # one replica, as in the pipeline's single process
    model = build_model(config.train.architecture, input_shape(project), len(config.dataset.classes))
    steps_per_epoch = math.ceil(len(x) / global_batch)
    model.compile(
        optimizer=_optimizer(config.train.model_dump(), steps_per_epoch),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    timer = _epoch_timer()
    callbacks: list[Any] = [timer]
    if args.backup_dir is not None:
        # Before the timer, as in the pipeline: the checkpoint is written inside the timed epoch.
        callbacks.insert(0, tf_keras.callbacks.BackupAndRestore(str(args.backup_dir)))
    extra: dict[str, Any] = {}
    if args.validation:
        extra["validation_data"] = load_arrays(project, "val")
    started = time.perf_counter()
    model.fit(x, y, batch_size=global_batch, epochs=config.train.epochs, callbacks=callbacks, verbose=2, **extra)
    wall = time.perf_counter() - started
    seconds: list[float] = timer.seconds
    timed = seconds[1:] or seconds
    samples = len(x)
    return {
        "samples_per_second": samples * len(timed) / sum(timed) if sum(timed) > 0 else 0.0,
        "samples_per_epoch": samples,
        "global_batch_size": global_batch,
        "epochs": config.train.epochs,
        "epoch_seconds": seconds,
        "fit_seconds": wall,
        "validation": bool(args.validation),
        "backup": args.backup_dir is not None,
    }


def plain_retrain(args: argparse.Namespace) -> dict[str, Any]:
    """A plain script, no orchestration: load the digits, fit, evaluate on a test split, log one MLflow run."""
    phases: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = now - mark
        mark = now

    import mlflow
    import numpy as np
    import tf_keras
    import yaml
    from mlflow.models import infer_signature
    from PIL import Image
    from sklearn.datasets import load_digits

    from models.architectures import build_model

    lap("imports")
    params = yaml.safe_load(Path(args.params).read_text(encoding="utf-8"))
    dataset, train_cfg, augment = params["dataset"], params["train"], params["augment"]
    height, width = dataset["image_size"]
    digits = load_digits()
    images = []
    for pixels in digits.images:
        grey = np.clip(np.rint(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        resized = Image.fromarray(grey, mode="L").resize((width, height), Image.Resampling.BILINEAR)
        images.append(np.asarray(resized, dtype=np.float32) / 255.0)
    x = np.stack(images)[..., np.newaxis]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(train_cfg["seed"]).permutation(len(x))
    n_train, n_val = int(0.7 * len(x)), int(0.15 * len(x))
    train_idx, val_idx, test_idx = np.split(order, [n_train, n_train + n_val])
    # Same work per epoch as the pipeline, which trains on the originals plus augment.copies copies of each:
    # the plain script repeats the originals instead of augmenting them.
    copies = int(augment["copies"]) if augment.get("enabled", True) and train_cfg.get("use_augmented", True) else 0
    train_x, train_y = np.tile(x[train_idx], (1 + copies, 1, 1, 1)), np.tile(y[train_idx], 1 + copies)
    lap("load")

    tf_keras.utils.set_random_seed(train_cfg["seed"])
    model = build_model(train_cfg["architecture"], (height, width, int(dataset["channels"])), len(dataset["classes"]))
    batch = int(train_cfg["per_replica_batch_size"])
    model.compile(
        optimizer=_optimizer(train_cfg, math.ceil(len(train_x) / batch)),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(
        train_x,
        train_y,
        batch_size=batch,
        epochs=train_cfg["epochs"],
        validation_data=(x[val_idx], y[val_idx]),
        verbose=2,
    )
    lap("fit")
    test_loss, test_accuracy = model.evaluate(x[test_idx], y[test_idx], batch_size=256, verbose=0)
    lap("evaluate")

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    experiment = "plain-retrain"
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=(root / "mlartifacts").as_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="plain") as run:
        mlflow.log_params({f"train.{key}": value for key, value in train_cfg.items()})
        for epoch in range(len(history.history["loss"])):
            mlflow.log_metrics({key: float(values[epoch]) for key, values in history.history.items()}, step=epoch)
        mlflow.log_metrics({"test_loss": float(test_loss), "test_accuracy": float(test_accuracy)})
        example = x[test_idx][:5]
        signature = infer_signature(example, np.asarray(model.predict(example, verbose=0)))
        mlflow.tensorflow.log_model(model, name="model", signature=signature, input_example=example)
    lap("log")
    return {
        "phases": phases,
        "run_id": run.info.run_id,
        "test_accuracy": float(test_accuracy),
        "train_samples": len(train_x),
    }


def parse_dag(args: argparse.Namespace) -> dict[str, Any]:
    """Time ``import airflow.sdk``, then importing the DAG file alone (what the DAG processor re-runs)."""
    started = time.perf_counter()
    import airflow.sdk  # noqa: F401

    sdk_seconds = time.perf_counter() - started
    before = set(sys.modules)
    path = Path(args.file).resolve()
    spec = importlib.util.spec_from_file_location(f"bench_dag_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not importable")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    started = time.perf_counter()
    spec.loader.exec_module(module)
    dag_seconds = time.perf_counter() - started
    added = set(sys.modules) - before
    heavy = sorted(name for name in HEAVY_MODULES if name in added)
    return {
        "file": str(path),
        "sdk_seconds": sdk_seconds,
        "dag_seconds": dag_seconds,
        "modules_added": len(added),
        "heavy_modules_added": heavy,
    }


def gpu_check(args: argparse.Namespace) -> dict[str, Any]:
    """The physical GPUs TensorFlow sees."""
    import tensorflow as tf

    return {"gpus": [device.name for device in tf.config.list_physical_devices("GPU")], "tf_version": tf.__version__}


def main(argv: list[str] | None = None) -> int:
    """Run one command and write its JSON answer to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {}

    def command(name: str, handler: Callable[[argparse.Namespace], dict[str, Any]]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name)
        sub.add_argument("--out", type=Path, required=True)
        handlers[name] = handler
        return sub

    sub = command("train-pipeline", train_pipeline)
    sub.add_argument("--params", type=Path, required=True)
    sub.add_argument("--job-id", required=True)
    sub.add_argument("--workers", type=int, default=1)
    sub.add_argument("--pin", action="store_true", help="pin worker i to CPU i")
    sub = command("train-baseline", train_baseline)
    sub.add_argument("--params", type=Path, required=True)
    sub.add_argument("--validation", action="store_true", help="also validate every epoch, as the pipeline does")
    sub.add_argument("--backup-dir", type=Path, help="also checkpoint every epoch with BackupAndRestore")
    sub = command("plain-retrain", plain_retrain)
    sub.add_argument("--params", type=Path, required=True)
    sub.add_argument("--root", type=Path, required=True)
    sub = command("parse-dag", parse_dag)
    sub.add_argument("--file", type=Path, required=True)
    command("gpu-check", gpu_check)

    args = parser.parse_args(argv)
    _write(args.out, handlers[args.command](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
