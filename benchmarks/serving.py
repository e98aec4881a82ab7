"""The prediction service under load, against MLflow's own scoring server and a bare in-process model call.

Set-up (a child process): the digits sample through ingest, validation, augmentation, versioning, training,
evaluation, the gate, registration, infra validation and promotion (version 1), plus three more versions of
the same run (what three promotions swap between). Then two servers on 127.0.0.1, given the same load from
this process (which never imports TensorFlow or MLflow) in interleaved rounds, the order alternating, so
that other work on a shared machine weighs on both alike:

* ``mlflow models serve -m models:/NAME/1 --env-manager local`` (its defaults: one worker), JSON tensors;
* this service (``mlops serve``, its defaults), the same images as PNG files (it decodes and normalises them);

``CLIENTS`` threads with one keep-alive ``httpx`` connection each send single-image requests back to back
(bounded in count and time); throughput and p50/p95 latency are measured after a warm-up. Then, with one
client, the served latency against a bare loop calling the SavedModel on one image at a time in a child
process (and the pyfunc model's ``predict``). Then three promotions while the load runs: the alias is moved
(``set_champion`` in a child) and the service is told to deploy (``POST /admin/deploy``); every answer's
version is checked against the swap windows (from the alias move, since the service's own alias poller may
swap first, to the deploy call's return). The service's RSS is sampled throughout (``psutil``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BenchmarkError,
    Context,
    Outcome,
    Row,
    child_env,
    fmt,
    log,
    ratio,
    tail,
    training_overrides,
)

CLIENTS = 8
ROUNDS = 2
MODEL = "digits-classifier"
COPIES = 3


@dataclass
class Answer:
    """One request as the load generator saw it."""

    started: float
    ended: float
    status: int
    version: str = ""


@dataclass
class Load:
    """What one load run produced."""

    answers: list[Answer] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> list[Answer]:
        """The answers with status 200."""
        return [answer for answer in self.answers if answer.status == 200]

    def throughput(self) -> float:
        """Answered requests per second of the run's wall time."""
        return len(self.ok) / self.seconds if self.seconds else 0.0

    @classmethod
    def pooled(cls, loads: Sequence[Load]) -> Load:
        """The answers of several runs together, over their summed wall time."""
        return cls([answer for load in loads for answer in load.answers], sum(load.seconds for load in loads))

    def percentile(self, q: float) -> float:
        """The ``q`` quantile of the answered requests' latency, in ms."""
        latencies = sorted(answer.ended - answer.started for answer in self.ok)
        if not latencies:
            return float("nan")
        return 1000.0 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]


def generate_load(
    send: Callable[[Any], tuple[int, str]],
    clients: int,
    requests: int,
    max_seconds: float,
    stop: threading.Event | None = None,
) -> Load:
    """``clients`` threads each calling ``send(session)`` up to ``requests`` times (or until ``stop``/timeout)."""
    import httpx

    results: list[list[Answer]] = [[] for _ in range(clients)]
    deadline = time.monotonic() + max_seconds

    def client(out: list[Answer]) -> None:
        with httpx.Client(timeout=60) as session:
            for _ in range(requests):
                if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                    return
                started = time.monotonic()
                try:
                    status, version = send(session)
                except httpx.HTTPError:
                    status, version = 0, ""
                out.append(Answer(started, time.monotonic(), status, version))

    threads = [threading.Thread(target=client, args=(out,)) for out in results]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    load = Load(seconds=time.monotonic() - began)
    for out in results:
        load.answers.extend(out)
    load.answers.sort(key=lambda answer: answer.started)
    return load


