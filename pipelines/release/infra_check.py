"""Infra validation: load a registered version as any MLflow user would, in a clean process, before it is promoted.

:func:`infra_validate` checks the version keeps the registry's contract, then hands it to
:mod:`pipelines.release.consumer_check` run with ``python -I`` and a scrubbed environment (in a process
started for it, or ahead of time by :func:`start_clean_checker`), and tags a version that passes
``infra_validation``, which :func:`pipelines.release.promote.set_champion` requires.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime

from pipelines.errors import PromotionError
from pipelines.project import CHAMPION_ALIAS, Project
from pipelines.release.champion_ledger import alias_version, registry_client

INFRA_TAG = "infra_validation"
"""Set on a version by :func:`infra_validate`: ``passed ...`` or ``skipped (forced): ...``."""


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
    note: str = ""


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


_STARTED: dict[str, subprocess.Popen[str]] = {}
"""A clean checker started ahead of time, by tracking URI (at most one; used once)."""


def start_clean_checker(project: Project, *, keep: bool = True) -> subprocess.Popen[str]:
    """Start ``python -I consumer_check.py --wait``: a clean process that imports MLflow and TensorFlow, then waits.

    With ``keep``, the next :func:`infra_validate` of this process uses it instead of starting one, so the
    imports overlap whatever runs meanwhile (``make run``'s step host starts it before the retrain). It loads no
    model until asked, and each checker checks one version, so every check still loads its model in a fresh
    process.
    """
    import atexit
    import tempfile
    from pathlib import Path

    from pipelines.release import consumer_check
    from pipelines.tracking import tracking_uri

    environment = _consumer_environment(project)
    checker = subprocess.Popen(
        [sys.executable, "-I", str(Path(consumer_check.__file__)), "--wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        cwd=tempfile.gettempdir(),
    )
    if keep:
        _STARTED[tracking_uri(project)] = checker
        atexit.register(_stop_unused, checker)
    return checker


def _stop_unused(checker: subprocess.Popen[str]) -> None:
    if checker.poll() is None:
        checker.kill()
        checker.wait()


def _take_started_checker(project: Project) -> subprocess.Popen[str] | None:
    from pipelines.tracking import tracking_uri

    checker = _STARTED.pop(tracking_uri(project), None)
    return checker if checker is not None and checker.poll() is None else None


def infra_validate(project: Project, version: str, *, force: bool = False) -> InfraReport:
    """Load ``version`` as any MLflow user would, in a clean process, and check it against its evaluation.

    The version must keep the registry's contract (see :mod:`pipelines.training.model_format`); one that only
    loads inside this project is refused with the reason, unless ``force`` (then it is not loaded at all and
    the report says so). The check itself is :mod:`pipelines.release.consumer_check`, run with ``python -I``
    and a scrubbed environment, in a process started for it (or ahead of time: :func:`start_clean_checker`).
    A version that passes is tagged ``infra_validation``, which
    :func:`~pipelines.release.promote.set_champion` requires.
    """
    import tempfile

    from mlflow.exceptions import MlflowException

    from pipelines.release.evaluate import INFRA_BATCH_ARTIFACT
    from pipelines.training.model_format import contract_problem

    settings = project.config.promote
    name = project.config.registry.model_name
    uri = f"models:/{name}/{version}"
    client = registry_client(project)
    validated = str(client.get_model_version(name, version).tags.get(INFRA_TAG, ""))
    if validated.startswith("passed") and alias_version(client, name, CHAMPION_ALIAS) == version:
        note = f"already champion, not validated again ({validated})"
        return InfraReport(version, 0, settings.batch_size, [], 0.0, settings.p95_latency_budget_ms, note=note)
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
        arguments = [
            "--model-uri", uri, "--batch", str(batch), "--batch-size", str(settings.batch_size),
            "--latency-batches", str(settings.latency_batches), "--budget-ms", str(settings.p95_latency_budget_ms),
        ]  # fmt: skip
        checker = _take_started_checker(project) or start_clean_checker(project, keep=False)
        try:
            stdout, stderr = checker.communicate(json.dumps(arguments) + "\n", timeout=settings.timeout_seconds)
        except subprocess.TimeoutExpired:
            checker.kill()
            checker.communicate()
            raise PromotionError(f"{uri}: infra validation timed out after {settings.timeout_seconds} s") from None
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if checker.returncode != 0 or not lines:
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        detail = (errors or stderr.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
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
