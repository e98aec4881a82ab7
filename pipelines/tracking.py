"""MLflow connection: where runs and models go, and retries when the tracking server is away.

Default: a SQLite file and an artifact folder inside the project (``artifacts/mlflow/``), so nothing
has to be set up. ``MLFLOW_TRACKING_URI`` in the environment moves everything to a tracking server
(credentials, if any, also come from the environment: ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator

from pipelines.errors import PipelineError

if TYPE_CHECKING:
    from pipelines.project import Project

T = TypeVar("T")

TRACKING_ENV = "MLFLOW_TRACKING_URI"


class TrackingError(PipelineError):
    """The MLflow tracking server could not be reached or refused a request."""

    retryable = True


def tracking_uri(project: Project) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the project's SQLite store."""
    configured = os.environ.get(TRACKING_ENV, "").strip()
    if configured:
        return configured
    return f"sqlite:///{project.mlflow_dir / 'mlflow.db'}"


def _is_local_default(project: Project) -> bool:
    return not os.environ.get(TRACKING_ENV, "").strip()


ATTEMPTS_ENV = "MLOPS_TRACKING_ATTEMPTS"
BASE_DELAY_ENV = "MLOPS_TRACKING_BASE_DELAY"


TRANSIENT_MARKERS = ("Connection", "Max retries", "503", "502", "504", "timed out", "database is locked")
"""Text of an MLflow error that waiting may cure (a server away, overloaded, or SQLite busy)."""


def _is_transient(error: BaseException) -> bool:
    """A failure that waiting may cure: the server is unreachable, timed out or answered 502/503/504."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError):
        return True
    if isinstance(error, MlflowException):
        text = str(error)
        return any(marker in text for marker in TRANSIENT_MARKERS)
    return False


def with_retries(action: Callable[[], T], what: str, attempts: int | None = None, base_delay: float | None = None) -> T:
    """Run ``action``; on a transient failure retry with exponential backoff, then raise :class:`TrackingError`.

    Defaults: 5 attempts, waiting 1 s, 2 s, 4 s... (``$MLOPS_TRACKING_ATTEMPTS``, ``$MLOPS_TRACKING_BASE_DELAY``).
    Any other error is raised at once.
    """
    import tenacity

    attempts = attempts or int(os.environ.get(ATTEMPTS_ENV, "5"))
    base_delay = base_delay if base_delay is not None else float(os.environ.get(BASE_DELAY_ENV, "1.0"))
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=base_delay, exp_base=2, min=0),
        retry=tenacity.retry_if_exception(_is_transient),
    )
    try:
        return retrying(action)
    except tenacity.RetryError as error:
        last = error.last_attempt.exception()
        raise TrackingError(
            redact(f"MLflow tracking server unreachable while trying to {what} ({attempts} attempts): {last}")
        ) from None


def connect(project: Project, experiment: str | None = None) -> str:
    """Point MLflow at the project's tracking URI and make sure the experiment exists; return its id."""
    # Keep MLflow's own HTTP retries short: our backoff decides how long to wait, and says why.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    import mlflow

    uri = tracking_uri(project)
    if _is_local_default(project):
        project.mlflow_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = experiment or project.config.registry.experiment

    def ensure() -> str:
        found = mlflow.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        location = (project.mlflow_dir / "artifacts" / name).as_uri() if _is_local_default(project) else None
        try:
            return str(mlflow.create_experiment(name, artifact_location=location))
        except Exception:
            # Another process created it between our lookup and create.
            again = mlflow.get_experiment_by_name(name)
            if again is None:
                raise
            return str(again.experiment_id)

    experiment_id = with_retries(ensure, f"open experiment {name!r} at {uri}")
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit(root: Path) -> str:
    """The git commit of ``root`` (with ``-dirty`` if the work tree has changes), or ``unknown``."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def airflow_context_tags() -> dict[str, str]:
    """Airflow DAG, run and task ids from the environment Airflow sets for a running task."""
    names = {
        "airflow.dag_id": "AIRFLOW_CTX_DAG_ID",
        "airflow.run_id": "AIRFLOW_CTX_DAG_RUN_ID",
        "airflow.task_id": "AIRFLOW_CTX_TASK_ID",
    }
    return {tag: os.environ[env] for tag, env in names.items() if os.environ.get(env)}


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Flatten nested mappings and sequences into ``a.b.c`` keys with string values (for MLflow params)."""
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return flat
    if isinstance(value, list | tuple):
        return {prefix: ",".join(str(item) for item in value)}
    return {prefix: str(value)}


def without_password(uri: str) -> str:
    """``uri`` as it is; a ValueError when it holds a password (credentials belong in a Secret, not in a URI)."""
    if urlsplit(uri).password is not None:
        raise ValueError("holds a password: the credentials belong in the Secret")
    return uri


PasswordFreeUri = Annotated[str, AfterValidator(without_password)]
"""A settings field holding a URI that must not carry a password (rendered into manifests)."""


def redact(text: str) -> str:
    """``text`` with the secrets of URLs in it replaced by ``***``, for every error and log line the project writes.

    A password in a URL's user information (``scheme://user:PASSWORD@host``, also ``redis://:PASSWORD@``)
    and the value of a secret-looking query parameter (``password=``, ``token=``, ``secret=``, S3 signatures
    and credentials) become ``***``; user names, hosts and paths stay, so the message still says where.
    """
    import re

    # Everything up to the URL's last '@' is hidden: never less than the password, even one holding a raw
    # '@' or '/'.
    text = re.sub(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:)[^\s'\"<>]*@", r"\1***@", text)
    return re.sub(
        r"([?&](?:password|passwd|pwd|secret|[a-z_]*token|api_?key|x-amz-signature|x-amz-credential"
        r"|x-amz-security-token|awsaccesskeyid|signature)=)[^&\s#'\"]+",
        r"\1***",
        text,
        flags=re.IGNORECASE,
    )
