"""Launch N training workers on this host, each with its own ``TF_CONFIG``, and supervise them.

Workers listen on free ports of 127.0.0.1 and run ``python -m pipelines.training.train``. Their output is
streamed with a ``[worker i]`` prefix. If one worker fails, all are stopped; with ``max_restarts`` left,
the whole group is started again with the same ``TF_CONFIG`` and resumes from the last epoch that
``BackupAndRestore`` saved (MultiWorkerMirroredStrategy cannot continue with a member missing).
An Airflow task on one GPU host calls the same function.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO

from pipelines.errors import PipelineError
from pipelines.files import write_json_atomic

WORKERS_FILE = "workers.json"
STOP_GRACE_SECONDS = 10.0


class LaunchError(PipelineError):
    """A training worker failed and no restart was left."""

    retryable = True


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that are free right now."""
    sockets = []
    try:
        for _ in range(count):
            handle = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            handle.bind(("127.0.0.1", 0))
            sockets.append(handle)
        return [int(handle.getsockname()[1]) for handle in sockets]
    finally:
        for handle in sockets:
            handle.close()


def tf_configs(ports: list[int]) -> list[str]:
    """One ``TF_CONFIG`` JSON per worker of a cluster on 127.0.0.1 ``ports``; worker 0 is the chief."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}) for index in range(len(ports))]


def visible_gpus(environ: dict[str, str] | None = None) -> list[str]:
    """The GPUs of this host that workers may use: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``."""
    environ = dict(os.environ) if environ is None else environ
    configured = environ.get("CUDA_VISIBLE_DEVICES")
    if configured is not None:
        return [item.strip() for item in configured.split(",") if item.strip() and item.strip() != "-1"]
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(index) for index, line in enumerate(listed.stdout.splitlines()) if line.startswith("GPU ")]


def gpu_assignments(workers: int, gpus: list[str]) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` of each worker: the host's GPUs split evenly, or None (leave as is)."""
    if not gpus or len(gpus) < workers:
        return [None] * workers
    share = len(gpus) // workers
    return [",".join(gpus[index * share : (index + 1) * share]) for index in range(workers)]


def _stream(prefix: str, pipe: IO[str], tail: deque[str]) -> None:
    for line in pipe:
        tail.append(line.rstrip("\n"))
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()


def _stop(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_workers(
    params_path: Path, job_dir: Path, workers: int, max_restarts: int = 0, extra_env: dict[str, str] | None = None
) -> None:
    """Run ``workers`` training processes for the job in ``job_dir`` until all succeed.

    Raises :class:`LaunchError` naming the worker, its exit code and its last lines when a worker fails
    and ``max_restarts`` restarts of the whole group are used up.
    """
    ports = free_ports(workers)
    configs = tf_configs(ports)
    # On a GPU host each worker gets its own GPUs (one process per GPU group, NCCL between them).
    devices = gpu_assignments(workers, visible_gpus())
    command = [
        sys.executable,
        "-m",
        "pipelines.training.train",
        "--params",
        str(params_path),
        "--job-dir",
        str(job_dir),
    ]
    for attempt in range(max_restarts + 1):
        if attempt:
            print(f"[launcher] restarting all {workers} workers (restart {attempt} of {max_restarts})", flush=True)
        processes: list[subprocess.Popen[str]] = []
        tails: list[deque[str]] = []
        threads: list[threading.Thread] = []
        try:
            for index, tf_config in enumerate(configs):
                env = {**os.environ, **(extra_env or {}), "TF_CONFIG": tf_config, "TF_USE_LEGACY_KERAS": "1"}
                env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
                if devices[index] is not None:
                    env["CUDA_VISIBLE_DEVICES"] = str(devices[index])
                env["PYTHONUNBUFFERED"] = "1"
                process = subprocess.Popen(
                    command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
                )
                processes.append(process)
                tail: deque[str] = deque(maxlen=20)
                tails.append(tail)
                assert process.stdout is not None
                thread = threading.Thread(target=_stream, args=(f"[worker {index}]", process.stdout, tail), daemon=True)
                thread.start()
                threads.append(thread)
            _write_workers_file(job_dir, attempt, ports, processes)
            failed = _wait_for_first_failure(processes)
        finally:
            _stop(processes)
            for thread in threads:
                thread.join(timeout=5)
        if failed is None:
            return
        index, code = failed
        message = f"worker {index} exited with code {code}"
        if attempt == max_restarts:
            last = "\n".join(f"    {line}" for line in tails[index])
            raise LaunchError(f"{message}; all workers stopped. Last lines of worker {index}:\n{last}")
        print(f"[launcher] {message}; stopping the other workers", flush=True)


def _write_workers_file(job_dir: Path, attempt: int, ports: list[int], processes: list[subprocess.Popen[str]]) -> None:
    payload = {"attempt": attempt, "ports": ports, "pids": [process.pid for process in processes]}
    write_json_atomic(job_dir / WORKERS_FILE, payload)


def _wait_for_first_failure(processes: list[subprocess.Popen[str]]) -> tuple[int, int] | None:
    """Wait until every process has exited 0 (return None) or one has failed (return its index and code)."""
    while True:
        codes = [process.poll() for process in processes]
        for index, code in enumerate(codes):
            if code is not None and code != 0:
                return index, code
        if all(code == 0 for code in codes):
            return None
        time.sleep(0.2)
