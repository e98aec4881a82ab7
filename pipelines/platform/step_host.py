"""A warm child process that runs the pipeline steps of in-process DAG runs, with their imports paid ahead.

Under ``DAG.test`` (``make run``, ``local_airflow dag``) every task runs in one Python process, which spends its
first seconds importing Airflow and building its Execution API on one core while the other idles, and then
pays TensorFlow, Great Expectations and MLflow imports inside the tasks (about 6 s of a 21 s run, profiled).
A step host is a child started first: it imports those libraries in the order the tasks need them, on the
idle core, while Airflow warms up; then each task's step function runs in it when the task asks
(:func:`pipelines.platform.orchestration.run_step`). The task instances, their states, retries and XComs stay
Airflow's, in the parent; only the step's work moves, with the task's environment and its stdout/stderr
(passed as file descriptors, so the output lands in the task's log). Steps run one at a time, like the tasks
of ``DAG.test``; a request waits at most for the one import in progress. Where no host was started (a
scheduler's task processes, the CLI), steps run in the calling process as before.

A step cut short in the parent (a task timeout, Ctrl-C) kills the host, so the step cannot run on unseen;
a host that dies is not used again (later steps run in the parent). On Linux the host also dies with its
parent (``PR_SET_PDEATHSIG``), so killing ``make run`` leaves nothing running.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import pickle
import select
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any, TypeVar

T = TypeVar("T")

WarmUp = tuple[Callable[..., Any], tuple[Any, ...]]
"""A call the host makes once its imports are done (for example starting the promote DAG's clean checker)."""


class StepHostError(RuntimeError):
    """The step host could not run a step: it died, or the step's exception or result does not pickle."""


class StepHost:
    """The parent's handle on a running step host: :meth:`call` a step in it, :meth:`stop` it."""

    def __init__(self, process: subprocess.Popen[bytes], channel: socket.socket) -> None:
        self.process = process
        self._channel = channel
        self._connection = Connection(os.dup(channel.fileno()))
        self._lock = threading.Lock()
        self.alive = True

    @classmethod
    def start(cls, preload: Sequence[str], warm_ups: Sequence[WarmUp] = ()) -> StepHost:
        """Start a host that imports ``preload`` (module names, in order), then makes the ``warm_ups`` calls."""
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with child_end:
            process = subprocess.Popen(
                [sys.executable, "-m", "pipelines.platform.step_host", str(child_end.fileno())],
                pass_fds=[child_end.fileno()],
                stdin=subprocess.DEVNULL,
            )
        host = cls(process, parent_end)
        host._send(("plan", list(preload), list(warm_ups)))
        return host

    def _send(self, message: tuple[Any, ...]) -> None:
        _flush_standard_streams()
        socket.send_fds(self._channel, [b"m"], [1, 2])  # the host writes where this process writes now
        self._connection.send(message)

    def call(self, step: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``step(*args, **kwargs)`` in the host; return its result or raise its exception here."""
        with self._lock:
            if not self.alive:
                raise StepHostError("the step host is not running")
            try:
                self._send(("call", step, args, kwargs, dict(os.environ), os.getcwd()))
                outcome, value = self._connection.recv()
            except (EOFError, ConnectionError) as error:  # the host is gone
                self.stop(kill=True)
                code = self.process.returncode
                raise StepHostError(
                    f"the step host (pid {self.process.pid}) died running {_name(step)} (exit status {code})"
                ) from error
            except BaseException:
                self.stop(kill=True)  # cut short here (timeout, interrupt): the step must not run on unseen
                raise
        if outcome == "error":
            raise value
        return value  # type: ignore[no-any-return]

    def stop(self, *, kill: bool = False) -> None:
        """Ask the host to finish (or kill it) and wait for it; idempotent."""
        if self.alive and not kill:
            with contextlib.suppress(OSError):
                self._send(("stop",))
        self.alive = False
        if kill:
            self.process.kill()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._connection.close()
        self._channel.close()


_ACTIVE: StepHost | None = None


def active_host() -> StepHost | None:
    """The step host this process started with :func:`hosting`, while it is alive; otherwise None."""
    return _ACTIVE if _ACTIVE is not None and _ACTIVE.alive else None


def run_in_active_host(step: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``step(*args, **kwargs)`` in the active step host when there is one, otherwise in this process."""
    host = active_host()
    return step(*args, **kwargs) if host is None else host.call(step, *args, **kwargs)


@contextlib.contextmanager
def hosting(preload: Sequence[str], warm_ups: Sequence[WarmUp] = ()) -> Iterator[StepHost]:
    """Start a step host for the steps run in this block (:func:`active_host`), and stop it afterwards."""
    global _ACTIVE
    host = StepHost.start(preload, warm_ups)
    _ACTIVE = host
    try:
        yield host
    finally:
        _ACTIVE = None
        host.stop()


def _flush_standard_streams() -> None:
    """Flush Python's buffers before the descriptors change hands; a stream someone closed has nothing to flush."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(ValueError, OSError, AttributeError):
            stream.flush()


def _name(step: Callable[..., Any]) -> str:
    return f"{getattr(step, '__module__', '?')}.{getattr(step, '__qualname__', repr(step))}"


# ------------------------------------------------------------------------------------------- in the host


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() == 1:  # the parent is already gone
            os._exit(1)


def _receive(channel: socket.socket, connection: Connection) -> tuple[Any, ...] | None:
    """The next message, with this process's stdout and stderr now where the parent's were; None at EOF."""
    data, descriptors, _, _ = socket.recv_fds(channel, 1, 2)
    if not data:
        return None
    _flush_standard_streams()
    for target, descriptor in zip((1, 2), descriptors, strict=False):
        os.dup2(descriptor, target)
        os.close(descriptor)
    message: tuple[Any, ...] = connection.recv()
    return message


def _run(message: tuple[Any, ...]) -> tuple[str, Any]:
    _, step, args, kwargs, environment, cwd = message
    for name in set(os.environ) - set(environment):
        del os.environ[name]
    os.environ.update(environment)
    os.chdir(cwd)
    try:
        result = step(*args, **kwargs)
    except Exception as error:
        error.add_note(f"(in the step host, pid {os.getpid()}):\n{traceback.format_exc()}")
        return "error", _picklable_error(error)
    finally:
        _flush_standard_streams()
    try:
        pickle.dumps(result)
    except Exception as error:
        return "error", StepHostError(f"{_name(step)} returned {type(result).__name__}, which does not pickle: {error}")
    return "ok", result


def _picklable_error(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        copy = StepHostError(f"{type(error).__name__}: {error}")
        copy.__notes__ = list(getattr(error, "__notes__", []))
        return copy
    return error


def serve(descriptor: int) -> int:
    """The host's loop: read the plan, import ahead while idle, run each step asked for, until stop or EOF."""
    _die_with_parent()
    channel = socket.socket(fileno=descriptor)
    connection = Connection(os.dup(descriptor))
    plan = _receive(channel, connection)
    if plan is None:
        return 0
    _, preload, warm_ups = plan
    pending: list[Callable[[], Any]] = [functools.partial(importlib.import_module, name) for name in preload]
    pending += [functools.partial(call, *args) for call, args in warm_ups]
    while True:
        if pending and not select.select([channel], [], [], 0)[0]:
            try:
                pending.pop(0)()
            except Exception:  # a missing optional module: the step that needs it will say so itself
                traceback.print_exc()
            continue
        message = _receive(channel, connection)
        if message is None or message[0] == "stop":
            return 0
        connection.send(_run(message))


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.platform.step_host FD``: serve the parent on the socket ``FD``."""
    args = sys.argv[1:] if argv is None else argv
    status = serve(int(args[0]))
    import atexit

    atexit._run_exitfuncs()  # the steps' own clean-ups (an unused checker is stopped), then no slow teardown
    _flush_standard_streams()
    os._exit(status)


if __name__ == "__main__":
    # Run the imported module, not this ``__main__`` copy: errors the host sends back must unpickle in the parent
    # as ``pipelines.platform.step_host.StepHostError``.
    from pipelines.platform.step_host import main as imported_main

    sys.exit(imported_main())