class RssSampler:
    """Samples a process's resident memory every 50 ms; ``peak()`` since the last ``reset()``."""

    def __init__(self, pid: int) -> None:
        import psutil

        self._process = psutil.Process(pid)
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self._peak = max(self._peak, self._process.memory_info().rss)
            except Exception:  # the process ended
                return

    def reset(self) -> None:
        """Start a new peak."""
        self._peak = 0

    def peak_mb(self) -> float:
        """The highest RSS since the last reset, in MB."""
        return self._peak / 1e6

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(timeout=5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and all its descendants so far."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def start_server(command: Sequence[str], env: dict[str, str], url: str, log_path: Path) -> subprocess.Popen[bytes]:
    """Start a server process and wait until ``url`` answers 200."""
    import httpx

    handle = log_path.open("ab")
    process = subprocess.Popen(list(command), env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(f"{command[0]} exited with {process.returncode}:\n{tail(log_path)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise BenchmarkError(f"{url} did not answer within 300 s:\n{tail(log_path)}")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """Stop a server started by :func:`start_server` (its whole process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_helper(args: Sequence[str], log_path: Path, env: dict[str, str], timeout: float = 1800) -> dict[str, Any]:
    """``python -m benchmarks.serving ARGS --out FILE`` in a child process; its JSON answer."""
    out = log_path.with_suffix(".json")
    out.unlink(missing_ok=True)
    with log_path.open("a", encoding="utf-8") as handle:
        completed = subprocess.run(
            [sys.executable, "-m", "benchmarks.serving", *args, "--out", str(out)],
            env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, check=False,
        )  # fmt: skip
    if completed.returncode != 0 or not out.is_file():
        raise BenchmarkError(f"benchmarks.serving {args[0]} failed ({completed.returncode}):\n{tail(log_path)}")
    answer: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return answer


def swaps_are_exact(load: Load, swaps: list[tuple[str, float, float]], first: str) -> tuple[bool, str]:
    """Whether every answer's version is the one serving when it started/ended, given the swap windows."""
    order = [first, *(version for version, _, _ in swaps)]
    for answer in load.ok:
        allowed = set(order)
        for index, (_, began, done) in enumerate(swaps):
            if answer.ended < began:  # finished before swap i began: an older version
                allowed &= set(order[: index + 1])
            if answer.started > done:  # started after swap i returned: that version or newer
                allowed &= set(order[index + 1 :])
        if answer.version not in allowed:
            return False, f"an answer of version {answer.version} at {answer.started:.3f} (allowed {sorted(allowed)})"
    seen = [answer.version for answer in load.ok]
    missing = [version for version in order if version not in seen]
    if missing:
        return False, f"no answer from versions {missing}"
    return True, ""


def bench_serving(ctx: Context) -> Outcome:
    """Throughput, latency, swaps under load and memory of the service, against MLflow's scoring server."""
    import httpx

    root = ctx.folder("serving")
    logs = root / "logs"
    logs.mkdir()
    requests = 40 if ctx.quick else 150
    max_seconds = 30.0 if ctx.quick else 90.0
    env = child_env({"MLOPS_SERVE_TOKEN": secrets.token_urlsafe(24), "PYTHONWARNINGS": "ignore"})
    token = env["MLOPS_SERVE_TOKEN"]
    log("  set-up: digits sample, train, evaluate, gate, register, infra-validate, promote (child process)")
    overrides = {**training_overrides(ctx), "promote": {"p95_latency_budget_ms": 5000.0}}
    setup = run_helper(
        ["setup", "--root", str(root / "project"), "--overrides", json.dumps(overrides)], logs / "setup.log", env
    )
    params, tracking = setup["params"], setup["tracking_uri"]
    png = Path(setup["image"]).read_bytes()
    tensor = json.dumps({"inputs": setup["model_input"]})
    bin_dir = Path(sys.executable).parent

    mlflow_port, our_port = setup["ports"]
    # MLflow starts `uvicorn` by name: the environment's bin/ must be on PATH, as in an activated environment.
    mlflow_env = {**env, "MLFLOW_TRACKING_URI": tracking, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    mlflow_url = f"http://127.0.0.1:{mlflow_port}/invocations"
    url = f"http://127.0.0.1:{our_port}"

    def send_mlflow(session: Any) -> tuple[int, str]:
        response = session.post(mlflow_url, content=tensor, headers={"Content-Type": "application/json"})
        return response.status_code, "1"

    def send_ours(session: Any) -> tuple[int, str]:
        response = session.post(f"{url}/predict", files={"image": ("digit.png", png)})
        version = response.json().get("model_version", "") if response.status_code == 200 else ""
        return response.status_code, str(version)

    log("  starting mlflow models serve and this service (both idle while the other is measured)")
    mlflow_server = start_server(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}/1", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(mlflow_port)],
        mlflow_env, f"http://127.0.0.1:{mlflow_port}/ping", logs / "mlflow-serve.log",
    )  # fmt: skip
    try:
        ours_process = start_server(
            [sys.executable, "-m", "pipelines.cli", "--params", params, "serve", "--port", str(our_port)],
            env, f"{url}/health", logs / "serve.log",
        )  # fmt: skip
    except BaseException:
        stop_server(mlflow_server)
        raise
    sampler = RssSampler(ours_process.pid)
    try:
        generate_load(send_mlflow, CLIENTS, 10, 60)
        generate_load(send_ours, CLIENTS, 10, 60)
        # Interleaved rounds (the order alternates): other work on a shared machine hits both alike.
        baseline_runs: list[Load] = []
        served_runs: list[Load] = []
        calls = images = 0.0
        cpu = {"ours": 0.0, "mlflow": 0.0}
        one_model_mb = 0.0
        for index in range(ROUNDS if not ctx.quick else 1):
            order = ("mlflow", "ours") if index % 2 == 0 else ("ours", "mlflow")
            for name in order:
                log(f"  round {index + 1}: {name}, {CLIENTS} clients x {requests} requests")
                if name == "mlflow":
                    used = cpu_seconds(mlflow_server.pid)
                    baseline_runs.append(generate_load(send_mlflow, CLIENTS, requests, max_seconds))
                    cpu["mlflow"] += cpu_seconds(mlflow_server.pid) - used
                    continue
                calls_before = _metric(url, "mlops_serve_batch_images_count")
                images_before = _metric(url, "mlops_serve_batch_images_sum")
                sampler.reset()
                used = cpu_seconds(ours_process.pid)
                served_runs.append(generate_load(send_ours, CLIENTS, requests, max_seconds))
                cpu["ours"] += cpu_seconds(ours_process.pid) - used
                one_model_mb = max(one_model_mb, sampler.peak_mb())
                calls += _metric(url, "mlops_serve_batch_images_count") - calls_before
                images += _metric(url, "mlops_serve_batch_images_sum") - images_before
    except BaseException:
        sampler.stop()
        stop_server(ours_process)
        raise
    finally:
        stop_server(mlflow_server)
    ours, baseline = Load.pooled(served_runs), Load.pooled(baseline_runs)
    cpu_ours = 1000.0 * cpu["ours"] / max(len(ours.ok), 1)
    cpu_mlflow = 1000.0 * cpu["mlflow"] / max(len(baseline.ok), 1)
    round_ratios = [
        mine.throughput() / theirs.throughput() for mine, theirs in zip(served_runs, baseline_runs, strict=True)
    ]

    try:
        log("  one client: served latency")
        single = generate_load(send_ours, 1, 200 if not ctx.quick else 50, 60)

        log("  three promotions while the load runs")
        stop = threading.Event()
        box: dict[str, Load] = {}
        loader = threading.Thread(
            target=lambda: box.setdefault("load", generate_load(send_ours, CLIENTS, 1_000_000, 600, stop))
        )
        sampler.reset()
        loader.start()
        time.sleep(2.0)
        swaps: list[tuple[str, float, float]] = []
        deploy_calls: list[float] = []
        for version in setup["copies"]:
            # The swap window opens when the alias moves (the service's own poller may swap first) and closes
            # when the deploy call returns.
            began = time.monotonic()
            run_helper(["promote", "--params", params, "--version", version], logs / f"promote-{version}.log", env)
            called = time.monotonic()
            answer = httpx.post(
                f"{url}/admin/deploy",
                json={"version": version},
                headers={"Authorization": f"Bearer {token}"},
                timeout=300,
            )
            done = time.monotonic()
            if answer.status_code != 200:
                stop.set()
                raise BenchmarkError(f"deploy of version {version} answered {answer.status_code}: {answer.text}")
            swaps.append((version, began, done))
            deploy_calls.append(done - called)
            time.sleep(2.0)
        stop.set()
        loader.join()
        swap_mb = sampler.peak_mb()
        under_swaps = box["load"]
    finally:
        sampler.stop()
        stop_server(ours_process)

    log("  bare in-process model calls (child process)")
    bare = run_helper(["bare", "--params", params, "--image", setup["image"]], logs / "bare.log", env)

    exact, problem = swaps_are_exact(under_swaps, swaps, "1")
    failed = len(under_swaps.answers) - len(under_swaps.ok)
    single_p50 = single.percentile(0.5)
    rows = [
        Row("serving", f"requests/s, {CLIENTS} concurrent single-image clients: this service vs mlflow models serve",
            fmt(ours.throughput(), 0), fmt(baseline.throughput(), 0),
            fmt(ratio(ours.throughput(), baseline.throughput())),
            f"goal >= 2; per round {', '.join(f'{value:.2f}' for value in round_ratios)}; "
            f"{len(ours.ok)} and {len(baseline.ok)} requests; PNG files vs JSON tensors; "
            f"{images / calls if calls else float('nan'):.1f} images per model call under this load"),
        Row("serving", "p95 latency ms under the same load (lower is better)", fmt(ours.percentile(0.95), 1),
            fmt(baseline.percentile(0.95), 1), fmt(ratio(ours.percentile(0.95), baseline.percentile(0.95))),
            f"p50 {ours.percentile(0.5):.1f} vs {baseline.percentile(0.5):.1f} ms"),
        Row("serving", "server CPU ms per request under that load (user + system, all its processes; lower is "
            "better: less sensitive to other work on the machine)", fmt(cpu_ours, 2), fmt(cpu_mlflow, 2),
            fmt(ratio(cpu_ours, cpu_mlflow))),
        Row("serving", "ms per image, one client: served request (p50, HTTP + decode + predict + log) vs bare "
            "SavedModel call in-process (median)", fmt(single_p50, 2), fmt(bare["savedmodel_ms"], 2),
            fmt(ratio(single_p50, bare["savedmodel_ms"])),
            f"pyfunc predict() in-process {bare['pyfunc_ms']:.2f} ms"),
        Row("serving", "failed requests during 3 promotions under load", str(failed), "0", "",
            f"{len(under_swaps.answers)} requests; versions 1 -> {' -> '.join(setup['copies'])}; "
            + ("the served version changed exactly at each swap" if exact else f"NOT exact: {problem}")
            + "; deploy calls " + ", ".join(f"{seconds:.1f} s" for seconds in deploy_calls)),
        Row("serving", "peak RSS MB of the service: one model under load vs during the swaps",
            fmt(one_model_mb, 0), "", "", f"during swaps {swap_mb:.0f} MB ({swap_mb - one_model_mb:+.0f} MB)"),
    ]  # fmt: skip
    data = {
        "ours": {"throughput": ours.throughput(), "p50_ms": ours.percentile(0.5), "p95_ms": ours.percentile(0.95)},
        "mlflow": {"throughput": baseline.throughput(), "p50_ms": baseline.percentile(0.5),
                   "p95_ms": baseline.percentile(0.95)},
        "cpu_ms_per_request": {"ours": cpu_ours, "mlflow": cpu_mlflow},
        "images_per_call": images / calls if calls else None,
        "single_client_p50_ms": single_p50,
        "bare": bare,
        "swaps": {"exact": exact, "problem": problem, "failed": failed, "requests": len(under_swaps.answers),
                  "deploy_call_seconds": deploy_calls,
                  "swap_windows_seconds": [done - began for _, began, done in swaps]},
        "rss_mb": {"one_model": one_model_mb, "during_swaps": swap_mb},
    }  # fmt: skip
    return Outcome(rows, data)


def _metric(url: str, name: str) -> float:
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


# ----------------------------------------------------------------------------- child-process helpers


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    """The digits project with a promoted version 1 and ``COPIES`` more versions of the same run."""
    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    from benchmarks.common import digits_project
    from pipelines.data.images import to_model_input
    from pipelines.data.packs import DatasetReader
    from pipelines.project import Project
    from pipelines.release.evaluate import evaluate_candidate, gate_candidate
    from pipelines.release.infra_check import INFRA_TAG, infra_validate
    from pipelines.release.promote import set_champion
    from pipelines.release.register import register_candidate
    from pipelines.tracking import connect, tracking_uri
    from pipelines.training.inputs import split_files
    from pipelines.training.train import train

    params = digits_project(Path(args.root), json.loads(args.overrides))
    project = Project.load(params)
    run_id = train(project, job_id="bench-serving").run_id
    evaluate_candidate(project, run_id)
    gate_candidate(project, run_id)
    version = register_candidate(project, run_id).version
    infra_validate(project, str(version))
    set_champion(project, str(version), "benchmark: first champion")
    connect(project)
    client = MlflowClient()
    copies = []
    for _ in range(COPIES):
        copy = str(mlflow.register_model(f"runs:/{run_id}/model", MODEL).version)
        client.set_model_version_tag(MODEL, copy, "gate", "passed")
        client.set_model_version_tag(MODEL, copy, INFRA_TAG, f"passed (benchmark: the same run as version {version})")
        copies.append(copy)
    test_files = split_files(project, "test")
    with DatasetReader(test_files.dataset_dir) as reader:  # a member of images.zip, not a file
        png = reader.read(test_files.paths[0], test_files.max_bytes)
    image = str(Path(args.root) / "test-image.png")
    Path(image).write_bytes(png)
    model_input = to_model_input(png)[np.newaxis].tolist()
    return {
        "params": str(params),
        "tracking_uri": tracking_uri(project),
        "image": image,
        "model_input": model_input,
        "copies": copies,
        "ports": [_free_port(), _free_port()],
    }


def _free_port() -> int:
    import socket

    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return int(handle.getsockname()[1])


def _promote(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.project import Project
    from pipelines.release.promote import set_champion

    result = set_champion(Project.load(Path(args.params)), args.version, "benchmark: promotion under load")
    return {"version": result.version, "previous": result.previous}


def _bare(args: argparse.Namespace) -> dict[str, Any]:
    """Median ms of one-image calls: the SavedModel's serving function, and the pyfunc model's predict()."""
    import tempfile

    import mlflow
    import numpy as np
    import tensorflow as tf

    from pipelines.data.images import to_model_input
    from pipelines.project import Project
    from pipelines.tracking import connect

    project = Project.load(Path(args.params))
    connect(project)
    image = to_model_input(Path(args.image).read_bytes())[np.newaxis]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}/1")
    with tempfile.TemporaryDirectory() as folder:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=folder))
        saved = tf.saved_model.load(str(next(local.rglob("saved_model.pb")).parent))
        tensor = tf.constant(image)

        def timed(call: Callable[[], Any], repeats: int = 300) -> float:
            for _ in range(20):
                call()
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                call()
                times.append(time.perf_counter() - started)
            return 1000.0 * statistics.median(times)

        savedmodel_ms = timed(lambda: saved.serve(tensor).numpy())
        pyfunc_ms = timed(lambda: pyfunc.predict(image))
    return {"savedmodel_ms": savedmodel_ms, "pyfunc_ms": pyfunc_ms}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.serving setup|promote|bare ... --out FILE``: the child-process parts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    setup = commands.add_parser("setup")
    setup.add_argument("--root", required=True)
    setup.add_argument("--overrides", required=True, help="params.yaml section overrides, as JSON")
    promote = commands.add_parser("promote")
    promote.add_argument("--params", required=True)
    promote.add_argument("--version", required=True)
    bare = commands.add_parser("bare")
    bare.add_argument("--params", required=True)
    bare.add_argument("--image", required=True)
    for command in (setup, promote, bare):
        command.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    handlers: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
        "setup": _setup,
        "promote": _promote,
        "bare": _bare,
    }
    result = handlers[args.command](args)
    args.out.write_text(json.dumps(result) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
