r"""Distributed training across hosts on Kubernetes: an Indexed Job plus a headless Service.

:func:`render_training_job` turns a validated :class:`TrainingJobSpec` into two manifests, filled into
``pipelines/training/templates/tfjob-indexed.yaml`` (a readable file that explains every choice):

* a headless Service (``clusterIP: None``) selecting the Job's pods, so worker ``i`` is reachable at
  ``<job>-<i>.<service>.<namespace>.svc.cluster.local:<port>``;
* an Indexed Job (``completions = parallelism = workers``) whose pods run
  ``python -m pipelines.training.kubernetes worker``: it turns ``$JOB_COMPLETION_INDEX`` into ``TF_CONFIG`` with
  :func:`tf_config_for_index` (index 0 is the chief) and calls :func:`pipelines.training.train.run_worker` on the
  job dir, which lives on a shared PVC mounted at ``/workspace`` (``BackupAndRestore`` and
  ``result.json`` are there).

Restart semantics: ``restartPolicy: Never`` with a ``podFailurePolicy``. MultiWorkerMirroredStrategy
cannot continue with a member missing, so a failure restarts the whole group: the survivors' collectives
fail, every index is replaced by a fresh pod with the same DNS name, and the group resumes from the last
epoch ``BackupAndRestore`` saved. ``backoffLimit = max_restarts x workers`` (one group restart costs up
to ``workers`` pod failures). A worker exits with :data:`EXIT_NOT_RETRYABLE` on a problem a user must fix
(bad ``params.yaml``, no data version), which fails the Job at once; evictions and node drains do not
count. The template's comments say why ``OnFailure`` and ``backoffLimitPerIndex`` were not chosen.

:func:`submit_and_wait` creates the manifests with the ``kubernetes`` client (an optional dependency)
and polls the Job until it completes, fails (raising with the Job's and the failed pods' messages) or
times out. An Airflow task calls it; a retry of that task re-attaches to a Job that is still running.
Name each try's Job differently (e.g. with the try number) and keep the same job dir, so a try after a
failed Job resumes from its checkpoints.

Command line::

    python -m pipelines.training.kubernetes render --name train-0412 --image registry.example.com/trainer:1.2.3 \
        --workers 4 --params-path /workspace/project/params.yaml --pvc-name training-workspace \
        --tracking-uri https://mlflow.example.com --secret-name mlops-aws > job.yaml
    python -m pipelines.training.kubernetes submit ...same options... --timeout 86400
    python -m pipelines.training.kubernetes worker ...   # inside the pods (the template writes this command)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

import yaml

from pipelines.errors import PipelineError

if TYPE_CHECKING:
    from pipelines.project import Project

TEMPLATE = "templates/tfjob-indexed.yaml"
WORKSPACE = PurePosixPath("/workspace")
"""Where the shared PVC is mounted in every worker pod."""

DEFAULT_PORT = 23456
MAX_NAME_LENGTH = 52
"""Job names stay short enough that pod names (``<job>-<index>-<5 random>``) fit in 63 characters."""

EXIT_NOT_RETRYABLE = 78
"""Worker exit code (EX_CONFIG) for a problem a user must fix; the Job's podFailurePolicy fails at once."""
EXIT_RETRYABLE = 75
"""Worker exit code (EX_TEMPFAIL) for a failure another attempt may get past; it counts as a retry."""

COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_IMAGE_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_REPOSITORY = re.compile(rf"^{_IMAGE_COMPONENT}(?:/{_IMAGE_COMPONENT})*$")
_IMAGE_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]+)?$|^localhost(:[0-9]+)?$")
_IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_IMAGE_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_PLACEHOLDER = re.compile(r"\$\{([a-z_]+)\}")


