"""Status: champion and challenger, their metrics and data versions, recent runs, champion history, services."""

from __future__ import annotations

from typing import Any

from pipelines.project import CHALLENGER_ALIAS, CHAMPION_ALIAS, Project

RECENT_RUNS = 5
RECENT_VERSIONS = 20


def _version_summary(client: Any, name: str, alias: str) -> dict[str, Any] | None:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    run = client.get_run(version.run_id)
    metrics = run.data.metrics
    return {
        "version": str(version.version),
        "run_id": version.run_id,
        "run_name": run.info.run_name,
        "data_version": version.tags.get("data_version", ""),
        "git_commit": version.tags.get("git_commit", ""),
        "airflow_run": version.tags.get("airflow.run_id", ""),
        "test_accuracy": metrics.get("test_accuracy"),
        "test_macro_f1": metrics.get("test_macro_f1"),
        "promoted_at": version.tags.get("promoted_at", ""),
        "promoted_by": version.tags.get("promoted_by", ""),
        "promotion_reason": version.tags.get("promotion_reason", ""),
    }


def collect_status(project: Project) -> dict[str, Any]:
    """Champion, challenger, the last retraining runs and the champion history, as plain data."""
    from dataclasses import asdict

    from mlflow.tracking import MlflowClient

    from pipelines.release.champion_ledger import champion_history
    from pipelines.tracking import connect

    experiment_id = connect(project)
    client = MlflowClient()
    name = project.config.registry.model_name
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=RECENT_RUNS)
    return {
        "model": name,
        CHAMPION_ALIAS: _version_summary(client, name, CHAMPION_ALIAS),
        CHALLENGER_ALIAS: _version_summary(client, name, CHALLENGER_ALIAS),
        "recent_runs": [
            {
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "status": run.info.status,
                "gate": run.data.tags.get("gate", "not gated"),
                "data_version": run.data.tags.get("data_version", ""),
                "test_accuracy": run.data.metrics.get("test_accuracy"),
                "airflow_run": run.data.tags.get("airflow.run_id", ""),
            }
            for run in runs
        ],
        "history": [asdict(entry) for entry in champion_history(project)],
        "outside_contract": _versions_outside_contract(client, name),
        "services": _services(project),
    }


def _services(project: Project) -> list[dict[str, Any]]:
    """What each configured prediction service serves (``GET /model``, bounded timeout), or ``unreachable``."""
    from pipelines.release.serving.client import served_versions

    return served_versions(project)


def _versions_outside_contract(client: Any, name: str) -> list[dict[str, str]]:
    """The most recent versions that only load inside this project (promoting one needs ``force``)."""
    from mlflow.exceptions import MlflowException

    from pipelines.training.model_format import contract_problem

    try:
        versions = client.search_model_versions(f"name = '{name}'", max_results=RECENT_VERSIONS)
    except MlflowException:
        return []
    outside = []
    for version in sorted(versions, key=lambda item: int(item.version), reverse=True)[:RECENT_VERSIONS]:
        try:
            problem = contract_problem(f"models:/{name}/{version.version}")
        except Exception as error:  # an artifact store that lost the model is a problem too
            problem = f"cannot read its MLmodel: {error}"
        if problem is not None:
            outside.append({"version": str(version.version), "problem": problem})
    return outside


def _metric(value: float | None) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def format_status(status: dict[str, Any]) -> str:
    """A readable multi-line rendering of :func:`collect_status`."""
    lines = [f"model {status['model']}"]
    for alias in (CHAMPION_ALIAS, CHALLENGER_ALIAS):
        item = status[alias]
        if item is None:
            lines.append(f"  {alias:<10} none")
            continue
        lines.append(
            f"  {alias:<10} version {item['version']}  accuracy {_metric(item['test_accuracy'])}  "
            f"macro-F1 {_metric(item['test_macro_f1'])}  data {item['data_version'][:12]}  run {item['run_id'][:12]}"
        )
    lines.append("recent runs")
    if not status["recent_runs"]:
        lines.append("  none")
    for run in status["recent_runs"]:
        lines.append(
            f"  {run['run_name']:<36} gate {run['gate']:<9} accuracy {_metric(run['test_accuracy'])}  "
            f"data {run['data_version'][:12]}"
        )
    if status.get("outside_contract"):
        lines.append("versions that load only inside this project (promote them with force)")
        lines += [f"  version {item['version']}: {item['problem']}" for item in status["outside_contract"]]
    lines.append("prediction services")
    if not status.get("services"):
        lines.append("  none configured (serve.endpoints)")
    for service in status.get("services", []):
        if service["state"] == "serving":
            lines.append(f"  {service['endpoint']}  version {service['version']}  (loaded {service['loaded_at']})")
        else:
            lines.append(f"  {service['endpoint']}  {service['state']}  {service.get('detail', '')}".rstrip())
    lines.append("champion history")
    if not status["history"]:
        lines.append("  none")
    for entry in status["history"]:
        forced = " (forced)" if entry["forced"] else ""
        lines.append(
            f"  #{entry['sequence']} {entry['at']} {entry['action']} version {entry['version']} "
            f"(replaced {entry['previous'] or 'none'}) by {entry['by']}{forced}: {entry['reason']}"
        )
    return "\n".join(lines)
