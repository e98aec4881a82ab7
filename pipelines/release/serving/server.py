"""How the prediction service runs on uvicorn: in this process (``mlops serve``) or in a background thread.

The app itself (routes, the service behind them) is :mod:`~pipelines.release.serving.app`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI

from pipelines.project import Project
from pipelines.release.serving.app import create_app
from pipelines.release.serving.client import TOKEN_ENV

log = logging.getLogger("pipelines.serve")


def server_config(app: FastAPI, host: str, port: int, *, access_log: bool = False, own_logging: bool = True) -> Any:
    """The uvicorn configuration the service runs with (uvloop and httptools when installed).

    ``own_logging`` False leaves the process's logging configuration alone (uvicorn's would replace it):
    for a service started inside another program, such as a test or a benchmark.
    """
    import uvicorn

    extra: dict[str, Any] = {} if own_logging else {"log_config": None}
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=access_log,
        timeout_graceful_shutdown=30,
        lifespan="on",
        **extra,
    )


def run_server(project: Project, host: str | None = None, port: int | None = None, *, access_log: bool = False) -> None:
    """Run the service in this process until interrupted (``mlops serve``, ``make serve``)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = project.config.serve
    token = os.environ.get(TOKEN_ENV, "").strip() or None
    log.info(
        "serving %s@champion on http://%s:%d (admin endpoint %s)",
        project.config.registry.model_name, host or settings.host, port or settings.port,
        "enabled" if token else f"disabled: no {TOKEN_ENV}",
    )  # fmt: skip
    app = create_app(project, token=token)
    uvicorn.Server(server_config(app, host or settings.host, port or settings.port, access_log=access_log)).run()


@contextlib.contextmanager
def running_in_thread(app: FastAPI, host: str, port: int, timeout: float = 60.0) -> Iterator[Any]:
    """Run ``app`` on a real uvicorn in a background thread until the block ends (tests, benchmarks)."""
    import uvicorn

    server = uvicorn.Server(server_config(app, host, port, own_logging=False))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on {host}:{port} within {timeout:.0f} s")
        time.sleep(0.05)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=120)