@dataclass(frozen=True, kw_only=True)
class TrainingJobSpec:
    """Everything a multi-host training job needs; every field is checked when the spec is made.

    Raises:
        ValueError: a field is invalid; the message starts with the field's name.
    """

    name: str
    """The Job's name (also its headless Service's and its pods' hostname prefix): a DNS label, <= 52."""
    namespace: str
    image: str
    """The trainer image with an explicit tag or digest (``repo/trainer:1.2.3``); never ``latest``."""
    workers: int
    params_path: str
    """``params.yaml`` as the pods see it (absolute); its folder is the project root (data, DVC)."""
    job_dir: str
    """The training job's folder as the pods see it: under ``/workspace``, the shared PVC."""
    pvc_name: str
    """A PersistentVolumeClaim every worker can mount (ReadWriteMany across nodes)."""
    tracking_uri: str
    """``MLFLOW_TRACKING_URI`` of the pods; credentials belong in the Secret, not in this URI."""
    secret_name: str
    """A Secret whose keys become environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)."""
    gpus_per_worker: int = 1
    cpu: str = "4"
    memory: str = "16Gi"
    port: int = DEFAULT_PORT
    service_account: str | None = None
    max_restarts: int = 1
    """Restarts of the whole worker group before the Job fails (as ``train.max_restarts`` locally)."""
    ttl_seconds_after_finished: int = 86_400
    active_deadline_seconds: int | None = None
    """A backstop against a group that hangs (e.g. a worker waiting for peers that are gone)."""
    shm_size: str = "2Gi"
    cluster_domain: str = "cluster.local"

    def __post_init__(self) -> None:
        _check_dns(
            "name", self.name, _DNS_1035_LABEL, MAX_NAME_LENGTH, "it also names the headless Service and pod hosts"
        )
        _check_dns("namespace", self.namespace, _DNS_LABEL, 63)
        _check_image(self.image)
        _check_int("workers", self.workers, minimum=1)
        _check_int("gpus_per_worker", self.gpus_per_worker, minimum=0)
        _check_quantity("cpu", self.cpu)
        _check_quantity("memory", self.memory)
        _check_quantity("shm_size", self.shm_size)
        _check_int("port", self.port, minimum=1, maximum=65535)
        _check_path("params_path", self.params_path, under=None)
        _check_path("job_dir", self.job_dir, under=WORKSPACE)
        _check_dns("pvc_name", self.pvc_name, _DNS_SUBDOMAIN, 253)
        _check_tracking_uri(self.tracking_uri)
        _check_dns("secret_name", self.secret_name, _DNS_SUBDOMAIN, 253)
        if self.service_account is not None:
            _check_dns("service_account", self.service_account, _DNS_SUBDOMAIN, 253)
        _check_int("max_restarts", self.max_restarts, minimum=0)
        _check_int("ttl_seconds_after_finished", self.ttl_seconds_after_finished, minimum=0)
        if self.active_deadline_seconds is not None:
            _check_int("active_deadline_seconds", self.active_deadline_seconds, minimum=1)
        _check_dns("cluster_domain", self.cluster_domain, _DNS_SUBDOMAIN, 253)

    @property
    def service(self) -> str:
        """The headless Service's name: the Job's name."""
        return self.name

    @property
    def backoff_limit(self) -> int:
        """Pod failures the Job tolerates: one whole-group restart costs up to ``workers`` of them."""
        return self.max_restarts * self.workers

    @property
    def labels(self) -> dict[str, str]:
        """The recommended ``app.kubernetes.io`` labels of the Service, the Job and its pods."""
        return {
            "app.kubernetes.io/name": "mlops-trainer",
            "app.kubernetes.io/instance": self.name,
            "app.kubernetes.io/component": "distributed-training",
            "app.kubernetes.io/part-of": "mlops-image-pipeline",
            "app.kubernetes.io/managed-by": "pipelines.training.kubernetes",
        }


def _check_dns(field: str, value: object, pattern: re.Pattern[str], max_length: int, why: str = "") -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field}: must be a non-empty string, got {value!r}")
    if len(value) > max_length:
        raise ValueError(f"{field}: {value!r} is {len(value)} characters, at most {max_length} are allowed")
    if not pattern.match(value):
        kind = {
            _DNS_1035_LABEL: "a DNS label starting with a letter (a-z, 0-9, '-')",
            _DNS_LABEL: "a DNS-1123 label (a-z, 0-9, '-', alphanumeric at both ends)",
        }.get(pattern, "a DNS-1123 subdomain (a-z, 0-9, '-', '.')")
        raise ValueError(f"{field}: {value!r} is not {kind}" + (f"; {why}" if why else ""))


def _check_int(field: str, value: object, *, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{field}: must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"{field}: must be {bound}, got {value}")


def _check_quantity(field: str, value: object) -> None:
    if not isinstance(value, str) or not _QUANTITY.match(value) or float(re.sub(r"[^0-9.]", "", value)) <= 0:
        raise ValueError(f"{field}: {value!r} is not a positive Kubernetes quantity (e.g. '4', '500m', '16Gi')")


def _check_path(field: str, value: object, *, under: PurePosixPath | None) -> None:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"{field}: must be an absolute path inside the pod, got {value!r}")
    path = PurePosixPath(value)
    if ".." in path.parts:
        raise ValueError(f"{field}: {value!r} must not contain '..'")
    if under is not None and (path == under or under not in path.parents):
        raise ValueError(
            f"{field}: {value!r} must be inside {under}, the shared volume every worker mounts "
            "(checkpoints and result.json must be seen by all of them)"
        )


