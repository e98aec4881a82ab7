"""Talking to running prediction services: deploy a new champion, ask what they serve, send images.

Which services: ``$MLOPS_SERVE_ENDPOINTS`` (comma-separated) or ``serve.endpoints``. An endpoint written
``dns+http://name:port`` means every address ``name`` resolves to: the replicas behind a compose service
name or a Kubernetes headless Service, so one deploy call reaches each of them.

:func:`deploy_champion` (the promote DAG's ``deploy`` task; a rollback takes the same path) asks every
replica to load, check and swap to the new champion (``POST /admin/deploy`` with the bearer token) or,
without a token, waits for the replica's own alias poller to swap. It fails, naming
the endpoint and the reason, when a replica refuses the version (it keeps serving the old one); it is
skipped when no replica answers and ``serve.require_running`` is false (``make run`` with no service).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipelines.errors import PipelineError
from pipelines.project import Project

ENDPOINTS_ENV = "MLOPS_SERVE_ENDPOINTS"
TOKEN_ENV = "MLOPS_SERVE_TOKEN"
"""The admin token's environment variable (never read from a file, never logged)."""
DNS_PREFIX = "dns+"


class DeployError(PipelineError):
    """A service refused the new champion (it keeps serving the old one), or none answered when one must."""


class ServicesUnreachableError(DeployError):
    """No service answered although ``serve.require_running`` says one must: waiting may cure it."""

    retryable = True


@dataclass(frozen=True)
class Replica:
    """One service process to call: its URL and the Host header its endpoint's name gives it."""

    endpoint: str
    url: str
    host_header: str | None = None


@dataclass(frozen=True)
class ReplicaOutcome:
    """What one replica did with a deploy: ``deployed``, ``unchanged``, ``refused`` or ``unreachable``.

    A service of another registered model counts as unreachable: it is not this project's to deploy to.
    """

    replica: Replica
    state: str
    version: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class DeployReport:
    """Every replica's outcome, and ``skipped`` (why) when no service was there to deploy to."""

    version: str
    outcomes: list[ReplicaOutcome] = field(default_factory=list)
    skipped: str = ""

    def summary(self) -> str:
        """One line per replica."""
        if self.skipped:
            return f"deploy of version {self.version} skipped: {self.skipped}"
        lines = [f"deploy of version {self.version}:"]
        for outcome in self.outcomes:
            detail = f" ({outcome.detail})" if outcome.detail else ""
            lines.append(f"  {outcome.replica.url}: {outcome.state}{detail}")
        return "\n".join(lines)


def endpoints(project: Project) -> list[str]:
    """The configured service endpoints: ``$MLOPS_SERVE_ENDPOINTS`` (comma-separated) or ``serve.endpoints``."""
    configured = os.environ.get(ENDPOINTS_ENV)
    if configured is not None:
        return [item.strip().rstrip("/") for item in configured.split(",") if item.strip()]
    return list(project.config.serve.endpoints)


def replicas(endpoint: str) -> list[Replica]:
    """The processes behind ``endpoint``: itself, or every address of its name with ``dns+``."""
    if not endpoint.startswith(DNS_PREFIX):
        return [Replica(endpoint, endpoint)]
    url = endpoint.removeprefix(DNS_PREFIX)
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
    except OSError:
        return [Replica(endpoint, url)]  # reported as unreachable by the caller
    found = []
    for address in addresses:
        literal = f"[{address}]" if ":" in address else address
        found.append(
            Replica(endpoint, urlunsplit((parts.scheme, f"{literal}:{port}", parts.path, "", "")), parts.netloc)
        )
    return found


def _headers(replica: Replica, token: str | None = None) -> dict[str, str]:
    headers = {"Host": replica.host_header} if replica.host_header else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _detail(response: Any) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return str(response.text)[:500]


def deploy_champion(project: Project, version: str, token: str | None = None) -> DeployReport:
    """Tell every configured service to serve ``version`` (the champion now); see the module docstring."""
    settings = project.config.serve
    targets = [replica for endpoint in endpoints(project) for replica in replicas(endpoint)]
    if not targets:
        return DeployReport(version, skipped=f"no service configured (serve.endpoints, {ENDPOINTS_ENV})")
    name = project.config.registry.model_name
    outcomes = [_deploy_one(replica, name, str(version), token, settings) for replica in targets]
    refused = [outcome for outcome in outcomes if outcome.state == "refused"]
    unreachable = [outcome for outcome in outcomes if outcome.state == "unreachable"]
    if refused:
        reasons = "; ".join(f"{outcome.replica.url} refused it: {outcome.detail}" for outcome in refused)
        raise DeployError(f"deploy of version {version} failed: {reasons}")
    if unreachable and settings.require_running:
        names = ", ".join(outcome.replica.url for outcome in unreachable)
        raise ServicesUnreachableError(
            f"deploy of version {version}: no answer from {names} (serve.require_running is true)"
        )
    if len(unreachable) == len(outcomes):
        names = ", ".join(
            f"{outcome.replica.url} ({outcome.detail})"
            if outcome.detail.startswith("it serves")
            else outcome.replica.url
            for outcome in unreachable
        )
        return DeployReport(
            version, outcomes, skipped=f"no service answers at {names}; a service loads the champion when it starts"
        )
    return DeployReport(version, outcomes)


