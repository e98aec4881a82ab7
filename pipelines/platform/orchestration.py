"""What the DAG files share: where the project is, default task settings, and how a step is run.

Imported at DAG parse time, so it imports only the standard library and the light config module;
pipeline steps are imported inside the task bodies.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from pipelines.config import Config, load_config
from pipelines.project import Project

T = TypeVar("T")

PROJECT_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "mlops",
    "retries": 2,
    "retry_delay": timedelta(seconds=20),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(minutes=30),
}


def params_path() -> Path:
    """``$MLOPS_PARAMS``, else the ``params.yaml`` of the project this package lives in."""
    configured = os.environ.get("MLOPS_PARAMS")
    return Path(configured) if configured else PROJECT_ROOT / "params.yaml"


def dag_config() -> Config:
    """The configuration, read when the DAG file is parsed (schedule, defaults of Params)."""
    return load_config(params_path())


def load_project() -> Project:
    """The project the tasks work on; a broken ``params.yaml`` fails the task at once (retrying cannot fix it)."""
    return _failing_fast(Project.load, params_path())


def run_step(step: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a pipeline step; a user error that retrying cannot fix fails the task at once, without retries.

    Where the local runner started a warm step host (:mod:`pipelines.platform.step_host`), the step runs there,
    its imports already paid; otherwise in this process.
    """
    from pipelines.platform.step_host import run_in_active_host

    return cast(T, _failing_fast(run_in_active_host, step, *args, **kwargs))


def _failing_fast(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    from pipelines.errors import PipelineError

    try:
        return call(*args, **kwargs)
    except PipelineError as error:
        if error.retryable:
            raise
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(str(error)) from error


def triggering_user(context: Any) -> str:
    """Who triggered the DAG run (the UI or API user), or ``airflow`` for scheduled runs."""
    dag_run = context.get("dag_run")
    user = getattr(dag_run, "triggering_user_name", None) if dag_run is not None else None
    return str(user) if user else "airflow"
