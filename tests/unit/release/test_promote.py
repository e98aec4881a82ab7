"""Promotion on a tiny registry: resolve, gate check, infra validation, champion alias, audit, history, rollback.

One module-scoped registry is built from ONE training run (training is the slow part): version 1 is
registered through the pipeline (evaluate, gate, register: alias ``challenger``), versions 2 and 3 are the
same run's model registered again by hand, version 2 tagged ``gate=passed`` and version 3 ``gate=failed``
(a hand-registered failed candidate).

Every test starts with no champion and no history (the autouse ``no_champion`` fixture deletes the alias,
the history tags and the audit tags), so tests do not depend on their order. Promotion tests replace the
fresh-process infra validation by a recording stub (``infra_calls``): it costs a TensorFlow import per
call. The real check runs in the ``infra_validate`` tests.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.errors import PromotionError
from pipelines.project import Project
from tests.support import versioned_project

MODEL = "tiny-classifier"
PROMOTE_OVERRIDES: dict[str, dict[str, Any]] = {
    # 3 classes x 8 test images = 24 images: batches of 8 are all full. A generous budget: a batch takes
    # about 40 ms here, several times that on a loaded machine, and speed is not what these tests check.
    "promote": {"batch_size": 8, "latency_batches": 5, "p95_latency_budget_ms": 10_000.0, "timeout_seconds": 240},
}
AUDIT_TAGS = (
    "promoted_by",
    "promoted_at",
    "promotion_reason",
    "promotion_forced",
    "replaced_version",
    "retired_at",
)


@dataclass(frozen=True)
class Registry:
    """The shared project and the run every registered version comes from."""

    project: Project
    run_id: str


def client_for(project: Project) -> Any:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import connect

    connect(project)
    return MlflowClient()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One trained run registered as versions 1 (pipeline, challenger), 2 (gate passed) and 3 (gate failed)."""
    import mlflow

    from pipelines.release.evaluate import evaluate_candidate, gate_candidate
    from pipelines.release.register import register_candidate
    from pipelines.training.train import train

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("TF_CONFIG", raising=False)
        patch.setenv("MLOPS_USER", "test-user")
        project = versioned_project(tmp_path_factory.mktemp("promote") / "project", PROMOTE_OVERRIDES)
        result = train(project, job_id="promote")
        evaluate_candidate(project, result.run_id)
        assert gate_candidate(project, result.run_id).passed, "the tiny first model passes its value thresholds"
        first = register_candidate(project, result.run_id)
        assert first.version == "1", f"the pipeline registers version 1: {first}"
        client_for(project)
        for expected, gate in (("2", "passed"), ("3", "failed")):
            version = mlflow.register_model(
                f"runs:/{result.run_id}/model", MODEL, tags={"run_id": result.run_id, "gate": gate}
            )
            assert str(version.version) == expected, f"hand registration gives version {expected}: {version}"
        yield Registry(project, result.run_id)


def reset_champion(project: Project) -> None:
    """Delete the champion alias, the champion history and the audit tags of every version."""
    from mlflow.exceptions import MlflowException

    from pipelines.project import CHAMPION_ALIAS
    from pipelines.release.champion_ledger import HISTORY_TAG_PREFIX, ledger_name

    client = client_for(project)
    with contextlib.suppress(MlflowException):  # no promotion recorded yet
        client.delete_registered_model(ledger_name(MODEL))
    model = client.get_registered_model(MODEL)
    if CHAMPION_ALIAS in model.aliases:
        client.delete_registered_model_alias(MODEL, CHAMPION_ALIAS)
    for key in model.tags:
        if key.startswith(HISTORY_TAG_PREFIX):
            client.delete_registered_model_tag(MODEL, key)
    for version in client.search_model_versions(f"name = '{MODEL}'"):
        for key in AUDIT_TAGS:
            if key in version.tags:
                client.delete_model_version_tag(MODEL, version.version, key)


@pytest.fixture(autouse=True)
def no_champion(registry: Registry) -> Project:
    """Every test starts with no champion and an empty history; challenger stays on version 1.

    Versions 1 and 2 carry the tag a passed infra validation leaves (what ``set_champion`` requires);
    version 3 never passed it.
    """
    from pipelines.release.infra_check import INFRA_TAG

    reset_champion(registry.project)
    client = client_for(registry.project)
    for version in ("1", "2"):
        client.set_model_version_tag(MODEL, version, INFRA_TAG, "passed (fixture)")
    if INFRA_TAG in client.get_model_version(MODEL, "3").tags:
        client.delete_model_version_tag(MODEL, "3", INFRA_TAG)
    return registry.project


