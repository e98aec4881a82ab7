"""Promote: move the ``champion`` alias to a registered version, safely and with an audit trail.

Steps (each a function, so the ``promote`` DAG runs them as separate tasks and the CLI in a row):

1. :func:`resolve_version` – a version number, ``challenger``, or ``previous`` (the champion before the
   current one: that is a rollback);
2. :func:`check_gate` – a version whose gate failed (or was never gated) is refused unless ``force``,
   and a forced promotion is recorded as such;
3. :func:`~pipelines.release.infra_check.infra_validate` – load the version as any MLflow user would, in a
   clean process with no project setting, check its signature, that it reproduces the predictions logged at
   evaluation and its p95 batch latency; a version logged before the registry's contract is refused unless
   forced;
4. :func:`set_champion` – under a lock: refuse a version not tagged as infra-validated (unless forced),
   append to the champion history (:mod:`pipelines.release.champion_ledger`), move the alias and tag the
   version (who, when, why, which version it replaced).

Promoting the current champion again changes nothing. The reference profile used for drift checks is
replaced by the new champion's training-data profile.
"""

from __future__ import annotations

import getpass
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipelines.errors import PromotionError
from pipelines.files import write_atomic
from pipelines.project import CHALLENGER_ALIAS, CHAMPION_ALIAS, Project
from pipelines.release.champion_ledger import (
    alias_version,
    champion_history,
    converge_champion,
    record_change,
    registry_client,
)
from pipelines.release.infra_check import INFRA_TAG, infra_validate

PROFILE_ARTIFACT = "data/profile.json"


@dataclass(frozen=True)
class GateCheck:
    """The gate verdict a version carries, and whether promoting it anyway was forced."""

    version: str
    gate: str
    forced: bool


@dataclass(frozen=True)
class PromotionResult:
    """The champion after the promotion, the one before, and whether anything changed."""

    version: str
    previous: str | None
    changed: bool
    forced: bool


def resolve_version(project: Project, spec: str) -> str:
    """The version number meant by ``spec``: a number, ``challenger`` or ``previous``."""
    from mlflow.exceptions import MlflowException

    client = registry_client(project)
    name = project.config.registry.model_name
    spec = str(spec).strip()
    if spec == CHALLENGER_ALIAS:
        version = alias_version(client, name, CHALLENGER_ALIAS)
        if version is None:
            raise PromotionError(f"{name}: no version holds the alias 'challenger' (run the retrain DAG first)")
        return version
    if spec == "previous":
        history = champion_history(project)
        if not history or history[-1].previous is None:
            raise PromotionError(f"{name}: there is no previous champion to roll back to")
        previous = history[-1].previous
        try:
            client.get_model_version(name, previous)
        except MlflowException:
            raise PromotionError(
                f"{name}: the previous champion, version {previous}, is no longer in the registry (deleted by hand?); "
                "roll back by promoting a version that exists (version=N)"
            ) from None
        return previous
    if not re.fullmatch(r"[0-9]+", spec):
        raise PromotionError(f"version: expected a number, 'challenger' or 'previous', got {spec!r}")
    try:
        client.get_model_version(name, spec)
    except MlflowException:
        raise PromotionError(f"{name}: version {spec} does not exist") from None
    return spec


def check_gate(project: Project, version: str, force: bool = False) -> GateCheck:
    """Refuse a version whose gate did not pass, unless ``force`` (which is then recorded)."""
    client = registry_client(project)
    tags = client.get_model_version(project.config.registry.model_name, version).tags
    gate = tags.get("gate", "missing")
    if gate != "passed" and not force:
        raise PromotionError(
            f"{project.config.registry.model_name} version {version}: gate {gate}; "
            "refusing to promote it (pass force=true to override, which is recorded)"
        )
    return GateCheck(version=version, gate=gate, forced=gate != "passed")


def set_champion(
    project: Project, version: str, reason: str, *, forced: bool = False, actor: str | None = None
) -> PromotionResult:
    """Move ``champion`` to ``version`` and record who, when, why and what it replaced (idempotent).

    Only a version tagged as having passed :func:`infra_validate` can become champion, unless ``forced``
    (recorded in the history): marking the validation task successful by hand does not get past this.
    """
    from pipelines.release.register import registry_lock
    from pipelines.tracking import with_retries

    if not reason.strip():
        raise PromotionError("reason: a promotion needs a reason")
    client = registry_client(project)
    name = project.config.registry.model_name
    infra = str(client.get_model_version(name, version).tags.get(INFRA_TAG, ""))
    if not infra.startswith("passed") and not forced:
        raise PromotionError(
            f"{name} version {version} has not passed infra validation ({infra or 'never validated'}); "
            "validate it first (the promote DAG does), or force it (recorded)"
        )
    actor = actor or os.environ.get("MLOPS_USER") or getpass.getuser()
    with registry_lock(project):  # this host; the ledger orders promotions across hosts
        current = alias_version(client, name, CHAMPION_ALIAS)
        if current == version:
            return PromotionResult(version=version, previous=current, changed=False, forced=forced)
        history = champion_history(project)
        rollback = bool(history) and history[-1].previous == version
        entry = {
            "version": version,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "by": actor,
            "reason": reason.strip(),
            "forced": forced,
            "action": "rollback" if rollback else "promote",
        }
        recorded_as = record_change(client, name, version, entry)
        history = champion_history(project)
        ours = next((item for item in history if item.ledger_version == recorded_as), None)
        previous = ours.previous if ours is not None else current
        audit = {
            "promoted_by": actor,
            "promoted_at": entry["at"],
            "promotion_reason": entry["reason"],
            "promotion_forced": str(forced).lower(),
            "replaced_version": previous or "none",
        }

        def tag() -> None:
            for key, value in audit.items():
                client.set_model_version_tag(name, version, key, value)
            if previous is not None:
                client.set_model_version_tag(name, previous, "retired_at", entry["at"])

        with_retries(tag, f"record the promotion of version {version}")
        # Only now the alias moves: whoever follows it (a prediction service) finds the audit tags already there.
        champion = converge_champion(client, name)
        from pipelines.release.model_card import publish_model_card

        for changed in (version, previous):
            if changed is not None:
                publish_model_card(project, changed)  # the cards say who promoted or retired them, when and why
        if champion == version:
            _install_reference_profile(project, client, version)
        else:
            print(f"note: a promotion recorded after this one (elsewhere) made version {champion} champion")
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
    client = registry_client(project)
    if alias_version(client, project.config.registry.model_name, CHAMPION_ALIAS) == version:
        return PromotionResult(version=version, previous=version, changed=False, forced=False)
    gate = check_gate(project, version, force)
    report = infra_validate(project, version, force=force)
    return set_champion(project, version, reason, forced=gate.forced or bool(report.skipped), actor=actor)


def rollback(project: Project, reason: str, *, actor: str | None = None) -> PromotionResult:
    """Make the previous champion champion again, audited like any promotion."""
    return promote(project, "previous", reason, force=True, actor=actor)
