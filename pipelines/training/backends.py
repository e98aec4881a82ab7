"""Where a training job runs, chosen by the environment so the same DAG serves one machine and a cluster.

* ``local`` (default): on the host running the task, in one process or as ``train.workers`` local worker
  processes (:mod:`pipelines.training.launcher`);
* ``kubernetes``: an indexed Job across hosts, submitted by the retrain DAG through Airflow's Kubernetes
  provider (:mod:`pipelines.training.kubernetes`).

``MLOPS_TRAIN_BACKEND`` picks one, ``MLOPS_TRAIN_QUEUE`` the Celery queue of the training tasks. The DAG and
the ``mlops train`` command both ask :func:`training_backend`, so an unknown value fails the same way in both.
Standard library only: read at DAG parse time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal, cast

from pipelines.errors import PipelineError

BACKEND_ENV = "MLOPS_TRAIN_BACKEND"
QUEUE_ENV = "MLOPS_TRAIN_QUEUE"
BACKENDS = ("local", "kubernetes")

Backend = Literal["local", "kubernetes"]


def training_backend(environ: Mapping[str, str] | None = None) -> Backend:
    """The configured backend; an unknown ``MLOPS_TRAIN_BACKEND`` raises :class:`PipelineError` naming it."""
    value = (os.environ if environ is None else environ).get(BACKEND_ENV, "local").strip() or "local"
    if value not in BACKENDS:
        raise PipelineError(f"{BACKEND_ENV}={value!r}: unknown training backend (expected one of {list(BACKENDS)})")
    return cast(Backend, value)


def training_queue(environ: Mapping[str, str] | None = None) -> str:
    """The Celery queue of the training tasks (``gpu`` on a scaled-out setup), ``default`` otherwise."""
    return (os.environ if environ is None else environ).get(QUEUE_ENV, "default").strip() or "default"


def job_id_for_run(dag_id: str, run_id: str) -> str:
    """The training job id of a DAG run: stable across retries, so a retry resumes and never trains twice."""
    return f"{dag_id}-{run_id}"