@pytest.fixture
def infra_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the clean-process infra validation by a stub that records the versions it was asked about.

    Like the real step, a passing check leaves the ``infra_validation`` tag that ``set_champion`` requires.
    """
    import pipelines.release.promote as promote_module
    from pipelines.release.infra_check import INFRA_TAG, InfraReport

    calls: list[str] = []

    def fake(project: Project, version: str, *, force: bool = False) -> InfraReport:
        calls.append(version)
        client_for(project).set_model_version_tag(MODEL, version, INFRA_TAG, "passed (stub)")
        return InfraReport(version, 5, 8, [8, 3], 1.0, 10_000.0)

    monkeypatch.setattr(promote_module, "infra_validate", fake)
    return calls


def champion(project: Project) -> str | None:
    from pipelines.project import CHAMPION_ALIAS
    from pipelines.release.champion_ledger import alias_version

    return alias_version(client_for(project), MODEL, CHAMPION_ALIAS)


def version_tags(project: Project, version: str) -> dict[str, str]:
    return dict(client_for(project).get_model_version(MODEL, version).tags)


# resolve_version


def test_resolve_challenger_and_existing_numbers(no_champion: Project) -> None:
    from pipelines.release.promote import resolve_version

    assert resolve_version(no_champion, "challenger") == "1", "challenger is the version registered by the pipeline"
    assert resolve_version(no_champion, "3") == "3", "an existing version number resolves to itself"
    assert resolve_version(no_champion, " 2 ") == "2", "surrounding blanks are ignored"


def test_resolve_refuses_unknown_and_malformed_specs(no_champion: Project) -> None:
    from pipelines.release.promote import resolve_version

    with pytest.raises(PromotionError, match=r"version 42 does not exist"):
        resolve_version(no_champion, "42")
    with pytest.raises(PromotionError, match=r"expected a number.*'abc'"):
        resolve_version(no_champion, "abc")
    with pytest.raises(PromotionError, match=r"no previous champion"):
        resolve_version(no_champion, "previous")


# check_gate


def test_check_gate_refuses_a_failed_version_unless_forced(no_champion: Project) -> None:
    from pipelines.release.promote import check_gate

    with pytest.raises(PromotionError) as refused:
        check_gate(no_champion, "3")
    message = str(refused.value)
    assert "gate failed" in message, f"the refusal names the verdict: {message}"
    assert "force" in message, f"the refusal says how to override: {message}"
    forced = check_gate(no_champion, "3", force=True)
    assert (forced.gate, forced.forced) == ("failed", True), f"forcing a failed gate is recorded: {forced}"
    passed = check_gate(no_champion, "2", force=True)
    assert not passed.forced, f"force on a passed version is not a forced promotion: {passed}"


# promote


def test_promote_challenger_sets_alias_audit_tags_and_history(no_champion: Project, infra_calls: list[str]) -> None:
    from pipelines.release.champion_ledger import champion_history
    from pipelines.release.promote import promote

    result = promote(no_champion, "challenger", "first release")
    assert (result.version, result.previous, result.changed) == ("1", None, True), f"version 1 promoted: {result}"
    assert infra_calls == ["1"], f"the version is infra-validated before it is promoted: {infra_calls}"
    assert champion(no_champion) == "1", "the champion alias points at version 1"
    tags = version_tags(no_champion, "1")
    assert tags["promoted_by"] == "test-user", f"who promoted is recorded ($MLOPS_USER): {tags}"
    assert datetime.fromisoformat(tags["promoted_at"]).tzinfo is not None, f"when, as UTC ISO time: {tags}"
    assert tags["promotion_reason"] == "first release", f"why is recorded: {tags}"
    assert tags["replaced_version"] == "none", f"no version was replaced: {tags}"
    assert tags["promotion_forced"] == "false", f"a passed gate is not forced: {tags}"
    history = champion_history(no_champion)
    assert len(history) == 1, f"one history entry: {history}"
    entry = history[0]
    assert (entry.sequence, entry.version, entry.previous, entry.action) == (1, "1", None, "promote"), entry
    assert (entry.by, entry.reason, entry.forced) == ("test-user", "first release", False), entry


def test_promoting_the_champion_again_changes_nothing(no_champion: Project, infra_calls: list[str]) -> None:
    from pipelines.release.champion_ledger import champion_history
    from pipelines.release.promote import promote

    promote(no_champion, "challenger", "first release")
    before = version_tags(no_champion, "1")
    again = promote(no_champion, "1", "same again")
    assert not again.changed, f"promoting the champion again reports no change: {again}"
    assert again.version == "1", f"the champion is still version 1: {again}"
    assert len(champion_history(no_champion)) == 1, "no history entry is added"
    assert version_tags(no_champion, "1") == before, "the audit tags are untouched"
    assert infra_calls == ["1"], f"nothing is validated again: {infra_calls}"


def test_failed_gate_is_refused_then_forced_and_recorded(no_champion: Project, infra_calls: list[str]) -> None:
    from pipelines.release.champion_ledger import champion_history
    from pipelines.release.promote import promote

    promote(no_champion, "1", "baseline")
    with pytest.raises(PromotionError, match="gate failed"):
        promote(no_champion, "3", "hotfix")
    assert champion(no_champion) == "1", "a refused promotion leaves the champion unchanged"
    assert len(champion_history(no_champion)) == 1, "a refused promotion adds no history"
    assert infra_calls == ["1"], f"a refused version is not even infra-validated: {infra_calls}"

    forced = promote(no_champion, "3", "hotfix", force=True)
    assert (forced.version, forced.previous, forced.forced) == ("3", "1", True), f"forced promotion: {forced}"
    assert champion(no_champion) == "3", "the forced version is champion"
    last = champion_history(no_champion)[-1]
    assert (last.version, last.previous, last.forced) == ("3", "1", True), f"the history says forced: {last}"
    tags = version_tags(no_champion, "3")
    assert tags["promotion_forced"] == "true", f"the version is tagged as forced: {tags}"
    assert tags["replaced_version"] == "1", f"the replaced version is recorded: {tags}"


def test_a_version_that_never_passed_infra_validation_cannot_become_champion(no_champion: Project) -> None:
    from pipelines.release.champion_ledger import champion_history
    from pipelines.release.promote import set_champion

    with pytest.raises(PromotionError, match=r"version 3 has not passed infra validation \(never validated\)"):
        set_champion(no_champion, "3", "the validation task was marked successful by hand")
    assert champion(no_champion) is None, "the alias did not move"
    assert champion_history(no_champion) == [], "nothing was recorded"
    forced = set_champion(no_champion, "3", "emergency", forced=True)
    assert (forced.changed, forced.forced) == (True, True), f"forcing moves it and says so: {forced}"
    assert champion_history(no_champion)[-1].forced, "the history records the forced promotion"


def test_failed_infra_validation_leaves_the_champion_unchanged(
    no_champion: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.release.promote as promote_module
    from pipelines.release.champion_ledger import champion_history
    from pipelines.release.promote import promote, set_champion

    set_champion(no_champion, "1", "baseline")

    def failing(project: Project, version: str, *, force: bool = False) -> None:
        raise PromotionError(f"models:/{MODEL}/{version}: infra validation failed: p95 too slow")

    monkeypatch.setattr(promote_module, "infra_validate", failing)
    with pytest.raises(PromotionError, match="infra validation failed"):
        promote(no_champion, "2", "candidate")
    assert champion(no_champion) == "1", "the champion is unchanged when infra validation fails"
    assert len(champion_history(no_champion)) == 1, "no history entry for a failed promotion"


def test_empty_reason_is_refused(no_champion: Project, infra_calls: list[str]) -> None:
    from pipelines.release.promote import promote, set_champion

    with pytest.raises(PromotionError, match="reason"):
        promote(no_champion, "challenger", "   ")
    with pytest.raises(PromotionError, match="reason"):
        set_champion(no_champion, "1", "")
    assert champion(no_champion) is None, "nothing was promoted"
    assert infra_calls == [], "nothing was validated"


# rollback and history


def test_rollback_restores_the_previous_champion(no_champion: Project, infra_calls: list[str]) -> None:
    from pipelines.release.champion_ledger import champion_history
    from pipelines.release.promote import promote, rollback

    promote(no_champion, "1", "first")
    promote(no_champion, "2", "second")
    result = rollback(no_champion, "version 2 misbehaves")
    assert (result.version, result.previous, result.changed) == ("1", "2", True), f"rolled back to 1: {result}"
    assert champion(no_champion) == "1", "version 1 is champion again"
    history = champion_history(no_champion)
    assert [entry.version for entry in history] == ["1", "2", "1"], f"three entries in order: {history}"
    assert [entry.sequence for entry in history] == [1, 2, 3], f"consecutive sequence numbers: {history}"
    last = history[-1]
    assert (last.action, last.previous) == ("rollback", "2"), f"the last entry is the rollback from 2: {last}"
    assert not last.forced, f"rolling back to a passed version is not forced: {last}"
    assert last.reason == "version 2 misbehaves", f"the rollback reason is recorded: {last}"
    assert "retired_at" in version_tags(no_champion, "2"), "the replaced version gets a retired_at tag"
    assert version_tags(no_champion, "1")["replaced_version"] == "2", "version 1 records what it replaced"


def test_champion_at_returns_the_entry_serving_then(no_champion: Project) -> None:
    import time

    from pipelines.release.champion_ledger import champion_at, champion_history
    from pipelines.release.promote import set_champion

    set_champion(no_champion, "1", "first")
    time.sleep(1.1)  # history times have one-second resolution
    set_champion(no_champion, "2", "second")
    first, second = champion_history(no_champion)
    first_at, second_at = datetime.fromisoformat(first.at), datetime.fromisoformat(second.at)
    assert first_at < second_at, f"entries are at distinct seconds: {first.at}, {second.at}"
    between = champion_at(no_champion, first_at + timedelta(milliseconds=500))
    assert between == first, f"between the two promotions version 1 served: {between}"
    assert champion_at(no_champion, second_at) == second, "from the second promotion on, version 2 serves"
    assert champion_at(no_champion, first_at - timedelta(seconds=1)) is None, "before the first promotion: none"


def test_concurrent_promotions_keep_one_champion_and_a_consistent_history(no_champion: Project) -> None:
    from pipelines.release.champion_ledger import champion_history
    from pipelines.release.promote import set_champion

    client = client_for(no_champion)
    for round_number in range(3):
        reset_champion(no_champion)
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def promote_at_once(version: str, barrier: threading.Barrier = barrier, errors: list = errors) -> None:
            try:
                barrier.wait(timeout=30)
                set_champion(no_champion, version, f"concurrent {version}")
            except BaseException as error:  # reported by the main thread
                errors.append(error)

        threads = [threading.Thread(target=promote_at_once, args=(version,)) for version in ("1", "2")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, f"round {round_number}: both promotions complete: {errors!r}"
        holders = [v for v in ("1", "2", "3") if "champion" in client.get_model_version(MODEL, v).aliases]
        assert len(holders) == 1, f"round {round_number}: exactly one version holds champion: {holders}"
        history = champion_history(no_champion)
        assert [entry.sequence for entry in history] == [1, 2], f"round {round_number}: unique sequences: {history}"
        assert history[1].previous == history[0].version, f"round {round_number}: the second replaced the first"
        assert history[-1].version == champion(no_champion) == holders[0], (
            f"round {round_number}: the last history entry is the current champion: {history}"
        )


PROMOTE_IN_ANOTHER_HOST = """
import sys, time
from pathlib import Path
from pipelines.project import Project
from pipelines.release.promote import set_champion
project = Project.load(Path(sys.argv[1]))
start_at = float(sys.argv[3])
time.sleep(max(0.0, start_at - time.time()))
result = set_champion(project, sys.argv[2], "from another host " + sys.argv[2])
print(result.version, result.previous)
"""


def test_promotions_from_two_hosts_keep_one_champion_and_a_complete_ordered_history(
    no_champion: Project, tmp_path: Path
) -> None:
    """Two processes with their own project roots (so no shared file lock) against one tracking store."""
    import subprocess
    import sys
    import time

    from pipelines.release.champion_ledger import champion_history
    from pipelines.release.infra_check import INFRA_TAG
    from pipelines.release.promote import set_champion
    from pipelines.tracking import tracking_uri

    client_for(no_champion).set_model_version_tag(MODEL, "3", INFRA_TAG, "passed (fixture)")
    set_champion(no_champion, "1", "baseline")
    roots = []
    for host in ("host-a", "host-b"):
        root = tmp_path / host
        root.mkdir()
        (root / "params.yaml").write_bytes((no_champion.root / "params.yaml").read_bytes())
        roots.append(root)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(no_champion), "MLOPS_USER": "another-host"}
    start_at = time.time() + 8.0  # both start at the same moment, after their imports
    hosts = [
        subprocess.Popen(
            [sys.executable, "-c", PROMOTE_IN_ANOTHER_HOST, str(root / "params.yaml"), version, str(start_at)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for root, version in zip(roots, ("2", "3"), strict=True)
    ]
    outputs = [host.communicate(timeout=180) for host in hosts]
    assert [host.returncode for host in hosts] == [0, 0], f"both promotions complete: {outputs}"
    history = champion_history(no_champion)
    assert history[0].version == "1", f"the baseline comes first: {history}"
    assert sorted(entry.version for entry in history[1:]) == ["2", "3"], f"no entry is lost: {history}"
    assert [entry.sequence for entry in history] == [1, 2, 3], f"one ordered sequence: {history}"
    for before, after in itertools.pairwise(history):
        assert after.previous == before.version, f"each entry replaced the one before it: {history}"
    assert champion(no_champion) == history[-1].version, f"the champion is the last recorded change: {history}"


def test_rollback_to_a_version_deleted_by_hand_fails_clearly(no_champion: Project) -> None:
    import mlflow

    from pipelines.release.infra_check import INFRA_TAG
    from pipelines.release.promote import resolve_version, set_champion

    client = client_for(no_champion)
    run_id = client.get_model_version(MODEL, "1").run_id
    extra = str(mlflow.register_model(f"runs:/{run_id}/model", MODEL, tags={"gate": "passed"}).version)
    client.set_model_version_tag(MODEL, extra, INFRA_TAG, "passed (fixture)")
    set_champion(no_champion, extra, "short-lived")
    set_champion(no_champion, "1", "back to one")
    assert resolve_version(no_champion, "previous") == extra, "before the deletion, previous is the extra version"
    client.delete_model_version(MODEL, extra)
    with pytest.raises(PromotionError, match=rf"previous champion, version {extra}, is no longer in the registry"):
        resolve_version(no_champion, "previous")
    assert champion(no_champion) == "1", "the champion is unchanged"


# infra validation (fresh process, real model)


def test_infra_validate_loads_and_predicts_in_a_fresh_process(no_champion: Project) -> None:
    from pipelines.release.infra_check import InfraReport, infra_validate

    report = infra_validate(no_champion, "1")
    assert isinstance(report, InfraReport), f"a report comes back: {report!r}"
    assert report.version == "1", f"the report names the version: {report}"
    assert report.output_shape == [8, 3], f"one probability per class for each of the 8 images: {report}"
    assert report.batches == 5, f"the configured number of batches was timed: {report}"
    assert report.p95_latency_ms > 0, f"a positive p95 latency is measured: {report}"
    assert report.p95_latency_ms <= report.budget_ms == 10_000.0, f"the latency is within the budget: {report}"


def test_infra_validate_refuses_a_latency_over_budget(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subprocess reads ``<root>/params.yaml``: a second root holds a tiny budget and links the data."""
    from pipelines.release.infra_check import infra_validate
    from pipelines.tracking import tracking_uri

    project = registry.project
    params = yaml.safe_load((project.root / "params.yaml").read_text(encoding="utf-8"))
    params["promote"]["p95_latency_budget_ms"] = 0.001
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    (tmp_path / "data").symlink_to(project.data_dir, target_is_directory=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(project))  # the same registry
    strict = Project.load(tmp_path / "params.yaml")
    assert strict.config.promote.p95_latency_budget_ms == 0.001, "the strict project has the tiny budget"
    with pytest.raises(PromotionError, match="p95") as refused:
        infra_validate(strict, "1")
    assert "p95_latency_budget_ms" in str(refused.value), f"the message names the setting: {refused.value}"


# status


def test_status_shows_champion_challenger_and_history(registry: Registry, infra_calls: list[str]) -> None:
    from pipelines.release.promote import promote
    from pipelines.release.status import collect_status, format_status

    project = registry.project
    promote(project, "2", "status check")
    status = collect_status(project)
    assert status["model"] == MODEL, f"the model is named: {status['model']}"
    assert status["champion"]["version"] == "2", f"the champion is version 2: {status['champion']}"
    assert status["champion"]["promotion_reason"] == "status check", f"with its reason: {status['champion']}"
    assert status["challenger"]["version"] == "1", f"the challenger is version 1: {status['challenger']}"
    assert status["challenger"]["run_id"] == registry.run_id, "the challenger names its run"
    assert [entry["version"] for entry in status["history"]] == ["2"], f"history: {status['history']}"
    assert any(run["run_id"] == registry.run_id for run in status["recent_runs"]), "the training run is listed"
    text = format_status(status)
    assert "champion history" in text, f"the rendering has a history section: {text}"
    assert "#1" in text, f"the history entry is rendered: {text}"
    assert "status check" in text, f"the reason is rendered: {text}"
