"""Run the benchmarks: ``python -m benchmarks.run [--only NAME[,NAME]] [--quick] [--keep]`` from the repo root.

Names: ``training``, ``quality``, ``peer``, ``make_run``, ``scheduled``, ``parse``, ``scaling``, ``ingest``,
``data_half``, ``gpu``, ``serving`` (default: all, in that order). ``quality`` trains the defaults against
alternatives (test and validation accuracy, determinism). ``data_half`` is the data half at scale: ingest + validate +
version of 100,000 generated 32x32 PNGs through ``python -m pipelines.cli`` (target < 120 s, peak memory < 2 GiB),
then augment and one retrain epoch on that data in their own rows (``--quick``: 2,000 images).
Each works in its own folder under one temporary directory, with ``MLFLOW_TRACKING_URI`` (and
``TF_CONFIG``, ``AIRFLOW_HOME``, ``MLOPS_PARAMS``) unset, so every store is that folder's. Progress goes
to stderr; the Markdown table goes to stdout and ``benchmarks/results.md``; everything measured, with
machine information, goes to ``benchmarks/results.json``. Exit status 1 if a benchmark failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.common import BENCH_DIR, Context, Outcome, Row, Sizes, clean_environ, log

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PACKAGES = ("tensorflow", "tf-keras", "apache-airflow", "mlflow", "dvc", "great-expectations", "pillow", "numpy")


def _benchmarks() -> dict[str, tuple[Callable[[Context], Outcome], str]]:
    from benchmarks.data_half import bench_data_half
    from benchmarks.e2e import bench_scheduled
    from benchmarks.gpu import bench_gpu
    from benchmarks.ingestion import bench_ingest
    from benchmarks.make_run import bench_make_run
    from benchmarks.parsing import bench_parse
    from benchmarks.peer import bench_peer
    from benchmarks.quality import bench_quality
    from benchmarks.serving import bench_serving
    from benchmarks.training import bench_scaling, bench_training

    return {
        "training": (bench_training, "training throughput: pipeline train() vs plain model.fit"),
        "peer": (bench_peer, "the TFX peer: its environment (built once) and one whole-process run"),
        "make_run": (bench_make_run, "warm make run vs the TFX peer and a plain script; promote; per-step breakdown"),
        "scheduled": (bench_scheduled, "retrain and promote through airflow standalone and the REST API"),
        "parse": (bench_parse, "parse time of each DAG file"),
        "scaling": (bench_scaling, "one local worker vs two"),
        "ingest": (bench_ingest, "ingest / validate / version speed on generated PNGs, ingest profile"),
        "quality": (bench_quality, "test accuracy of the training defaults against alternatives, determinism"),
        "data_half": (bench_data_half, "ingest + validate + version of 100k PNGs via the CLI; augment; an epoch"),
        "gpu": (bench_gpu, "GPU utilisation during training"),
        "serving": (bench_serving, "prediction service vs mlflow models serve, swaps under load, memory"),
    }


NAMES = (
    "training",
    "quality",
    "peer",
    "make_run",
    "scheduled",
    "parse",
    "scaling",
    "ingest",
    "data_half",
    "gpu",
    "serving",
)


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, OS, Python and the versions of the packages that matter."""
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = None
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory_gb = round(pages * page_size / 1e9, 1)
    except (ValueError, OSError):
        pass
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gb": memory_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "tf_version": versions["tensorflow"],
        "packages": versions,
        "gpu_tool": shutil.which("nvidia-smi"),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[Row], machine: dict[str, Any], started: str, quick: bool, seconds: float) -> str:
    """The results table in Markdown, with a line on the machine and the mode."""
    mode = "quick (smoke sizes)" if quick else "full"
    lines = [
        "# Benchmark results",
        "",
        f"{started} UTC, {mode}, {seconds / 60:.1f} min. Machine: {machine['cores']} cores "
        f"({machine['cpu_model'] or 'unknown CPU'}), {machine['memory_gb']} GB, Python {machine['python']}, "
        f"TensorFlow {machine['tf_version']}; 1-minute load average at start "
        f"{machine['load_average_at_start'][0]:.1f}. Ratio = value / baseline.",
        "",
        "| benchmark | measure | value | baseline | ratio | note |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        cells = (row.benchmark, row.measure, row.value, row.baseline, row.ratio, row.note)
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def parse_names(only: str | None) -> list[str]:
    """The benchmarks selected by ``--only`` (comma-separated), in the canonical order."""
    if not only:
        return list(NAMES)
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(NAMES))
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {unknown}; expected names from {list(NAMES)}")
    return [name for name in NAMES if name in wanted]


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks, write results.json and results.md, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(NAMES)}")
    parser.add_argument("--quick", action="store_true", help="shrink every benchmark for a smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary projects and logs")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR, help="where results.json/.md and the profile go")
    args = parser.parse_args(argv)
    names = parse_names(args.only)

    clean_environ()
    os.chdir(BENCH_DIR.parent)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="mlops-bench-"))
    ctx = Context(tmp=tmp, quick=args.quick, sizes=Sizes.for_mode(args.quick), out_dir=args.out_dir.resolve())
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    started = time.monotonic()
    machine = machine_info()
    load = os.getloadavg()[0]
    if load > 0.5 * (machine["cores_available"] or 1):
        log(f"warning: load average {load:.1f} on {machine['cores_available']} CPUs: other processes disturb timings")
    log(f"benchmarks {', '.join(names)} ({'quick' if args.quick else 'full'}); temporary projects in {tmp}")
    registry = _benchmarks()
    results: dict[str, Any] = {}
    rows: list[Row] = []
    failed = []
    for name in names:
        run, description = registry[name]
        load_before = os.getloadavg()
        log(f"{name}: {description} (load average {load_before[0]:.1f})")
        begun = time.monotonic()
        try:
            outcome = run(ctx)
        except Exception as error:
            failed.append(name)
            log(f"{name}: FAILED: {error}")
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            results[name] = {"status": "failed", "error": str(error), "traceback": traceback.format_exc()}
            rows.append(Row(name, "error", "FAILED", note=first_line[:200]))
        else:
            results[name] = {"status": "ok", **outcome.as_json()}
            rows.extend(outcome.rows)
        results[name]["seconds"] = time.monotonic() - begun
        results[name]["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
        log(f"{name}: done in {results[name]['seconds']:.0f} s")

    total = time.monotonic() - started
    document = {
        "started_at_utc": started_at,
        "mode": "quick" if args.quick else "full",
        "seconds": total,
        "machine": machine,
        "sizes": asdict(ctx.sizes),
        "benchmarks": results,
    }
    (ctx.out_dir / RESULTS_JSON).write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    table = markdown(rows, machine, started_at, args.quick, total)
    (ctx.out_dir / RESULTS_MD).write_text(table, encoding="utf-8")
    print(table)
    if args.keep or failed:
        log(f"temporary projects and logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"results in {ctx.out_dir / RESULTS_JSON} and {ctx.out_dir / RESULTS_MD}; {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