def _check_image(value: object) -> None:
    if not isinstance(value, str) or not value or value != value.strip():
        raise ValueError(f"image: must be an image reference like 'registry/trainer:1.2.3', got {value!r}")
    name, _, digest = value.partition("@")
    if digest and not _IMAGE_DIGEST.match(digest):
        raise ValueError(f"image: {value!r} has an invalid digest (expected sha256:<64 hex digits>)")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = name[colon + 1 :] if colon > slash else ""
    repository = name[:colon] if tag else name
    first, _, rest = repository.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        valid = bool(_IMAGE_HOST.match(first)) and bool(_IMAGE_REPOSITORY.match(rest))
    else:
        valid = bool(_IMAGE_REPOSITORY.match(repository))
    if not valid:
        raise ValueError(f"image: {value!r} is not a valid image reference")
    if not tag and not digest:
        raise ValueError(
            f"image: {value!r} has no tag; give an explicit tag or digest (e.g. '{repository}:1.2.3') so every "
            "worker runs the same code"
        )
    if tag and not _IMAGE_TAG.match(tag):
        raise ValueError(f"image: {value!r} has an invalid tag {tag!r}")
    if tag == "latest" and not digest:
        raise ValueError(
            f"image: {value!r} uses the mutable tag 'latest'; pin a version or digest so every worker (and a "
            "restarted one) runs the same code"
        )


def _check_tracking_uri(value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"tracking_uri: must be a non-empty MLflow tracking URI, got {value!r}")
    parts = urlsplit(value)
    if not parts.scheme:
        raise ValueError(f"tracking_uri: {value!r} has no scheme (e.g. 'https://mlflow.example.com')")
    if parts.password is not None:
        raise ValueError(
            "tracking_uri: holds a password; put credentials in the Secret (MLFLOW_TRACKING_USERNAME/PASSWORD) "
            "instead of the URI"
        )


# ---------------------------------------------------------------------------------------------- TF_CONFIG


def worker_address(
    job_name: str, service: str, namespace: str, index: int, port: int, *, cluster_domain: str = "cluster.local"
) -> str:
    """The ``host:port`` of worker ``index``: its Indexed-Job hostname under the headless Service."""
    return f"{job_name}-{index}.{service}.{namespace}.svc.{cluster_domain}:{port}"


def tf_config_for_index(
    job_name: str,
    service: str,
    namespace: str,
    workers: int,
    port: int,
    index: int,
    *,
    cluster_domain: str = "cluster.local",
) -> str:
    """The ``TF_CONFIG`` JSON of the pod with completion index ``index`` (worker 0 is the chief).

    Every pod lists the same ``workers`` addresses, in index order, as :func:`pipelines.training.launcher.tf_configs`
    does on one host; only ``task.index`` differs.

    Raises:
        ValueError: ``workers`` < 1, ``index`` outside ``[0, workers)`` or ``port`` outside 1..65535.
    """
    _check_int("workers", workers, minimum=1)
    _check_int("index", index, minimum=0, maximum=workers - 1)
    _check_int("port", port, minimum=1, maximum=65535)
    hosts = [
        worker_address(job_name, service, namespace, i, port, cluster_domain=cluster_domain) for i in range(workers)
    ]
    return json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})


def completion_index(environ: Mapping[str, str], workers: int) -> int:
    """The index of this pod, from ``$JOB_COMPLETION_INDEX`` (set by Kubernetes in every Indexed-Job pod).

    Raises:
        PipelineError: the variable is missing, not an integer, or not below ``workers``.
    """
    raw = environ.get(COMPLETION_INDEX_ENV, "").strip()
    if not raw:
        raise PipelineError(f"${COMPLETION_INDEX_ENV} is not set: this command runs in a pod of an Indexed Job")
    try:
        index = int(raw)
    except ValueError:
        raise PipelineError(f"${COMPLETION_INDEX_ENV}={raw!r} is not an integer") from None
    if not 0 <= index < workers:
        raise PipelineError(f"${COMPLETION_INDEX_ENV}={index} is outside a group of {workers} workers")
    return index


# ---------------------------------------------------------------------------------------------- rendering


def template_text() -> str:
    """The manifest template shipped with the package (``pipelines/training/templates/tfjob-indexed.yaml``)."""
    return resources.files("pipelines.training").joinpath(TEMPLATE).read_text(encoding="utf-8")


def template_values(spec: TrainingJobSpec) -> dict[str, object]:
    """The value of every ``${field}`` of the template; ``None`` drops the key that holds it."""
    return {
        "name": spec.name,
        "service": spec.service,
        "namespace": spec.namespace,
        "labels": spec.labels,
        "image": spec.image,
        "workers": spec.workers,
        "workers_arg": str(spec.workers),
        "port": spec.port,
        "port_arg": str(spec.port),
        "cluster_domain": spec.cluster_domain,
        "params_path": spec.params_path,
        "job_dir": spec.job_dir,
        "pvc_name": spec.pvc_name,
        "tracking_uri": spec.tracking_uri,
        "secret_name": spec.secret_name,
        "service_account": spec.service_account,
        "cpu": spec.cpu,
        "memory": spec.memory,
        "shm_size": spec.shm_size,
        "gpus_per_worker": spec.gpus_per_worker or None,
        "backoff_limit": spec.backoff_limit,
        "exit_not_retryable": EXIT_NOT_RETRYABLE,
        "ttl_seconds_after_finished": spec.ttl_seconds_after_finished,
        "active_deadline_seconds": spec.active_deadline_seconds,
    }


_DROP = object()


