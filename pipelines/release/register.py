"""Register: a candidate that passed its gate becomes a new model version with the alias ``challenger``.

The version is tagged with everything needed to trace it: data version, run id, gate verdict, git
commit and Airflow run. A candidate that failed stays a run tagged ``gate=failed`` and the registry is
left unchanged. Registering the same run twice (a retried task, or two hosts at once) leaves one version:
the one registered first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipelines.errors import PipelineError
from pipelines.files import exclusive_lock
from pipelines.project import CHALLENGER_ALIAS, Project

TRACED_RUN_TAGS = ("data_version", "git_commit", "dataset", "classes", "airflow.dag_id", "airflow.run_id")


class RegistrationError(PipelineError):
    """The run cannot be registered (never gated, unknown run)."""


@dataclass(frozen=True)
class RegistrationResult:
    """Whether the run was registered, as which version, and why not when it was not."""

    run_id: str
    registered: bool
    version: str | None
    reason: str


@contextmanager
def registry_lock(project: Project) -> Iterator[None]:
    """Serialise check-then-create on this host, so one run never becomes two versions."""
    with exclusive_lock(project.registry_lock_path, timeout=600.0, what="a registry change"):
        yield


def versions_of_run(client: Any, model_name: str, run_id: str) -> list[Any]:
    """Model versions of ``model_name`` created from ``run_id``, oldest first."""
    found = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return sorted(found, key=lambda version: int(version.version))


def register_candidate(project: Project, run_id: str) -> RegistrationResult:
    """Register ``run_id``'s model if its gate passed, and point ``challenger`` at it."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipelines.release.evaluate import get_run
    from pipelines.tracking import connect, with_retries

    connect(project)
    client = MlflowClient()
    run = get_run(run_id)
    gate = run.data.tags.get("gate")
    if gate is None:
        raise RegistrationError(f"run {run_id}: no gate verdict (run `mlops gate --run-id {run_id}` first)")
    if gate != "passed":
        return RegistrationResult(run_id, False, None, "gate failed: the registry is unchanged")
    name = project.config.registry.model_name
    with registry_lock(project):
        try:
            client.get_registered_model(name)
        except MlflowException:
            with_retries(
                lambda: client.create_registered_model(
                    name, description=f"{project.config.dataset.name} image classifier trained by the retrain DAG"
                ),
                "create the registered model",
            )
        existing = versions_of_run(client, name, run_id)
        if existing:
            version = existing[0]
            reason = "already registered"
        else:
            tags = {key: run.data.tags[key] for key in TRACED_RUN_TAGS if key in run.data.tags}
            tags.update({"run_id": run_id, "gate": "passed", "gate.baseline": run.data.tags.get("gate.baseline", "")})
            created = with_retries(
                lambda: mlflow.register_model(f"runs:/{run_id}/model", name, tags=tags), "register the model"
            )
            version = _keep_first_registration(client, name, run_id, created)
            reason = "registered" if version.version == created.version else "already registered (on another host)"
        with_retries(
            lambda: client.set_registered_model_alias(name, CHALLENGER_ALIAS, str(version.version)),
            "point the challenger alias at the new version",
        )
    if reason == "registered":
        from pipelines.release.model_card import publish_model_card

        publish_model_card(project, str(version.version))
    return RegistrationResult(run_id, True, str(version.version), reason)


def _keep_first_registration(client: Any, name: str, run_id: str, created: Any) -> Any:
    """One version per run, also when two hosts registered the same run at once: the oldest one stays.

    The lock above serialises registrations on one host only. Every registrant re-reads the versions of the
    run after creating its own and deletes its own unless it is the oldest, so all of them converge on the
    same single version whatever the interleaving.
    """
    versions = versions_of_run(client, name, run_id)
    first = versions[0] if versions else created
    if str(first.version) != str(created.version):
        client.delete_model_version(name, str(created.version))
    return first
