"""Load a registered model as any MLflow user would, in a clean process, and check it against its own evaluation.

Run by :func:`pipelines.release.infra_check.infra_validate` as ``python -I consumer_check.py ...`` with a
scrubbed environment: isolated mode keeps this project off ``sys.path`` (so its ``TF_USE_LEGACY_KERAS`` and every other
project setting stay out), and the environment holds only what a consumer has (``PATH``, ``HOME``, the
tracking URI and its credentials). It imports nothing but the standard library, numpy and mlflow.

What it checks, in order, each failure exiting 1 with ``error: <why>`` on stderr:

1. ``mlflow.pyfunc.load_model(MODEL_URI)`` loads (timed);
2. the signature takes images of the batch's shape, and the output names every class;
3. the predictions on the logged batch (test images and the probabilities the pipeline computed for them in
   its own process at evaluation) agree to ``--tolerance``, with the same predicted classes;
4. the 95th-percentile latency of ``--latency-batches`` batches of ``--batch-size`` is within ``--budget-ms``.

Prints one JSON line of measurements on success.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


class ContractError(Exception):
    """The model does not meet the contract; the message says how."""


def check(
    model_uri: str, batch_path: str, batch_size: int, latency_batches: int, budget_ms: float, tolerance: float
) -> dict[str, Any]:
    """Run the checks of the module docstring on ``model_uri``; return the measurements."""
    import mlflow
    import numpy as np

    started = time.perf_counter()
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as error:  # whatever a consumer would see
        raise ContractError(f"{model_uri} does not load in a clean process: {type(error).__name__}: {error}") from None
    load_seconds = time.perf_counter() - started

    with np.load(batch_path) as stored:
        images, expected = stored["images"].astype(np.float32), stored["probabilities"]
    signature = model.metadata.signature
    if signature is None:
        raise ContractError(f"{model_uri} has no signature: a client cannot know what to send")
    declared = tuple(signature.inputs.inputs[0].shape or ())
    if tuple(declared[1:]) != images.shape[1:]:
        raise ContractError(
            f"{model_uri}: the signature takes images of shape {declared[1:]}, the batch has {images.shape[1:]}"
        )
    classes = [spec.name for spec in signature.outputs.inputs if spec.name != "class"]
    if len(classes) != expected.shape[1]:
        raise ContractError(
            f"{model_uri}: the output names {len(classes)} classes, the evaluation scored {expected.shape[1]}"
        )

    predictions = model.predict(images)
    actual = np.asarray(predictions[classes].to_numpy(), dtype=np.float64)
    difference = float(np.max(np.abs(actual - expected)))
    if difference > tolerance or not np.array_equal(actual.argmax(axis=1), expected.argmax(axis=1)):
        raise ContractError(
            f"{model_uri}: predictions in a clean process differ from the pipeline's own by up to {difference:.3g} "
            f"(tolerance {tolerance:g})"
        )

    batches = [images[(np.arange(batch_size) + index * batch_size) % len(images)] for index in range(latency_batches)]
    model.predict(batches[0])  # warm-up: the first call traces the graph
    latencies = []
    for batch in batches:
        started = time.perf_counter()
        model.predict(batch)
        latencies.append((time.perf_counter() - started) * 1000.0)
    p95 = float(np.percentile(latencies, 95))
    if p95 > budget_ms:
        raise ContractError(
            f"{model_uri}: p95 batch latency {p95:.1f} ms exceeds promote.p95_latency_budget_ms {budget_ms:g} ms"
        )
    return {
        "load_seconds": round(load_seconds, 3),
        "max_abs_difference": difference,
        "images_compared": len(images),
        "batches": len(batches),
        "batch_size": batch_size,
        "output_shape": [batch_size, len(classes)],
        "p95_latency_ms": round(p95, 3),
        "budget_ms": budget_ms,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -I consumer_check.py --model-uri URI --batch FILE.npz ...``; prints JSON, exits 1 on failure.

    ``--wait`` first imports what loading a model needs, then reads these arguments as one JSON list from
    stdin: a checker started ahead of time (by ``make run``, so its imports overlap the retrain) that still
    loads the model, and only that model, fresh.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--wait"]:
        import mlflow.pyfunc  # noqa: F401  (what a consumer's process imports to load the model)
        import numpy  # noqa: F401
        import tensorflow  # noqa: F401

        argv = [str(item) for item in json.loads(sys.stdin.readline() or "[]")]
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--batch", required=True, help="npz with 'images' and the pipeline's 'probabilities'")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--latency-batches", type=int, required=True)
    parser.add_argument("--budget-ms", type=float, required=True)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)
    try:
        report = check(
            args.model_uri, args.batch, args.batch_size, args.latency_batches, args.budget_ms, args.tolerance
        )
    except ContractError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The verdict is out: skip TensorFlow's and MLflow's interpreter teardown (about a second that the waiting
    # promote task would otherwise count), nothing is left to write.
    os._exit(status)