def _fill(node: object, values: Mapping[str, object]) -> object:
    """``node`` with its placeholders replaced: a whole-string placeholder takes the value's type."""
    if isinstance(node, dict):
        filled = {str(_fill(key, values)): _fill(value, values) for key, value in node.items()}
        return {key: value for key, value in filled.items() if value is not _DROP}
    if isinstance(node, list):
        return [item for item in (_fill(child, values) for child in node) if item is not _DROP]
    if not isinstance(node, str):
        return node
    whole = _PLACEHOLDER.fullmatch(node)
    if whole:
        value = _lookup(values, whole.group(1))
        return _DROP if value is None else copy.deepcopy(value)

    def replace(match: re.Match[str]) -> str:
        value = _lookup(values, match.group(1))
        if value is None or isinstance(value, dict | list):
            raise ValueError(f"template: ${{{match.group(1)}}} cannot be part of a longer string")
        return str(value)

    return _PLACEHOLDER.sub(replace, node)


def _lookup(values: Mapping[str, object], key: str) -> object:
    if key not in values:
        raise ValueError(f"template: ${{{key}}} is not a field the renderer knows")
    return values[key]


def render_training_job(spec: TrainingJobSpec, template: str | None = None) -> list[dict[str, Any]]:
    """The manifests of ``spec``: the headless Service first, then the Indexed Job.

    ``template`` is the template's text (default: the packaged one).
    """
    documents = [doc for doc in yaml.safe_load_all(template if template is not None else template_text()) if doc]
    values = template_values(spec)
    manifests: list[dict[str, Any]] = []
    for document in documents:
        filled = _fill(document, values)
        if not isinstance(filled, dict):
            raise ValueError("template: every document must be a mapping")
        manifests.append(filled)
    return manifests


class _NoAliasDumper(yaml.SafeDumper):
    """A safe dumper that writes repeated values in full (no ``&id001`` anchors)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(manifests: Sequence[Mapping[str, Any]]) -> str:
    """``manifests`` as one multi-document YAML text (``kubectl apply -f -`` reads it)."""
    return yaml.dump_all(
        [dict(manifest) for manifest in manifests],
        Dumper=_NoAliasDumper,
        sort_keys=False,
        explicit_start=True,
        default_flow_style=False,
        width=120,
    )


# ---------------------------------------------------------------------------------------- submit and wait


class JobFailedError(PipelineError):
    """The training Job failed (or had already failed when it was submitted again)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class JobTimeoutError(PipelineError):
    """The training Job was still running when the wait timed out.

    Retryable: submitting the same manifests again re-attaches to the running Job.
    """

    retryable = True


class TransientApiError(PipelineError):
    """The Kubernetes API could not be reached or answered with a server error; polling goes on."""

    retryable = True


class ClusterApi(Protocol):
    """What :func:`submit_and_wait` needs from a cluster (the ``kubernetes`` client, or a fake in tests)."""

    def create(self, manifest: Mapping[str, Any], namespace: str) -> bool:
        """Create ``manifest``; return False if an object of that kind and name already exists."""
        ...

    def job_status(self, name: str, namespace: str) -> Mapping[str, Any]:
        """The Job's ``status`` as the API's JSON (``active``, ``failed``, ``conditions``, ...)."""
        ...

    def failed_pod_messages(self, job_name: str, namespace: str) -> list[str]:
        """One line per failed pod of the Job: index, exit code, reason, termination message."""
        ...

    def delete_job(self, name: str, namespace: str) -> None:
        """Delete the Job and its pods."""
        ...


@dataclass(frozen=True)
class JobOutcome:
    """A training Job that completed."""

    name: str
    namespace: str
    created: bool
    """False when the Job already existed and this call only waited for it."""
    seconds: float
    succeeded: int
    """Pods that succeeded: one per worker."""


JobState = Literal["running", "succeeded", "failed"]


def job_state(status: Mapping[str, Any]) -> tuple[JobState, str]:
    """Whether a Job whose ``status`` is given is running, succeeded or failed, and the condition's message.

    ``FailureTarget`` (failure decided, pods terminating) counts as failed, ``SuccessCriteriaMet`` as
    succeeded, like their final ``Failed`` and ``Complete`` conditions.
    """
    conditions = [c for c in status.get("conditions") or [] if str(c.get("status")) == "True"]
    for condition in conditions:
        if condition.get("type") in ("Failed", "FailureTarget"):
            return "failed", _condition_text(condition)
    for condition in conditions:
        if condition.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "succeeded", _condition_text(condition)
    return "running", ""


def _condition_text(condition: Mapping[str, Any]) -> str:
    reason, message = condition.get("reason") or "", condition.get("message") or ""
    return f"{reason}: {message}" if reason and message else str(reason or message or condition.get("type"))


