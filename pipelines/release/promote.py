"""Promote: move the ``champion`` alias to a registered version, safely and with an audit trail.

Steps (each a function, so the ``promote`` DAG runs them as separate tasks and the CLI in a row):

1. :func:`resolve_version` – a version number, ``challenger``, or ``previous`` (the champion before the
   current one: that is a rollback);
2. :func:`check_gate` – a version whose gate failed (or was never gated) is refused unless ``force``,
   and a forced promotion is recorded as such;
3. :func:`infra_validate` – load the version as any MLflow user would, in a clean process with no project
   setting, check its signature, that it reproduces the predictions logged at evaluation and its p95
   batch latency; a version logged before the registry's contract is refused unless forced;
4. :func:`set_champion` – under a lock: refuse a version not tagged as infra-validated (unless forced),
   move the alias, tag the version (who, when, why, which version it replaced) and append to the champion
   history kept as tags of the registered model.

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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipelines.errors import PipelineError
from pipelines.files import write_atomic
from pipelines.project import CHALLENGER_ALIAS, CHAMPION_ALIAS, Project

HISTORY_TAG_PREFIX = "champion_history."
"""Where releases before the ledger kept the history (tags of the registered model); still read."""
LEDGER_SUFFIX = ".champion-ledger"
ENTRY_TAG = "entry"
INFRA_TAG = "infra_validation"
"""Set on a version by :func:`infra_validate`: ``passed ...`` or ``skipped (forced): ...``."""
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
    ledger_version: int | None = None
    """The ledger model's version recording this change (None for entries kept as tags before the ledger)."""


@dataclass(frozen=True)
class GateCheck:
    """The gate verdict a version carries, and whether promoting it anyway was forced."""

    version: str
    gate: str
    forced: bool


@dataclass(frozen=True)
class InfraReport:
    """What the clean-process check measured (``skipped`` says why nothing was, for a forced old version)."""

    version: str
    batches: int
    batch_size: int
    output_shape: list[int]
    p95_latency_ms: float
    budget_ms: float
    load_seconds: float = 0.0
    max_abs_difference: float = 0.0
    skipped: str = ""


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


_MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    """The version holding ``alias``, None when none does; a server that is away is waited for, not read as none."""
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import with_retries

    def read() -> str | None:
        try:
            return str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as error:
            if error.error_code in _MISSING:
                return None
            raise

    return with_retries(read, f"read the alias {alias!r} of {name}")


def ledger_name(model_name: str) -> str:
    """The registered model whose versions are the champion changes of ``model_name``, in order."""
    return f"{model_name}{LEDGER_SUFFIX}"


def _ledger(client: Any, model_name: str) -> list[tuple[int, dict[str, Any]]]:
    """(ledger version, entry) of every champion change recorded in the ledger, oldest first."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{ledger_name(model_name)}'")
    except MlflowException as error:
        if error.error_code in _MISSING:
            return []
        raise
    entries = [(int(item.version), json.loads(item.tags[ENTRY_TAG])) for item in versions if ENTRY_TAG in item.tags]
    return sorted(entries, key=lambda pair: pair[0])


def champion_history(project: Project) -> list[HistoryEntry]:
    """Every change of champion, oldest first.

    Changes are versions of the ledger model (:func:`ledger_name`), numbered by the registry itself, so
    promotions from several hosts at once are ordered without a shared lock; each entry's ``previous`` is
    the version of the entry before it. Entries kept as tags of the registered model by earlier releases
    come first.
    """
    from mlflow.exceptions import MlflowException

    client = _client(project)
    name = project.config.registry.model_name
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as error:
        if error.error_code in _MISSING:
            return []
        raise
    history = sorted(
        (HistoryEntry(**json.loads(value)) for key, value in tags.items() if key.startswith(HISTORY_TAG_PREFIX)),
        key=lambda entry: entry.sequence,
    )
    for number, recorded in _ledger(client, name):
        previous = history[-1].version if history else None
        history.append(HistoryEntry(sequence=len(history) + 1, previous=previous, ledger_version=number, **recorded))
    return history


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
    client = _client(project)
    tags = client.get_model_version(project.config.registry.model_name, version).tags
    gate = tags.get("gate", "missing")
    if gate != "passed" and not force:
        raise PromotionError(
            f"{project.config.registry.model_name} version {version}: gate {gate}; "
            "refusing to promote it (pass force=true to override, which is recorded)"
        )
    return GateCheck(version=version, gate=gate, forced=gate != "passed")


def _consumer_environment(project: Project) -> dict[str, str]:
    """What a consumer of the registry has: a shell's basics, the tracking URI and its credentials, no project."""
    from pipelines.tracking import tracking_uri

    kept = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
    credentials = ("MLFLOW_TRACKING_", "MLFLOW_S3_", "AWS_")
    environment = {
        name: value
        for name, value in os.environ.items()
        if name in kept or (name.startswith(credentials) and name != "MLFLOW_TRACKING_URI")
    }
    environment["MLFLOW_TRACKING_URI"] = tracking_uri(project)
    environment["TF_CPP_MIN_LOG_LEVEL"] = "2"  # TensorFlow's start-up chatter only
    return environment


