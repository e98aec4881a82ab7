"""``mlops compare`` on two real versions, and the model card every registered version gets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.project import Project
from tests.support import versioned_project

MODEL = "tiny-classifier"
SECTIONS = (
    "## Intended use",
    "## Data",
    "## Training",
    "## Metrics (test split)",
    "## Gate",
    "## Comparison with the champion it was gated on",
    "## Lineage",
    "## Promotion",
    "## Known limits",
)


@dataclass(frozen=True)
class TwoVersions:
    project: Project
    runs: tuple[str, str]


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoVersions]:
    """Version 1 (champion) and version 2 (a higher learning rate, gated against version 1)."""
    from pipelines.release.evaluate import evaluate_candidate, gate_candidate
    from pipelines.release.promote import set_champion
    from pipelines.release.register import register_candidate
    from pipelines.training.train import train

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("TF_CONFIG", raising=False)
        patch.setenv("MLOPS_USER", "reviewer")
        project = versioned_project(tmp_path_factory.mktemp("compare") / "project")
        runs = []
        for job, overrides in (("first", {}), ("second", {"learning_rate": 0.02})):
            candidate = {"name": job, "overrides": overrides} if overrides else None
            run_id = train(project, job_id=job, candidate=candidate).run_id
            evaluate_candidate(project, run_id)
            assert gate_candidate(project, run_id).passed, f"the {job} tiny model passes the open gate"
            version = register_candidate(project, run_id).version
            runs.append(run_id)
            if version == "1":
                set_champion(project, "1", "the first model", forced=True)
        yield TwoVersions(project, (runs[0], runs[1]))


def card(project: Project, run_id: str, name: str = "model_card.md") -> str:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import connect

    connect(project)
    return Path(MlflowClient().download_artifacts(run_id, f"model_card/{name}")).read_text(encoding="utf-8")


def test_compare_names_the_differing_params_and_the_paired_verdict(
    two_versions: TwoVersions, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    params = str(two_versions.project.params_path)
    page = tmp_path / "compare.html"
    assert main(["--params", params, "compare", "1", "2", "--html", str(page)]) == 0, "compare exits 0"
    text = capsys.readouterr().out
    assert "train.learning_rate" in text, f"the differing learning rate is named: {text}"
    assert "0.01" in text, "with version 1's value"
    assert "0.02" in text, "and version 2's"
    assert "verdict:" in text, f"the paired test's verdict is printed: {text}"
    assert "data: same data version" in text, "both were trained on the same data"
    assert "recall A" in text, "per-class recall is compared"
    assert "<table>" in page.read_text(encoding="utf-8"), "an HTML page a reviewer can open"

    assert main(["--params", params, "compare", "champion", "challenger", "--json"]) == 0, "aliases work too"
    report = json.loads(capsys.readouterr().out)
    assert report["a"]["version"] == "1", "champion is version 1"
    assert report["b"]["version"] == "2", "challenger is version 2"
    names = [row["name"] for row in report["differing_params"]]
    assert names == ["train.learning_rate"], f"only the learning rate differs: {names}"
    paired = report["paired"]
    assert paired["examples"] > 0, "both scored on the same test split"
    assert 0.0 <= paired["p_value"] <= 1.0, f"McNemar's p-value: {paired}"


def test_compare_refuses_an_unknown_model(two_versions: TwoVersions, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--params", str(two_versions.project.params_path), "compare", "1", "99"])
    assert status == 1, "an unknown version exits 1"
    assert "'99': no such version, alias or run" in capsys.readouterr().err, "and says which"


def test_every_registered_version_has_a_model_card_with_its_real_figures(two_versions: TwoVersions) -> None:
    from mlflow.tracking import MlflowClient

    project = two_versions.project
    client = MlflowClient()
    run = client.get_run(two_versions.runs[1])
    text = card(project, two_versions.runs[1])
    for section in SECTIONS:
        assert section in text, f"the card has the section {section!r}"
    assert f"{run.data.metrics['test_accuracy']:.4f}" in text, "the version's own test accuracy"
    assert run.data.tags["data_version"] in text, "its data version"
    assert run.data.tags["git_commit"] in text, "its git commit"
    assert "| train.learning_rate | 0.02 |" in text, "its training parameters"
    assert "champion (version 1)" in text, "the champion it was gated on"
    assert "verdict: passed" in text, "its gate verdict"
    assert "<h2>Gate</h2>" in card(project, two_versions.runs[1], "model_card.html"), "and an HTML rendering"
    description = client.get_model_version(MODEL, "2").description
    assert "model_card/model_card.md" in description, f"the version's description links the card: {description}"


def test_the_card_is_regenerated_when_a_version_is_promoted(two_versions: TwoVersions) -> None:
    from pipelines.release.promote import set_champion

    project = two_versions.project
    assert "never promoted" in card(project, two_versions.runs[1]), "before: version 2 was never promoted"
    set_champion(project, "2", "better learning rate", forced=True)
    promoted = card(project, two_versions.runs[1])
    assert "by reviewer: better learning rate" in promoted, f"who and why: {promoted}"
    assert "retired at" in card(project, two_versions.runs[0]), "the replaced version's card says it was retired"