def pod_failure_messages(pods: Sequence[Mapping[str, Any]], max_pods: int = 5, max_lines: int = 15) -> list[str]:
    """One line (plus the tail of its termination message) per failed pod in ``pods`` (API JSON)."""
    messages: list[str] = []
    for pod in pods:
        metadata, status = pod.get("metadata") or {}, pod.get("status") or {}
        index = (metadata.get("labels") or {}).get(INDEX_LABEL, "?")
        where = f"pod {metadata.get('name', '?')} (worker {index})"
        found = False
        for container in status.get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated") or {}
            code = terminated.get("exitCode")
            if code in (None, 0):
                continue
            found = True
            text = f"{where}: container {container.get('name', '?')} exited with code {code}"
            if terminated.get("reason"):
                text += f" ({terminated['reason']})"
            tail = [line for line in str(terminated.get("message") or "").splitlines() if line.strip()][-max_lines:]
            messages.append("\n    ".join([text, *tail]))
        if not found and status.get("phase") == "Failed":
            reason = ": ".join(str(part) for part in (status.get("reason"), status.get("message")) if part)
            messages.append(f"{where}: failed" + (f" ({reason})" if reason else ""))
    if len(messages) > max_pods:
        messages = [*messages[:max_pods], f"... and {len(messages) - max_pods} more failed pods"]
    return messages


