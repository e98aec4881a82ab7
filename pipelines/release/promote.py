"""Promote: move the ``champion`` alias to a registered version, safely and with an audit trail.

Steps (each a function, so the ``promote`` DAG runs them as separate tasks and the CLI in a row):

1. :func:`resolve_version` – a version number, ``challenger``, or ``previous`` (the champion before the
   current one: that is a rollback);
2. :func:`check_gate` – a version whose gate failed (or was never gated) is refused unless ``force``,
   and a forced promotion is recorded as such;
3. :func:`infra_validate` – load the version through the pyfunc flavour in a fresh process, predict
   batches of the test split, check output shape and signature, and the 95th-percentile batch latency;
4. :func:`set_champion` – under a lock: move the alias, tag the version (who, when, why, which version
   it replaced) and append to the champion history kept as tags of the registered model.

Promoting the current champion again changes nothing. The reference profile used for drift checks is
replaced by the new champion's training-data profile.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from pipelines.errors import PipelineError
from pipelines.files import write_atomic
from pipelines.project import CHALLENGER_ALIAS, CHAMPION_ALIAS, Project

HISTORY_TAG_PREFIX = "champion_history."
PROFILE_ARTIFACT = "data/profile.json"


class PromotionError(PipelineError):
    """The version cannot be promoted (unknown, failed gate, failed infra validation)."""


@dataclass(frozen=True)
class HistoryEntry:
    """One change of champion: which version, which it replaced, when, by whom, why."""

    sequence: int
    version: str
    previous: str | None
    at: str
    by: str
    reason: str
    forced: bool
    action: str


@dataclass(frozen=True)
class GateCheck:
    """The gate verdict a version carries, and whether promoting it anyway was forced."""

    version: str
    gate: str
    forced: bool


@dataclass(frozen=True)
class InfraReport:
    """What the fresh-process check measured."""

    version: str
    batches: int
    batch_size: int
    output_shape: list[int]
    p95_latency_ms: float
    budget_ms: float


@dataclass(frozen=True)
class PromotionResult:
    """The champion after the promotion, the one before, and whether anything changed."""

    version: str
    previous: str | None
    changed: bool
    forced: bool


def _client(project: Project) -> Any:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import connect

    connect(project)
    return MlflowClient()


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def champion_history(project: Project) -> list[HistoryEntry]:
    """Every change of champion, oldest first."""
    from mlflow.exceptions import MlflowException

    client = _client(project)
    try:
        model = client.get_registered_model(project.config.registry.model_name)
    except MlflowException:
        return []
    entries = [
        HistoryEntry(**json.loads(value)) for key, value in model.tags.items() if key.startswith(HISTORY_TAG_PREFIX)
    ]
    return sorted(entries, key=lambda entry: entry.sequence)


def champion_at(project: Project, when: datetime) -> HistoryEntry | None:
    """The history entry that made the champion serving at ``when`` (UTC), or None before the first."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    serving = None
    for entry in champion_history(project):
        if datetime.fromisoformat(entry.at) <= when:
            serving = entry
    return serving


def resolve_version(project: Project, spec: str) -> str:
    """The version number meant by ``spec``: a number, ``challenger`` or ``previous``."""
    from mlflow.exceptions import MlflowException

    client = _client(project)
    name = project.config.registry.model_name
    spec = str(spec).strip()
    if spec == CHALLENGER_ALIAS:
        version = _alias_version(client, name, CHALLENGER_ALIAS)
        if version is None:
            raise PromotionError(f"{name}: no version holds the alias 'challenger' (run the retrain DAG first)")
        return version
    if spec == "previous":
        history = champion_history(project)
        if not history or history[-1].previous is None:
            raise PromotionError(f"{name}: there is no previous champion to roll back to")
        return history[-1].previous
    if not re.fullmatch(r"[0-9]+", spec):
        raise PromotionError(f"version: expected a number, 'challenger' or 'previous', got {spec!r}")
    try:
        client.get_model_version(name, spec)
    except MlflowException:
        raise PromotionError(f"{name}: version {spec} does not exist") from None
    return spec


def check_gate(project: Project, version: str, force: bool = False) -> GateCheck:
    """Refuse a version whose gate did not pass, unless ``force`` (which is then recorded)."""
    client = _client(project)
    tags = client.get_model_version(project.config.registry.model_name, version).tags
    gate = tags.get("gate", "missing")
    if gate != "passed" and not force:
        raise PromotionError(
            f"{project.config.registry.model_name} version {version}: gate {gate}; "
            "refusing to promote it (pass force=true to override, which is recorded)"
        )
    return GateCheck(version=version, gate=gate, forced=gate != "passed")