def _deploy_one(replica: Replica, model: str, version: str, token: str | None, settings: Any) -> ReplicaOutcome:
    import httpx

    try:
        health = httpx.get(
            f"{replica.url}/health", headers=_headers(replica), timeout=settings.status_timeout_seconds
        ).json()
    except httpx.HTTPError as error:
        return ReplicaOutcome(replica, "unreachable", detail=f"{type(error).__name__}")
    except ValueError:
        return ReplicaOutcome(replica, "refused", detail="GET /health did not answer JSON: not a prediction service")
    if health.get("model") != model:  # another project's service: not ours to deploy to
        return ReplicaOutcome(
            replica,
            "unreachable",
            detail=f"it serves model {health.get('model')!r}, not {model!r}: check serve.endpoints",
        )
    if token:
        try:
            response = httpx.post(
                f"{replica.url}/admin/deploy",
                json={"version": version},
                headers=_headers(replica, token),
                timeout=settings.deploy_timeout_seconds,
            )
        except httpx.HTTPError as error:
            return ReplicaOutcome(replica, "refused", detail=f"no answer to the deploy call ({type(error).__name__})")
        if response.status_code == 200:
            answer = response.json()
            return ReplicaOutcome(
                replica, "deployed" if answer.get("changed") else "unchanged", str(answer.get("version"))
            )
        if response.status_code != 403:
            return ReplicaOutcome(replica, "refused", detail=f"HTTP {response.status_code}: {_detail(response)}")
    return _wait_for_poller(replica, version, settings)


def _wait_for_poller(replica: Replica, version: str, settings: Any) -> ReplicaOutcome:
    """Without the admin call: wait until the replica's alias poller serves ``version`` or refuses it."""
    import httpx

    deadline = time.monotonic() + settings.deploy_timeout_seconds
    last = ""
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(
                f"{replica.url}/model", headers=_headers(replica), timeout=settings.status_timeout_seconds
            )
            document = answer.json()
        except (httpx.HTTPError, ValueError) as error:
            last = type(error).__name__
        else:
            if str(document.get("version")) == version:
                return ReplicaOutcome(replica, "deployed", version, "picked up by its alias poller")
            reason = (document.get("failed") or {}).get(version)
            if reason:
                return ReplicaOutcome(replica, "refused", detail=str(reason))
            last = f"serving version {document.get('version', 'none')}"
        time.sleep(min(1.0, settings.poll_seconds))
    return ReplicaOutcome(
        replica,
        "refused",
        detail=f"did not serve version {version} within serve.deploy_timeout_seconds="
        f"{settings.deploy_timeout_seconds:g} ({last}; no admin token, so it swaps on its serve.poll_seconds poll)",
    )


def served_versions(project: Project) -> list[dict[str, Any]]:
    """What each configured service replica serves (``GET /model``, bounded timeout), or ``unreachable``."""
    import httpx

    timeout = project.config.serve.status_timeout_seconds
    found = []
    for endpoint in endpoints(project):
        for replica in replicas(endpoint):
            entry: dict[str, Any] = {"endpoint": replica.url}
            try:
                response = httpx.get(f"{replica.url}/model", headers=_headers(replica), timeout=timeout)
                document = response.json()
            except httpx.ConnectError:
                entry.update(state="not running", detail="(nothing answers: `make serve` starts one)")
            except (httpx.HTTPError, ValueError) as error:
                entry.update(state="unreachable", detail=type(error).__name__)
            else:
                if response.status_code == 200:
                    entry.update(
                        state="serving", version=str(document.get("version")), loaded_at=document.get("loaded_at", "")
                    )
                else:
                    entry.update(state="no model", detail=str(document.get("detail", "")))
            found.append(entry)
    return found


def predict_files(endpoint: str, files: Sequence[Path], timeout: float = 60.0) -> list[dict[str, Any]]:
    """Send ``files`` to ``endpoint``'s ``/predict`` (one request each); one answer per file, in order.

    Each answer is the prediction (``class``, ``confidence``, ``model_version``, ``request_id``) or ``error``.
    """
    import httpx

    url = endpoint.removeprefix(DNS_PREFIX).rstrip("/")
    answers = []
    with httpx.Client(timeout=timeout) as client:
        for path in files:
            entry: dict[str, Any] = {"file": str(path)}
            try:
                data = path.read_bytes()
                response = client.post(f"{url}/predict", files={"image": (path.name, data)})
            except OSError as error:
                entry["error"] = f"cannot read the file: {error.strerror or error}"
            except httpx.HTTPError as error:
                entry["error"] = f"no answer from {url} ({type(error).__name__})"
            else:
                if response.status_code == 200:
                    document = response.json()
                    prediction = document["predictions"][0]
                    entry.update(
                        {"class": prediction["class"], "confidence": prediction["confidence"],
                         "model_version": document["model_version"], "request_id": document["request_id"]}
                    )  # fmt: skip
                else:
                    entry["error"] = f"HTTP {response.status_code}: {_detail(response)}"
            answers.append(entry)
    return answers