def infra_validate(project: Project, version: str, *, force: bool = False) -> InfraReport:
    """Load ``version`` as any MLflow user would, in a clean process, and check it against its evaluation.

    The version must keep the registry's contract (see :mod:`pipelines.training.model_format`); one that only
    loads inside this project is refused with the reason, unless ``force`` (then it is not loaded at all and
    the report says so). The check itself is :mod:`pipelines.release.consumer_check`, run with ``python -I``
    and a scrubbed environment. A version that passes is tagged ``infra_validation``, which
    :func:`set_champion` requires.
    """
    import tempfile
    from pathlib import Path

    from mlflow.exceptions import MlflowException

    from pipelines.release import consumer_check
    from pipelines.release.evaluate import INFRA_BATCH_ARTIFACT
    from pipelines.training.model_format import contract_problem

    settings = project.config.promote
    name = project.config.registry.model_name
    uri = f"models:/{name}/{version}"
    client = _client(project)
    problem = contract_problem(uri)
    if problem is not None:
        if not force:
            raise PromotionError(f"{problem}; refusing to promote it (force=true promotes it anyway, recorded)")
        client.set_model_version_tag(name, version, INFRA_TAG, f"skipped (forced): {problem}")
        return InfraReport(version, 0, settings.batch_size, [], 0.0, settings.p95_latency_budget_ms, skipped=problem)
    run_id = client.get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory() as folder:
        try:
            batch = client.download_artifacts(run_id, INFRA_BATCH_ARTIFACT, folder)
        except MlflowException:
            raise PromotionError(
                f"{uri}: run {run_id} has no {INFRA_BATCH_ARTIFACT} to check predictions against (evaluate it first)"
            ) from None
        command = [
            sys.executable, "-I", str(Path(consumer_check.__file__)),
            "--model-uri", uri, "--batch", str(batch), "--batch-size", str(settings.batch_size),
            "--latency-batches", str(settings.latency_batches), "--budget-ms", str(settings.p95_latency_budget_ms),
        ]  # fmt: skip
        try:
            completed = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=settings.timeout_seconds,
                env=_consumer_environment(project),
                cwd=folder,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise PromotionError(f"{uri}: infra validation timed out after {settings.timeout_seconds} s") from None
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
        detail = (errors or completed.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
        raise PromotionError(f"{uri}: infra validation failed: {detail}")
    measured = json.loads(lines[-1])
    report = InfraReport(
        version=version,
        batches=int(measured["batches"]),
        batch_size=int(measured["batch_size"]),
        output_shape=list(measured["output_shape"]),
        p95_latency_ms=float(measured["p95_latency_ms"]),
        budget_ms=float(measured["budget_ms"]),
        load_seconds=float(measured["load_seconds"]),
        max_abs_difference=float(measured["max_abs_difference"]),
    )
    client.set_model_version_tag(
        name,
        version,
        INFRA_TAG,
        f"passed {datetime.now(UTC).isoformat(timespec='seconds')}: clean-process load {report.load_seconds:.1f} s, "
        f"max |difference| {report.max_abs_difference:.2g}, p95 {report.p95_latency_ms:.1f} ms",
    )
    return report


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
    client = _client(project)
    name = project.config.registry.model_name
    infra = str(client.get_model_version(name, version).tags.get(INFRA_TAG, ""))
    if not infra.startswith("passed") and not forced:
        raise PromotionError(
            f"{name} version {version} has not passed infra validation ({infra or 'never validated'}); "
            "validate it first (the promote DAG does), or force it (recorded)"
        )
    actor = actor or os.environ.get("MLOPS_USER") or getpass.getuser()
    with registry_lock(project):  # this host; the ledger orders promotions across hosts
        current = _alias_version(client, name, CHAMPION_ALIAS)
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
        recorded_as = _record_change(client, name, version, entry)
        champion = _converge_champion(client, name)
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
        if champion == version:
            _install_reference_profile(project, client, version)
        else:
            print(f"note: a promotion recorded after this one (elsewhere) made version {champion} champion")
    return PromotionResult(version=version, previous=previous, changed=True, forced=forced)


def _record_change(client: Any, name: str, version: str, entry: dict[str, Any]) -> int:
    """Append ``entry`` to the ledger and return its ledger version (a retry finding it last appends nothing).

    The registry numbers the ledger's versions itself, atomically: that is the order of the history.
    """
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import with_retries

    ledger = ledger_name(name)
    recorded = _ledger(client, name)
    if recorded and recorded[-1][1]["version"] == version and recorded[-1][1]["reason"] == entry["reason"]:
        return recorded[-1][0]
    try:
        client.create_registered_model(
            ledger, description=f"Every change of champion of {name}, in order: one version per promotion or rollback"
        )
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    promoted = client.get_model_version(name, version)

    def create() -> Any:
        return client.create_model_version(
            ledger,
            promoted.source,
            run_id=promoted.run_id,
            tags={ENTRY_TAG: json.dumps(entry), "model_version": version},
            description=f"{entry['action']} version {version}: {entry['reason']}",
        )

    return int(with_retries(create, f"record the promotion of version {version}").version)


def _converge_champion(client: Any, name: str, rounds: int = 10) -> str | None:
    """Point ``champion`` at the newest ledger entry's version until the ledger stops changing; return it.

    Every promoter does this after recording its entry, so whatever the interleaving across hosts the alias
    ends on the version of the last recorded change.
    """
    from pipelines.tracking import with_retries

    target: str | None = None
    for _ in range(rounds):
        recorded = _ledger(client, name)
        newest = str(recorded[-1][1]["version"]) if recorded else None
        if newest is None or newest == target:
            return target
        target = newest

        def point(version: str = newest) -> None:
            client.set_registered_model_alias(name, CHAMPION_ALIAS, version)

        with_retries(point, f"point the champion alias at version {newest}")
    return target


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
    report = infra_validate(project, version, force=force)
    return set_champion(project, version, reason, forced=gate.forced or bool(report.skipped), actor=actor)


def rollback(project: Project, reason: str, *, actor: str | None = None) -> PromotionResult:
    """Make the previous champion champion again, audited like any promotion."""
    return promote(project, "previous", reason, force=True, actor=actor)