def submit_and_wait(
    manifests: Sequence[Mapping[str, Any]],
    namespace: str,
    timeout_s: float,
    poll_s: float,
    api: ClusterApi | None = None,
    *,
    delete_on_timeout: bool = False,
    max_api_errors: int = 10,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> JobOutcome:
    """Create ``manifests`` in ``namespace`` and wait until their Job completes.

    Objects that already exist are kept as they are: a second call with the same manifests (an Airflow
    retry) waits for the Job the first one created. ``api`` defaults to the ``kubernetes`` client with
    the in-cluster configuration, or else ``~/.kube/config``. Up to ``max_api_errors`` API errors in a
    row (:class:`TransientApiError`) are waited out.

    Raises:
        ValueError: no Job among ``manifests``, a manifest in another namespace, or a bad timeout.
        PipelineError: ``api`` is None and the ``kubernetes`` package is not installed.
        JobFailedError: the Job failed; the message has its condition and the failed pods' last lines.
        JobTimeoutError: still running after ``timeout_s`` (deleted first if ``delete_on_timeout``).
    """
    if timeout_s <= 0 or poll_s <= 0:
        raise ValueError(f"timeout_s and poll_s must be positive, got {timeout_s} and {poll_s}")
    jobs = [manifest for manifest in manifests if manifest.get("kind") == "Job"]
    if len(jobs) != 1:
        raise ValueError(f"manifests: expected exactly one Job, got {len(jobs)}")
    for manifest in manifests:
        found = (manifest.get("metadata") or {}).get("namespace", namespace)
        if found != namespace:
            raise ValueError(f"namespace: {manifest.get('kind')} is for namespace {found!r}, not {namespace!r}")
    name = str(jobs[0]["metadata"]["name"])
    if api is None:
        api = kubernetes_api()

    start = clock()
    ordered = sorted(manifests, key=lambda manifest: manifest.get("kind") == "Job")  # the Service first
    created = True
    for manifest in ordered:
        new = api.create(manifest, namespace)
        if manifest.get("kind") == "Job":
            created = new
    where = f"job {namespace}/{name}"
    print(f"[k8s] {where} {'created' if created else 'already exists: waiting for it'}", flush=True)

    deadline = start + timeout_s
    errors = 0
    last_counts: tuple[int, int, int] | None = None
    while True:
        try:
            status = api.job_status(name, namespace)
            errors = 0
        except TransientApiError as error:
            errors += 1
            if errors > max_api_errors:
                raise TransientApiError(f"{where}: {errors} API errors in a row, the last: {error}") from None
            print(f"[k8s] {where}: {error} (retrying)", flush=True)
            status = None
        if status is not None:
            counts = (int(status.get("active") or 0), int(status.get("succeeded") or 0), int(status.get("failed") or 0))
            if counts != last_counts:
                print(f"[k8s] {where}: active={counts[0]} succeeded={counts[1]} failed={counts[2]}", flush=True)
                last_counts = counts
            state, text = job_state(status)
            if state == "succeeded":
                return JobOutcome(name, namespace, created, clock() - start, counts[1])
            if state == "failed":
                raise _failure(api, name, namespace, text, created)
        remaining = deadline - clock()
        if remaining <= 0:
            action = (
                "; deleted it" if delete_on_timeout else f" (still running: kubectl delete job -n {namespace} {name})"
            )
            if delete_on_timeout:
                api.delete_job(name, namespace)
            raise JobTimeoutError(f"{where}: not finished after {timeout_s:g} s{action}")
        sleep(min(poll_s, remaining))


def _failure(api: ClusterApi, name: str, namespace: str, condition: str, created: bool) -> JobFailedError:
    try:
        pods = api.failed_pod_messages(name, namespace)
    except TransientApiError as error:
        pods = [f"(could not list the pods: {error})"]
    earlier = "" if created else " (it had already failed before this submission: delete it or use a new name)"
    lines = [f"job {namespace}/{name} failed{earlier}: {condition}", *pods]
    # A user error (podFailurePolicy: FailJob) fails again on retry; so does re-attaching to a failed Job.
    retryable = created and "PodFailurePolicy" not in condition
    return JobFailedError("\n  ".join(lines), retryable=retryable)


class _KubernetesClientApi:
    """:class:`ClusterApi` over the official ``kubernetes`` client (imported only when used)."""

    _TRANSIENT = frozenset({0, 429, 500, 502, 503, 504})

    def __init__(self) -> None:
        try:
            client = importlib.import_module("kubernetes.client")
            config = importlib.import_module("kubernetes.config")
            exceptions = importlib.import_module("kubernetes.client.exceptions")
        except ImportError:
            raise PipelineError(
                "submitting to Kubernetes needs the `kubernetes` package: install it (`uv add kubernetes` or "
                "`pip install kubernetes`), or render the manifests and apply them with kubectl"
            ) from None
        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except (config.ConfigException, OSError) as error:
                raise PipelineError(f"no Kubernetes configuration (in-cluster or ~/.kube/config): {error}") from None
        self._api_client = client.ApiClient()
        self._core = client.CoreV1Api(self._api_client)
        self._batch = client.BatchV1Api(self._api_client)
        self._api_exception: type[Exception] = exceptions.ApiException
        try:
            self._network: tuple[type[Exception], ...] = (
                OSError,
                importlib.import_module("urllib3").exceptions.HTTPError,
            )
        except ImportError:
            self._network = (OSError,)

    def _error(self, what: str, error: Exception) -> PipelineError:
        """A :class:`PipelineError` for a failed API call; :class:`TransientApiError` if worth retrying."""
        if isinstance(error, self._network):
            return TransientApiError(f"{what}: {error}")
        status = int(getattr(error, "status", 0) or 0)
        text = f"{what}: HTTP {status} {getattr(error, 'reason', '')}".rstrip()
        if status in self._TRANSIENT:
            return TransientApiError(text)
        return PipelineError(f"{text}: {getattr(error, 'body', '')}")

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (self._api_exception, *self._network) as error:
            raise self._error(what, error) from None

    def create(self, manifest: Mapping[str, Any], namespace: str) -> bool:
        kind, name = manifest.get("kind"), manifest["metadata"]["name"]
        creators: dict[object, Callable[..., Any]] = {
            "Service": self._core.create_namespaced_service,
            "Job": self._batch.create_namespaced_job,
        }
        if kind not in creators:
            raise ValueError(f"manifests: cannot create a {kind}")
        try:
            creators[kind](namespace, body=dict(manifest))
        except (self._api_exception, *self._network) as error:
            if isinstance(error, self._api_exception) and int(getattr(error, "status", 0) or 0) == 409:
                return False  # already exists: keep it (a retry re-attaches to its Job)
            raise self._error(f"create {kind} {namespace}/{name}", error) from None
        return True

    def job_status(self, name: str, namespace: str) -> Mapping[str, Any]:
        job = self._call(
            f"read job {namespace}/{name}", lambda: self._batch.read_namespaced_job_status(name, namespace)
        )
        return dict(self._api_client.sanitize_for_serialization(job.status) or {})

    def failed_pod_messages(self, job_name: str, namespace: str) -> list[str]:
        pods = self._call(
            f"list pods of job {namespace}/{job_name}",
            lambda: self._core.list_namespaced_pod(namespace, label_selector=f"{JOB_NAME_LABEL}={job_name}"),
        )
        items = self._api_client.sanitize_for_serialization(pods).get("items") or []
        return pod_failure_messages(items)

    def delete_job(self, name: str, namespace: str) -> None:
        self._call(
            f"delete job {namespace}/{name}",
            lambda: self._batch.delete_namespaced_job(name, namespace, propagation_policy="Background"),
        )


def kubernetes_api() -> ClusterApi:
    """A :class:`ClusterApi` over the ``kubernetes`` client, configured in-cluster or from kubeconfig.

    Raises:
        PipelineError: the ``kubernetes`` package is not installed, or no configuration is found.
    """
    return _KubernetesClientApi()


# ------------------------------------------------------------------------------------------ in the pods


def prepare_job_file(job_dir: Path, params_path: Path, job_name: str, index: int, wait_s: float) -> None:
    """Make sure ``job.json`` (data version, run name) is in ``job_dir`` before training starts.

    The chief (index 0) writes it from the data version in the project's ``data.dvc`` if no earlier
    attempt did; the other workers wait up to ``wait_s`` seconds for it.

    Raises:
        TrainingError: the project has no data version yet (the chief) or ``job.json`` never appeared.
    """
    from pipelines.data.versioning import current_version
    from pipelines.project import Project
    from pipelines.training.train import JOB_FILE, TrainingError

    job_file = job_dir / JOB_FILE
    if job_file.is_file():
        return
    if index != 0:
        deadline = time.monotonic() + wait_s
        while not job_file.is_file():
            if time.monotonic() > deadline:
                error = TrainingError(f"{job_file}: not written by the chief (worker 0) within {wait_s:g} s")
                error.retryable = True
                raise error
            time.sleep(1.0)
        return
    project = Project.load(params_path)
    version = current_version(project)
    if not version:
        raise TrainingError(f"{project.root / 'data.dvc'}: no data version yet (run `mlops version` first)")
    now = datetime.now(UTC)
    spec = {
        "data_version": version,
        "run_name": f"{project.config.dataset.name}-{version[:8]}-{now:%Y%m%d-%H%M%S}",
        "job_id": job_dir.name,
    }
    job_dir.mkdir(parents=True, exist_ok=True)
    staged = job_dir / f".{JOB_FILE}.{os.getpid()}.tmp"
    staged.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(staged, job_file)


def run_pod_worker(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """One worker pod: ``TF_CONFIG`` from ``$JOB_COMPLETION_INDEX``, then :func:`pipelines.training.train.run_worker`.

    Returns the exit code: 0, :data:`EXIT_RETRYABLE` or :data:`EXIT_NOT_RETRYABLE` (which fails the Job
    through its podFailurePolicy). Other exceptions (a peer lost mid-epoch) propagate and exit 1, which
    counts towards the Job's backoff limit.
    """
    from pipelines.project import Project
    from pipelines.training.train import RESULT_FILE, run_worker

    environ = os.environ if environ is None else environ
    try:
        index = completion_index(environ, args.workers)
        tf_config = tf_config_for_index(
            args.job_name,
            args.service,
            args.namespace,
            args.workers,
            args.port,
            index,
            cluster_domain=args.cluster_domain,
        )
    except (PipelineError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_NOT_RETRYABLE
    os.environ["TF_CONFIG"] = tf_config
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    print(f"[worker {index}] TF_CONFIG={tf_config}", flush=True)
    job_dir = Path(args.job_dir)
    try:
        if (job_dir / RESULT_FILE).is_file():
            # The chief already finished this job (e.g. this pod replaces one that failed after training).
            print(f"[worker {index}] {job_dir / RESULT_FILE} exists: the job is finished", flush=True)
            return 0
        prepare_job_file(job_dir, Path(args.params), args.job_name, index, args.job_file_wait)
        run_worker(Project.load(Path(args.params)), job_dir)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_RETRYABLE if error.retryable else EXIT_NOT_RETRYABLE
    return 0


# ---------------------------------------------------------------------------------------------- command line


def spec_from_args(args: argparse.Namespace) -> TrainingJobSpec:
    """The :class:`TrainingJobSpec` of ``render``/``submit`` options (``--job-dir`` defaults as locally)."""
    job_dir = args.job_dir or str(PurePosixPath(args.params_path).parent / "artifacts" / "training" / args.name)
    return TrainingJobSpec(
        name=args.name,
        namespace=args.namespace,
        image=args.image,
        workers=args.workers,
        params_path=args.params_path,
        job_dir=job_dir,
        pvc_name=args.pvc_name,
        tracking_uri=args.tracking_uri,
        secret_name=args.secret_name,
        gpus_per_worker=args.gpus_per_worker,
        cpu=args.cpu,
        memory=args.memory,
        port=args.port,
        service_account=args.service_account,
        max_restarts=args.max_restarts,
        ttl_seconds_after_finished=args.ttl_seconds_after_finished,
        active_deadline_seconds=args.active_deadline_seconds,
        shm_size=args.shm_size,
        cluster_domain=args.cluster_domain,
    )


def _add_spec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="Job (and Service) name: a DNS label of at most 52 characters")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--image", required=True, help="trainer image with an explicit tag, e.g. repo/trainer:1.2.3")
    parser.add_argument("--workers", type=int, required=True, help="worker pods (one MultiWorkerMirrored worker each)")
    parser.add_argument("--gpus-per-worker", type=int, default=1)
    parser.add_argument("--cpu", default="4", help="CPU request per worker")
    parser.add_argument("--memory", default="16Gi", help="memory request and limit per worker")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="the workers' gRPC port")
    parser.add_argument(
        "--params-path", required=True, help="params.yaml inside the pods, e.g. /workspace/p/params.yaml"
    )
    parser.add_argument("--job-dir", help="job folder under /workspace (default: <project>/artifacts/training/<name>)")
    parser.add_argument("--pvc-name", required=True, help="shared PersistentVolumeClaim mounted at /workspace")
    parser.add_argument("--tracking-uri", required=True, help="MLFLOW_TRACKING_URI of the workers")
    parser.add_argument("--secret-name", required=True, help="Secret with AWS_* (and MLflow) credentials")
    parser.add_argument("--service-account")
    parser.add_argument("--max-restarts", type=int, default=1, help="whole-group restarts before the Job fails")
    parser.add_argument("--ttl-seconds-after-finished", type=int, default=86_400)
    parser.add_argument("--active-deadline-seconds", type=int)
    parser.add_argument("--shm-size", default="2Gi", help="size of /dev/shm (memory-backed)")
    parser.add_argument("--cluster-domain", default="cluster.local")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m pipelines.training.kubernetes`` parser: ``render``, ``submit`` and ``worker``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.training.kubernetes", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="print the Service and Indexed Job as YAML")
    _add_spec_options(render)
    submit = commands.add_parser("submit", help="create the Service and Job and wait for the Job (needs `kubernetes`)")
    _add_spec_options(submit)
    submit.add_argument("--timeout", type=float, default=86_400.0, help="seconds to wait for the Job")
    submit.add_argument("--poll", type=float, default=15.0, help="seconds between status checks")
    submit.add_argument("--delete-on-timeout", action="store_true")
    worker = commands.add_parser("worker", help="run one worker inside an Indexed-Job pod")
    worker.add_argument("--params", required=True)
    worker.add_argument("--job-dir", required=True)
    worker.add_argument("--workers", type=int, required=True)
    worker.add_argument("--job-name", required=True)
    worker.add_argument("--service", required=True)
    worker.add_argument("--namespace", required=True)
    worker.add_argument("--port", type=int, default=DEFAULT_PORT)
    worker.add_argument("--cluster-domain", default="cluster.local")
    worker.add_argument("--job-file-wait", type=float, default=600.0, help="seconds to wait for the chief's job.json")
    return parser


K8S_ENV_PREFIX = "MLOPS_K8S_"


def spec_from_environment(
    project: Project, job_id: str, try_number: int, environ: Mapping[str, str]
) -> TrainingJobSpec:
    """The job spec of an Airflow train task, from ``MLOPS_K8S_*`` settings and ``train.workers``.

    ``MLOPS_K8S_IMAGE``, ``MLOPS_K8S_NAMESPACE``, ``MLOPS_K8S_PVC``, ``MLOPS_K8S_SECRET`` and
    ``MLOPS_K8S_TRACKING_URI`` are required; ``MLOPS_K8S_PROJECT_DIR`` (default ``/workspace/project``)
    is where the pods see the project, ``MLOPS_K8S_GPUS_PER_WORKER`` defaults to 1. Each try of the task
    gets its own Job name and the same job folder, so a retry resumes from the checkpoints.
    """
    required = ("IMAGE", "NAMESPACE", "PVC", "SECRET", "TRACKING_URI")
    missing = [name for name in required if not environ.get(K8S_ENV_PREFIX + name)]
    if missing:
        raise PipelineError(f"training on Kubernetes needs {', '.join(K8S_ENV_PREFIX + name for name in missing)}")
    from pipelines.training.train import job_dir_for

    project_dir = PurePosixPath(environ.get(K8S_ENV_PREFIX + "PROJECT_DIR", str(WORKSPACE / "project")))
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:10]
    folder = job_dir_for(project, job_id).name
    return TrainingJobSpec(
        name=f"train-{digest}-{try_number}",
        namespace=environ[K8S_ENV_PREFIX + "NAMESPACE"],
        image=environ[K8S_ENV_PREFIX + "IMAGE"],
        workers=project.config.train.workers,
        gpus_per_worker=int(environ.get(K8S_ENV_PREFIX + "GPUS_PER_WORKER", "1")),
        params_path=str(project_dir / "params.yaml"),
        job_dir=str(project_dir / "artifacts" / "training" / folder),
        pvc_name=environ[K8S_ENV_PREFIX + "PVC"],
        tracking_uri=environ[K8S_ENV_PREFIX + "TRACKING_URI"],
        secret_name=environ[K8S_ENV_PREFIX + "SECRET"],
        max_restarts=project.config.train.max_restarts,
    )


