"""The TFX peer: its own environment, built once, and whole-process runs of its pipeline on the digits.

The peer (``../shared/peers/tfx_digits_peer.py`` next to the repository, or ``$MLOPS_BENCH_PEER_SCRIPT``) is
a TFX 1.16 pipeline on the same scikit-learn digits: ExampleGen -> StatisticsGen -> SchemaGen ->
ExampleValidator -> Trainer (20 epochs of a similar CNN on the native 8x8 pixels) -> Evaluator (value and
change thresholds) -> Pusher, run by ``LocalDagRunner`` with caching off. TFX 1.16 cannot share an
environment with the project's TensorFlow, so :func:`ensure_environment` builds one with the pinned uv into
``.tools/tfx-peer/venv`` (git-ignored; about 3 GB, about 30 s with a warm uv cache) and reuses it as long as
``import tfx`` works there. When it cannot be built (no network, no uv, no script), the reason is returned
and the peer's rows say so; the other benchmarks still run.

:func:`run_peer` runs the script in a fresh work folder and times the whole process from outside (Python
start, TFX and Beam imports, the pipeline, exit), as a user typing the command would see it; its stdout
goes to a log and its stderr (about 36 MB of harmless warnings) to another file. The script's last line,
``tfx_pipeline_wall_s S pushed B eval_accuracy A``, gives the pipeline's own wall time and the Evaluator's
accuracy on its eval split (about a third of the 1,797 digits, by ExampleGen's hash split).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, Context, Outcome, Row, child_env, fmt, log, ratio, tail

PEER_SCRIPT_VARIABLE = "MLOPS_BENCH_PEER_SCRIPT"
DEFAULT_PEER_SCRIPT = REPO_ROOT.parent / "shared" / "peers" / "tfx_digits_peer.py"
PEER_DIR = REPO_ROOT / ".tools" / "tfx-peer"
PEER_VENV = PEER_DIR / "venv"
UV = REPO_ROOT / ".tools" / "uv" / "bin" / "uv"
PEER_PACKAGES = ("tfx==1.16.0", "scikit-learn", "dill", "pip")  # TFX's Trainer needs pip in its environment
PEER_PYTHON = "3.11"
BUILD_TIMEOUT = 1800.0
RUN_TIMEOUT = 1200.0
LAST_LINE_PREFIX = "tfx_pipeline_wall_s"
# Variables of the project's own environment that must not leak into the peer's Python.
_FOREIGN = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "UV_PROJECT_ENVIRONMENT", "CONDA_PREFIX")


@dataclass(frozen=True)
class PeerEnvironment:
    """The peer's Python, or why there is none."""

    python: str
    """The peer environment's interpreter ("" when it could not be built)."""
    script: str
    reason: str
    """Why the environment cannot be used ("" when it can)."""
    built: bool
    """True when built by this run, False when an existing environment was reused."""
    build_seconds: float
    tfx_version: str

    @property
    def usable(self) -> bool:
        """Whether the peer can be run."""
        return not self.reason


@dataclass(frozen=True)
class PeerRun:
    """One whole-process run of the peer."""

    wall_seconds: float
    """From starting the process to its exit, measured from outside."""
    pipeline_seconds: float | None
    """The script's own timing of ``LocalDagRunner().run`` (``tfx_pipeline_wall_s``)."""
    pushed: bool | None
    accuracy: float | None
    """The Evaluator's sparse categorical accuracy on its eval split."""
    returncode: int
    error: str
    """"" when the run succeeded and its last line was read; else what went wrong."""
    work: str
    stdout_log: str
    stderr_log: str
    stderr_bytes: int

    @property
    def ok(self) -> bool:
        """Whether the run succeeded and reported its timing."""
        return not self.error


def peer_script() -> Path:
    """The peer script: ``$MLOPS_BENCH_PEER_SCRIPT`` or ``../shared/peers/tfx_digits_peer.py``."""
    configured = os.environ.get(PEER_SCRIPT_VARIABLE)
    return Path(configured).resolve() if configured else DEFAULT_PEER_SCRIPT