def infra_validate(project: Project, version: str) -> InfraReport:
    """Load ``version`` through pyfunc in a fresh process, predict test batches, check shape and p95 latency."""
    from pipelines.tracking import tracking_uri

    settings = project.config.promote
    uri = f"models:/{project.config.registry.model_name}/{version}"
    command = [sys.executable, "-m", "pipelines.release.infra_check", "--params", str(project.params_path), uri]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(project)}
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=settings.timeout_seconds, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise PromotionError(f"{uri}: infra validation timed out after {settings.timeout_seconds} s") from None
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        detail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise PromotionError(f"{uri}: infra validation failed: {detail}")
    return InfraReport(**json.loads(lines[-1]))


def set_champion(
    project: Project, version: str, reason: str, *, forced: bool = False, actor: str | None = None
) -> PromotionResult:
    """Move ``champion`` to ``version`` and record who, when, why and what it replaced (idempotent)."""
    from pipelines.release.register import registry_lock
    from pipelines.tracking import with_retries

    if not reason.strip():
        raise PromotionError("reason: a promotion needs a reason")
    client = _client(project)
    name = project.config.registry.model_name
    actor = actor or os.environ.get("MLOPS_USER") or getpass.getuser()
    with registry_lock(project):
        previous = _alias_version(client, name, CHAMPION_ALIAS)
        if previous == version:
            return PromotionResult(version=version, previous=previous, changed=False, forced=forced)
        history = champion_history(project)
        rollback = bool(history) and history[-1].previous == version
        entry = HistoryEntry(
            sequence=(history[-1].sequence + 1) if history else 1,
            version=version,
            previous=previous,
            at=datetime.now(UTC).isoformat(timespec="seconds"),
            by=actor,
            reason=reason.strip(),
            forced=forced,
            action="rollback" if rollback else "promote",
        )
        audit = {
            "promoted_by": entry.by,
            "promoted_at": entry.at,
            "promotion_reason": entry.reason,
            "promotion_forced": str(forced).lower(),
            "replaced_version": previous or "none",
        }

        def record() -> None:
            # History first: if a later write fails, the history still tells what was attempted,
            # and the retried task writes the same entry again (same sequence key).
            client.set_registered_model_tag(
                name, f"{HISTORY_TAG_PREFIX}{entry.sequence:06d}", json.dumps(asdict(entry))
            )
            client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
            for key, value in audit.items():
                client.set_model_version_tag(name, version, key, value)
            if previous is not None:
                client.set_model_version_tag(name, previous, "retired_at", entry.at)

        with_retries(record, f"make version {version} champion")
        _install_reference_profile(project, client, version)
    return PromotionResult(version=version, previous=previous, changed=True, forced=forced)


def _install_reference_profile(project: Project, client: Any, version: str) -> None:
    """Make the champion's training-data profile the reference for drift checks."""
    import tempfile
    from pathlib import Path

    run_id = client.get_model_version(project.config.registry.model_name, version).run_id
    target = project.path(project.config.validation.reference_profile)
    try:
        with tempfile.TemporaryDirectory() as folder:
            downloaded = client.download_artifacts(run_id, PROFILE_ARTIFACT, folder)
            write_atomic(target, Path(downloaded).read_bytes())
    except Exception as error:  # a model without a logged profile simply disables the drift check
        print(f"note: no data profile logged with version {version}; drift reference unchanged ({error})")


def promote(
    project: Project, spec: str, reason: str, *, force: bool = False, actor: str | None = None
) -> PromotionResult:
    """Resolve, check the gate, validate in a fresh process, then make the version champion."""
    if not reason.strip():
        raise PromotionError("reason: a promotion needs a reason")
    version = resolve_version(project, spec)
    client = _client(project)
    if _alias_version(client, project.config.registry.model_name, CHAMPION_ALIAS) == version:
        return PromotionResult(version=version, previous=version, changed=False, forced=False)
    gate = check_gate(project, version, force)
    infra_validate(project, version)
    return set_champion(project, version, reason, forced=gate.forced, actor=actor)


def rollback(project: Project, reason: str, *, actor: str | None = None) -> PromotionResult:
    """Make the previous champion champion again, audited like any promotion."""
    return promote(project, "previous", reason, force=True, actor=actor)