def train_on_kubernetes(project: Project, job_id: str, try_number: int, timeout_s: float = 3 * 3600) -> str:
    """Run the training job on Kubernetes, wait for it, and return the MLflow run id its chief logged."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import connect

    spec = spec_from_environment(project, job_id, try_number, os.environ)
    submit_and_wait(render_training_job(spec), spec.namespace, timeout_s, 15.0)
    folder = PurePosixPath(spec.job_dir).name
    experiment_id = connect(project)
    runs = MlflowClient().search_runs([experiment_id], filter_string=f"tags.training_job = '{folder}'", max_results=1)
    if not runs:
        raise PipelineError(f"Kubernetes job {spec.name} finished but no MLflow run is tagged training_job={folder}")
    return str(runs[0].info.run_id)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.training.kubernetes``."""
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        return run_pod_worker(args)
    try:
        spec = spec_from_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    manifests = render_training_job(spec)
    if args.command == "render":
        sys.stdout.write(to_yaml(manifests))
        return 0
    try:
        outcome = submit_and_wait(
            manifests, spec.namespace, args.timeout, args.poll, delete_on_timeout=args.delete_on_timeout
        )
    except (PipelineError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"job {outcome.namespace}/{outcome.name} succeeded in {outcome.seconds:.0f} s ({outcome.succeeded} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
