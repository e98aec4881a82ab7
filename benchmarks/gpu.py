"""GPU utilisation during training, sampled with ``nvidia-smi``, or a plain statement that there is no GPU.

Nothing is measured, and no number is reported, when TensorFlow sees no GPU.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from typing import Any

from benchmarks.common import Context, Outcome, Row, digits_project, fmt, log, run_child, training_overrides

SAMPLE_SECONDS = 0.5
NO_GPU = "no GPU on this machine"


def _sample(stop: threading.Event, samples: list[dict[str, Any]]) -> None:
    """Append one record per GPU every ``SAMPLE_SECONDS`` until ``stop``."""
    query = ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
    while not stop.wait(SAMPLE_SECONDS):
        completed = subprocess.run(query, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            continue
        now = time.monotonic()
        for line in completed.stdout.strip().splitlines():
            try:
                index, utilisation, memory = (part.strip() for part in line.split(","))
                samples.append({"t": now, "gpu": int(index), "util": float(utilisation), "mem_mib": float(memory)})
            except ValueError:
                continue


def bench_gpu(ctx: Context) -> Outcome:
    """Sample GPU utilisation during the pipeline's training step, if TensorFlow sees a GPU."""
    root = ctx.folder("gpu")
    check, _ = run_child(["gpu-check"], root / "gpu-check.log")
    gpus = list(check["gpus"])
    if not gpus:
        return Outcome(
            [Row("gpu", "GPU utilisation during training", "n/a", note=NO_GPU)], {"gpus": [], "note": NO_GPU}
        )
    if shutil.which("nvidia-smi") is None:
        note = f"TensorFlow sees {len(gpus)} GPU(s) but nvidia-smi is not installed: not sampled"
        return Outcome([Row("gpu", "GPU utilisation during training", "n/a", note=note)], {"gpus": gpus, "note": note})

    params = digits_project(root / "project", training_overrides(ctx))
    samples: list[dict[str, Any]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(stop, samples), daemon=True)
    log(f"  training on {len(gpus)} GPU(s) while sampling nvidia-smi every {SAMPLE_SECONDS} s")
    sampler.start()
    try:
        result, wall = run_child(["train-pipeline", "--params", str(params), "--job-id", "gpu"], root / "train.log")
    finally:
        stop.set()
        sampler.join(timeout=10)
    rows: list[Row] = []
    per_gpu: dict[str, Any] = {}
    for index in sorted({sample["gpu"] for sample in samples}):
        values = [sample for sample in samples if sample["gpu"] == index]
        utilisation = [sample["util"] for sample in values]
        mean = sum(utilisation) / len(utilisation)
        peak_memory = max(sample["mem_mib"] for sample in values)
        per_gpu[str(index)] = {"mean_util": mean, "max_util": max(utilisation), "max_mem_mib": peak_memory}
        rows.append(
            Row(
                "gpu",
                f"GPU {index} utilisation % during train() (mean / max)",
                f"{fmt(mean, 0)} / {fmt(max(utilisation), 0)}",
                note=f"{len(values)} samples, peak memory {peak_memory:.0f} MiB, "
                f"{result['samples_per_second']:.0f} samples/s, {result['strategy']}",
            )
        )
    if not rows:
        rows.append(Row("gpu", "GPU utilisation during training", "n/a", note="nvidia-smi gave no samples"))
    data = {"gpus": gpus, "per_gpu": per_gpu, "train": result, "process_seconds": wall, "samples": samples}
    return Outcome(rows, data)
