"""Training throughput against plain ``model.fit``, and one worker against two local workers.

``training``: the pipeline's training step (:func:`pipelines.training.train.train`, one process) on the digits sample,
against ``model.fit(x, y)`` on in-memory numpy arrays of the same files (originals + augmented copies),
with the same architecture, optimizer, global batch, epochs and seed. Both are timed per epoch from
``on_epoch_begin`` to ``on_epoch_end`` with the first epoch left out, as ``ProgressLog`` does. Two more
plain runs add, one at a time, what the pipeline's timed epoch also holds (a validation pass, then a
``BackupAndRestore`` checkpoint), to attribute any gap. Every run is its own process, in interleaved
rounds; the ratio of the medians is reported, with the range of the per-round ratios.

``scaling``: ``train(project, workers=1)`` against ``workers=2`` (MultiWorkerMirroredStrategy over local
processes), both with ``TF_NUM_INTRAOP_THREADS=1`` and ``TF_NUM_INTEROP_THREADS=1``, worker i pinned to
CPU i when there are enough CPUs; efficiency = sps2 / (2 * sps1).
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.common import (
    Context,
    Outcome,
    Row,
    child_env,
    digits_project,
    fmt,
    log,
    median,
    ratio,
    run_child,
    training_overrides,
)

BASELINE_VARIANTS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "baseline_val": ("--validation",),
    "baseline_val_backup": ("--validation", "--backup-dir"),
}


def bench_training(ctx: Context) -> Outcome:
    """Pipeline ``train()`` samples/s vs plain ``model.fit`` on numpy arrays, same samples and model."""
    root = ctx.folder("training")
    params = digits_project(root / "project", training_overrides(ctx))
    logs = root / "logs"
    logs.mkdir()
    runs: dict[str, list[dict[str, Any]]] = {"pipeline": [], **{name: [] for name in BASELINE_VARIANTS}}
    rounds = ctx.sizes.training_rounds
    for index in range(rounds):
        log(f"  round {index + 1}/{rounds}: pipeline train()")
        result, wall = run_child(
            ["train-pipeline", "--params", str(params), "--job-id", f"bench-{index}"], logs / f"pipeline-{index}.log"
        )
        runs["pipeline"].append({**result, "process_seconds": wall})
        for name, flags in BASELINE_VARIANTS.items():
            log(f"  round {index + 1}/{rounds}: {name}")
            args = ["train-baseline", "--params", str(params), *flags]
            if "--backup-dir" in flags:
                args.append(str(root / f"backup-{index}"))
            result, wall = run_child(args, logs / f"{name}-{index}.log")
            runs[name].append({**result, "process_seconds": wall})

    sps = {name: median([float(run["samples_per_second"]) for run in values]) for name, values in runs.items()}
    pipeline_sps, baseline_sps = sps["pipeline"], sps["baseline"]
    per_round = [
        float(pipe["samples_per_second"]) / float(base["samples_per_second"])
        for pipe, base in zip(runs["pipeline"], runs["baseline"], strict=True)
        if float(base["samples_per_second"]) > 0
    ]
    spread = f"per-round ratios {min(per_round):.2f}-{max(per_round):.2f}" if per_round else "no per-round ratio"
    first = runs["pipeline"][0]
    setup = f"{first['epochs']} epochs, batch {first['global_batch_size']}, median of {rounds}, first epoch excluded"
    rows = [
        Row(
            "training",
            "samples/s: pipeline train() vs plain model.fit",
            fmt(pipeline_sps, 0),
            fmt(baseline_sps, 0),
            fmt(ratio(pipeline_sps, baseline_sps)),
            f"target >= 1.0; {setup}; {spread}",
        ),
        Row(
            "training",
            "samples/s: plain fit + validation each epoch (attribution)",
            fmt(sps["baseline_val"], 0),
            fmt(baseline_sps, 0),
            fmt(ratio(sps["baseline_val"], baseline_sps)),
            "this loop is timed with its validation pass; the pipeline's timing stops before validation",
        ),
        Row(
            "training",
            "samples/s: plain fit + validation + BackupAndRestore (attribution)",
            fmt(sps["baseline_val_backup"], 0),
            fmt(baseline_sps, 0),
            fmt(ratio(sps["baseline_val_backup"], baseline_sps)),
            f"pipeline / this = {fmt(ratio(pipeline_sps, sps['baseline_val_backup']))} (tf.data vs numpy input)",
        ),
    ]
    data = {
        "samples_per_second": sps,
        "ratio_pipeline_to_baseline": ratio(pipeline_sps, baseline_sps),
        "ratio_pipeline_to_baseline_val_backup": ratio(pipeline_sps, sps["baseline_val_backup"]),
        "per_round_ratios": per_round,
        "target": ">= 1.0",
        "rounds": rounds,
        "runs": runs,
    }
    return Outcome(rows, data)


def bench_scaling(ctx: Context) -> Outcome:
    """One local worker vs two, one TensorFlow thread each; scaling efficiency sps2 / (2 * sps1)."""
    root = ctx.folder("scaling")
    params = digits_project(root / "project", training_overrides(ctx))
    logs = root / "logs"
    logs.mkdir()
    env = child_env({"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"})
    cpus = len(os.sched_getaffinity(0))
    pin = cpus >= 2
    runs: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
    rounds = ctx.sizes.scaling_rounds
    for index in range(rounds):
        for workers in ("1", "2"):
            log(f"  round {index + 1}/{rounds}: train(workers={workers})")
            args = ["train-pipeline", "--params", str(params), "--job-id", f"scale-{workers}w-{index}"]
            args += ["--workers", workers] + (["--pin"] if pin else [])
            result, wall = run_child(args, logs / f"workers-{workers}-{index}.log", env=env)
            runs[workers].append({**result, "process_seconds": wall})
    sps1 = median([float(run["samples_per_second"]) for run in runs["1"]])
    sps2 = median([float(run["samples_per_second"]) for run in runs["2"]])
    efficiency = sps2 / (2 * sps1) if sps1 and sps2 is not None else None
    pinning = "worker i pinned to CPU i" if pin else "not pinned (fewer than 2 CPUs available)"
    threads = "TF_NUM_INTRAOP_THREADS=TF_NUM_INTEROP_THREADS=1"
    rows = [
        Row("scaling", "samples/s: 1 worker", fmt(sps1, 0), note=f"{threads}; {pinning}; median of {rounds}"),
        Row(
            "scaling",
            "samples/s: 2 local workers (MultiWorkerMirrored)",
            fmt(sps2, 0),
            fmt(sps1, 0),
            fmt(ratio(sps2, sps1)),
            f"global batch {runs['2'][0]['global_batch_size']} vs {runs['1'][0]['global_batch_size']}",
        ),
        Row("scaling", "scaling efficiency sps2 / (2 x sps1)", fmt(efficiency), note="1.0 = linear"),
    ]
    data = {
        "samples_per_second": {"1": sps1, "2": sps2},
        "efficiency": efficiency,
        "pinned": pin,
        "threads_env": {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"},
        "rounds": rounds,
        "runs": runs,
    }
    return Outcome(rows, data)
