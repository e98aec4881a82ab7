"""### Promote.

Make a registered model version the **champion** (production), safely and with an audit trail.
Triggered from the UI (a form), the CLI or the REST API; never scheduled.

Params: `version` (a number, `challenger`, or `previous` to roll back), `reason` (required),
`force` (promote even if its gate failed; recorded).

Steps: **resolve** the version -> **check_gate** (refuse a failed gate unless forced) ->
**infra_validate** (load as any MLflow user would, in a clean process; check the signature, the predictions
against the evaluation's and the p95 latency; tag the version) -> **set_champion** (only an infra-validated
version, unless forced; move the alias; record who, when, why and the replaced version on the version and in
the champion history). Promoting the current champion again changes nothing. -> **deploy** (every running
prediction service in `serve.endpoints` loads, checks and swaps to the champion; fails naming the service and
the reason when one refuses it, which keeps serving the old version; skipped when no service answers and
`serve.require_running` is false). The admin token comes from the Airflow connection `mlops_serving`
(its password) if defined, else `MLOPS_SERVE_TOKEN`; without one the services' own alias polling is awaited.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Param, dag, get_current_context, task

from pipelines.platform.orchestration import DEFAULT_ARGS, load_project, run_step


@dag(
    dag_id="promote",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["mlops", "promotion"],
    params={
        "version": Param(
            "challenger",
            type="string",
            pattern=r"^([0-9]+|challenger|previous)$",
            description="model version number, challenger, or previous (rollback)",
        ),
        "reason": Param("", type="string", minLength=1, description="why this version should serve production"),
        "force": Param(False, type="boolean", description="promote even if its gate failed (recorded)"),
    },
)
def promote() -> None:
    """Wire the promotion steps; each task body imports and calls one pipeline function."""

    @task
    def resolve() -> str:
        from pipelines.release.promote import resolve_version

        return run_step(resolve_version, load_project(), get_current_context()["params"]["version"])

    @task
    def check_gate(version: str) -> dict[str, Any]:
        from pipelines.release.compare import comparison_with_champion
        from pipelines.release.promote import check_gate as check

        force = bool(get_current_context()["params"]["force"])
        project = load_project()
        result = run_step(check, project, version, force)
        print(run_step(comparison_with_champion, project, version) or "no other champion to compare with")
        return {"version": result.version, "gate": result.gate, "forced": result.forced}

    @task(execution_timeout=timedelta(minutes=15))
    def infra_validate(gate: dict[str, Any]) -> dict[str, Any]:
        from pipelines.release.infra_check import infra_validate as validate

        force = bool(get_current_context()["params"]["force"])
        report = run_step(validate, load_project(), gate["version"], force=force)
        if report.skipped or report.note:
            print(f"version {report.version}: infra validation skipped: {report.skipped or report.note}")
        else:
            print(
                f"version {report.version}: loads in a clean process in {report.load_seconds:.1f} s, reproduces its "
                f"evaluation (max |difference| {report.max_abs_difference:.2g}), p95 batch latency "
                f"{report.p95_latency_ms:.1f} ms (budget {report.budget_ms:g})"
            )
        return {**gate, "forced": gate["forced"] or bool(report.skipped)}

    @task
    def set_champion(gate: dict[str, Any]) -> dict[str, Any]:
        from pipelines.platform.orchestration import triggering_user
        from pipelines.release.promote import set_champion as move_alias

        context = get_current_context()
        result = run_step(
            move_alias,
            load_project(),
            gate["version"],
            context["params"]["reason"],
            forced=gate["forced"],
            actor=triggering_user(context),
        )
        print(f"champion: version {result.version} (replaced {result.previous or 'none'}, changed {result.changed})")
        return {"version": result.version, "previous": result.previous, "changed": result.changed}

    @task(execution_timeout=timedelta(minutes=15))
    def deploy(champion: dict[str, Any]) -> dict[str, Any]:
        import os

        from airflow.sdk import Connection
        from airflow.sdk.exceptions import AirflowNotFoundException, AirflowSkipException

        from pipelines.release.serving.client import TOKEN_ENV, deploy_champion

        try:
            token = Connection.get("mlops_serving").password or None
        except AirflowNotFoundException:
            token = os.environ.get(TOKEN_ENV, "").strip() or None
        report = run_step(deploy_champion, load_project(), champion["version"], token=token)
        print(report.summary())
        if report.skipped:
            raise AirflowSkipException(report.skipped)
        return {"version": report.version, "replicas": len(report.outcomes)}

    # Task outputs are XComArgs here and values when the tasks run (mypy: arg-type is off for dags/).
    version = resolve()
    gate_check = check_gate(version)
    validated = infra_validate(gate_check)
    deploy(set_champion(validated))


promote()
