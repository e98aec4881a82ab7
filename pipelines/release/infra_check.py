"""Infrastructure validation of a model version, in a fresh process started by ``promote.infra_validate``.

Loads the model through MLflow's generic pyfunc flavour (as a serving platform would), checks its
signature against the dataset's image shape, predicts batches of the test split, checks the output
shape and that each row is a probability distribution, and measures the 95th-percentile batch
latency against ``promote.p95_latency_budget_ms``. Prints one JSON line; exits 1 with a message on failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.errors import PipelineError
from pipelines.project import Project


def check_model(project: Project, model_uri: str) -> dict[str, object]:
    """Run the checks on ``model_uri``; return the measurements or raise :class:`PipelineError`."""
    import mlflow

    from pipelines.tracking import connect
    from pipelines.training.inputs import input_shape, load_arrays

    connect(project)
    settings = project.config.promote
    model = mlflow.pyfunc.load_model(model_uri)
    expected = input_shape(project)
    signature = model.metadata.signature
    if signature is None:
        raise PipelineError(f"{model_uri}: the model has no signature")
    spec = signature.inputs.inputs[0]
    shape = tuple(getattr(spec, "shape", ()) or ())
    if shape[1:] != expected:
        raise PipelineError(f"{model_uri}: signature expects images of shape {shape[1:]}, the dataset has {expected}")
    images, _ = load_arrays(project, "test")
    classes = len(project.config.dataset.classes)
    batch = settings.batch_size
    batches = [images[(np.arange(batch) + i * batch) % len(images)] for i in range(settings.latency_batches)]
    model.predict(batches[0])  # warm-up: the first call traces the graph
    latencies: list[float] = []
    for inputs in batches:
        started = time.perf_counter()
        outputs = np.asarray(model.predict(inputs))
        latencies.append((time.perf_counter() - started) * 1000.0)
        if outputs.shape != (len(inputs), classes):
            raise PipelineError(f"{model_uri}: output shape {outputs.shape}, expected ({len(inputs)}, {classes})")
        if not np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3):
            raise PipelineError(f"{model_uri}: outputs are not probabilities (rows do not sum to 1)")
    p95 = float(np.percentile(latencies, 95))
    if p95 > settings.p95_latency_budget_ms:
        raise PipelineError(
            f"{model_uri}: p95 batch latency {p95:.1f} ms exceeds promote.p95_latency_budget_ms "
            f"{settings.p95_latency_budget_ms:g} ms"
        )
    return {
        "version": model_uri.rsplit("/", 1)[-1],
        "batches": len(batches),
        "batch_size": batch,
        "output_shape": list(outputs.shape),
        "p95_latency_ms": round(p95, 3),
        "budget_ms": settings.p95_latency_budget_ms,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python -m pipelines.release.infra_check --params params.yaml MODEL_URI``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("model_uri")
    args = parser.parse_args(argv)
    try:
        report = check_model(Project.load(args.params), args.model_uri)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        print(
            f"error: {args.model_uri}: could not load or run the model: {type(error).__name__}: {error}",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