def peer_env() -> dict[str, str]:
    """The environment of the peer's processes: the benchmark children's, without the project's venv."""
    env = {key: value for key, value in child_env().items() if key not in _FOREIGN}
    env["PATH"] = f"{PEER_VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _tfx_version(python: Path) -> str | None:
    """TFX's version in the environment of ``python``, or None when it does not import."""
    if not python.is_file():
        return None
    try:
        completed = subprocess.run(
            [str(python), "-c", "import tfx; print(tfx.__version__)"],
            env=peer_env(),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if completed.returncode != 0:
        return None
    lines = completed.stdout.strip().splitlines()
    return lines[-1].strip() if lines else None


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """One builder at a time (two benchmark runs sharing the repository)."""
    PEER_DIR.mkdir(parents=True, exist_ok=True)
    with (PEER_DIR / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _build_error(text: str) -> str:
    """The ``error:`` line of uv and its last ``cause:`` (the root cause), or the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if not errors:
        return _last_line(text)
    causes = [line for line in lines[lines.index(errors[-1]) :] if line.startswith("cause:")]
    return f"{errors[-1]}{' (' + causes[-1] + ')' if causes else ''}"[:300]


BYTECODE_MARKER = PEER_VENV / ".bytecode-compiled"


def _compile_bytecode(python: Path) -> None:
    """Compile the peer's site-packages once (environments built before installs compiled it)."""
    if BYTECODE_MARKER.is_file():
        return
    log("  peer environment: compiling its bytecode once (as the project's environment is)")
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    subprocess.run([str(python), "-m", "compileall", "-q", "-j", "0", site_packages], capture_output=True, check=False)
    BYTECODE_MARKER.write_text("compiled\n", encoding="utf-8")


def ensure_environment(build_log: Path) -> PeerEnvironment:
    """The peer's environment in ``.tools/tfx-peer/venv``: reused if ``import tfx`` works, else built with uv."""
    script = peer_script()
    python = PEER_VENV / "bin" / "python"

    def failed(reason: str, seconds: float = 0.0) -> PeerEnvironment:
        log(f"  peer environment could not be built: {reason}")
        return PeerEnvironment("", str(script), reason, False, seconds, "")

    if not script.is_file():
        return failed(f"peer script not found at {script} (set {PEER_SCRIPT_VARIABLE})")
    with _build_lock():
        version = _tfx_version(python)
        if version is not None:
            log(f"  peer environment: reusing {PEER_VENV} (tfx {version})")
            _compile_bytecode(python)
            return PeerEnvironment(str(python), str(script), "", False, 0.0, version)
        uv = UV if UV.is_file() else Path(shutil.which("uv") or "")
        if not uv.name or not uv.is_file():
            return failed(f"uv missing ({UV} not found and no uv on PATH; `make setup` installs it)")
        log(f"  peer environment: building {PEER_VENV} with {uv} (tfx 1.16.0, about 3 GB)")
        build_log.parent.mkdir(parents=True, exist_ok=True)
        if PEER_VENV.exists():
            shutil.rmtree(PEER_VENV)
        env = peer_env()
        env["VIRTUAL_ENV"] = str(PEER_VENV)
        steps = (
            [str(uv), "venv", "--python", PEER_PYTHON, str(PEER_VENV)],
            # Bytecode compiled at install, as `make setup` does for the project (`uv sync --compile-bytecode`):
            # with PYTHONDONTWRITEBYTECODE set, both would otherwise recompile every import on every run.
            [str(uv), "pip", "install", "--compile-bytecode", "--python", str(python), *PEER_PACKAGES],
        )
        started = time.perf_counter()
        with build_log.open("a", encoding="utf-8") as handle:
            for command in steps:
                handle.write(f"$ {' '.join(command)}\n")
                handle.flush()
                try:
                    completed = subprocess.run(
                        command,
                        env=env,
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                        timeout=BUILD_TIMEOUT,
                        check=False,
                    )
                except (OSError, subprocess.TimeoutExpired) as error:
                    return failed(f"{command[1]} {command[2]}: {error}", time.perf_counter() - started)
                if completed.returncode != 0:
                    reason = _build_error(tail(build_log, 12)) or f"exit status {completed.returncode}"
                    return failed(
                        f"`uv {command[1]} {command[2]}` failed: {reason} (log {build_log})",
                        time.perf_counter() - started,
                    )
        seconds = time.perf_counter() - started
        version = _tfx_version(python)
        if version is None:
            return failed(f"built, but `import tfx` fails in {PEER_VENV} (log {build_log})", seconds)
        BYTECODE_MARKER.write_text("compiled at install\n", encoding="utf-8")
        log(f"  peer environment built in {seconds:.0f} s (tfx {version})")
        return PeerEnvironment(str(python), str(script), "", True, seconds, version)


def _parse_last_line(stdout: str) -> tuple[float | None, bool | None, float | None]:
    """(pipeline seconds, pushed, accuracy) from ``tfx_pipeline_wall_s S pushed B eval_accuracy A``."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(LAST_LINE_PREFIX):
            tokens = line.split()
            fields = dict(zip(tokens[0::2], tokens[1::2], strict=False))
            pushed = fields.get("pushed")
            return (
                _number(fields, LAST_LINE_PREFIX),
                (pushed == "True") if pushed is not None else None,
                _number(fields, "eval_accuracy"),
            )
    return None, None, None


def _number(fields: dict[str, str], key: str) -> float | None:
    try:
        return float(fields[key])
    except (KeyError, ValueError):
        return None


def run_peer(environment: PeerEnvironment, folder: Path) -> PeerRun:
    """Run the peer once in a fresh work folder under ``folder``; time the whole process from outside."""
    if not environment.usable:
        raise ValueError(f"the peer environment is not usable: {environment.reason}")
    folder.mkdir(parents=True, exist_ok=False)
    work = folder / "work"
    stdout_log, stderr_log = folder / "stdout.log", folder / "stderr.log"
    command = [environment.python, environment.script, str(work)]
    error = ""
    returncode = -1
    with stdout_log.open("w", encoding="utf-8") as out, stderr_log.open("w", encoding="utf-8") as err:
        started = time.perf_counter()
        try:
            completed = subprocess.run(
                command, cwd=folder, env=peer_env(), stdout=out, stderr=err, timeout=RUN_TIMEOUT, check=False
            )
            returncode = completed.returncode
        except subprocess.TimeoutExpired:
            error = f"timed out after {RUN_TIMEOUT:.0f} s"
        wall = time.perf_counter() - started
    stdout = stdout_log.read_text(encoding="utf-8", errors="replace")
    pipeline_seconds, pushed, accuracy = _parse_last_line(stdout)
    if not error and returncode != 0:
        error = f"exit status {returncode}: {_last_line(tail(stderr_log, 5))}"
    elif not error and pipeline_seconds is None:
        error = f"no `{LAST_LINE_PREFIX}` line in {stdout_log}"
    return PeerRun(
        wall_seconds=wall,
        pipeline_seconds=pipeline_seconds,
        pushed=pushed,
        accuracy=accuracy,
        returncode=returncode,
        error=error,
        work=str(work),
        stdout_log=str(stdout_log),
        stderr_log=str(stderr_log),
        stderr_bytes=stderr_log.stat().st_size,
    )


def unusable_row(benchmark: str, measure: str, environment: PeerEnvironment) -> Row:
    """The row standing in for a peer figure when the peer cannot run."""
    return Row(benchmark, measure, "-", note=f"peer environment could not be built: {environment.reason}")


def bench_peer(ctx: Context) -> Outcome:
    """Build (or reuse) the peer's environment and run the peer once: whole process vs its pipeline's own time."""
    root = ctx.folder("peer")
    environment = ensure_environment(root / "build.log")
    data: dict[str, Any] = {"environment": asdict(environment), "venv": str(PEER_VENV)}
    build = "built" if environment.built else "reused"
    if not environment.usable:
        return Outcome([unusable_row("peer", "TFX peer environment", environment)], data)
    rows = [
        Row(
            "peer",
            "TFX peer environment (.tools/tfx-peer/venv): build s",
            fmt(environment.build_seconds, 1) if environment.built else "0",
            note=f"{build}; tfx {environment.tfx_version}; rebuilt only when `import tfx` fails there",
        )
    ]
    log("  TFX peer: one whole-process run")
    run = run_peer(environment, root / "run-1")
    data["run"] = asdict(run)
    if not run.ok:
        rows.append(Row("peer", "TFX peer whole process, s", "-", note=f"peer run failed: {run.error}"))
        return Outcome(rows, data)
    rows.append(
        Row(
            "peer",
            "TFX peer: whole process s vs its pipeline's own wall (LocalDagRunner.run)",
            fmt(run.wall_seconds, 1),
            fmt(run.pipeline_seconds, 1),
            fmt(ratio(run.wall_seconds, run.pipeline_seconds)),
            f"Evaluator accuracy {fmt(run.accuracy, 4)} on its eval split; pushed {run.pushed}; "
            f"stderr {run.stderr_bytes / 1e6:.0f} MB (to a file); the make_run benchmark runs it again, alternating",
        )
    )
    return Outcome(rows, data)
