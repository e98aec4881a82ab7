"""A model card for every registered version: what a reviewer reads before promoting it.

:func:`publish_model_card` gathers what the registry already holds about a version (its run's parameters,
metrics, data profile, gate verdict, the comparison it was gated on, its lineage and its promotion history),
writes ``model_card/model_card.md`` and ``model_card/model_card.html`` to the version's run, and links them
from the version's description. It runs when a version is registered and again whenever it is promoted or
rolled back to, so the card says who promoted it, when and why.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipelines.project import Project
from pipelines.release.html_page import Section, html_page

CARD_FOLDER = "model_card"
MARKDOWN_NAME = "model_card.md"
HTML_NAME = "model_card.html"
WEAK_RECALL = 0.95
"""Classes whose test recall is below this are named under known limits."""


def _load(client: Any, run_id: str, path: str) -> Any | None:
    """A JSON artifact of ``run_id``, or None when the run has none."""
    try:
        with tempfile.TemporaryDirectory() as folder:
            return json.loads(Path(client.download_artifacts(run_id, path, folder)).read_text(encoding="utf-8"))
    except Exception:
        return None


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _gate_rows(verdict: dict[str, Any]) -> list[list[str]]:
    rows = [["check", "value", "threshold", "baseline", "result"]]
    for check in verdict.get("checks", []):
        baseline = "-" if check.get("baseline") is None else _fmt(check["baseline"])
        result = "pass" if check["passed"] else "fail"
        rows.append([check["name"], _fmt(check["value"]), _fmt(check["threshold"]), baseline, result])
    return rows


def card_sections(project: Project, client: Any, version: Any) -> list[Section]:
    """The sections of the card of registered ``version`` (an MLflow ModelVersion)."""
    config = project.config
    run = client.get_run(version.run_id)
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    classes = list(config.dataset.classes)
    height, width = config.dataset.image_size
    comparison = _load(client, version.run_id, "evaluation/comparison.json") or {}
    verdict = _load(client, version.run_id, "evaluation/verdict.json") or {}
    profile = (_load(client, version.run_id, "data/profile.json") or {}).get("classes", {})
    candidate = comparison.get("candidate") or {}
    per_class = candidate.get("per_class", {})

    sections: list[Section] = [
        (
            "Intended use",
            [
                f"Classifies {height}x{width} {'grayscale' if config.dataset.channels == 1 else 'colour'} images of "
                f"the dataset '{config.dataset.name}' into one of {len(classes)} classes: {', '.join(classes)}.",
                "Input: float32 arrays (N, height, width, channels) with values in [0, 1], prepared the way ingest "
                "prepares images (pipelines.data.images); output: one probability per class and the class.",
                "Not for: images of other kinds or sizes, or decisions without a human able to overrule it.",
            ],
            [],
        ),
        (
            "Data",
            [
                f"Data version {tags.get('data_version', '-')} (DVC); it passed the Great Expectations suite before "
                "training (bad data fails the retrain before anything trains).",
            ],
            [["class", "images", "pixel mean", "pixel std"]]
            + [
                [label, str(stats.get("count", "-")), _fmt(stats.get("mean")), _fmt(stats.get("std"))]
                for label, stats in sorted(profile.items())
            ]
            if profile
            else [],
        ),
        (
            "Training",
            [f"MLflow run {run.info.run_id} ({run.info.run_name})."],
            [["parameter", "value"]]
            + [[key, value] for key, value in sorted(params.items()) if key.startswith(("train.", "dataset."))]
            + [[key, params[key]] for key in ("strategy", "replicas", "global_batch_size") if key in params],
        ),
        (
            "Metrics (test split)",
            [
                f"accuracy {_fmt(metrics.get('test_accuracy', '-'))}, "
                f"macro-F1 {_fmt(metrics.get('test_macro_f1', '-'))}, "
                f"log loss {_fmt(metrics.get('test_log_loss', '-'))}; "
                f"validation accuracy {_fmt(metrics.get('val_accuracy', '-'))}. "
                "Confusion matrix: test_confusion_matrix.png in the run.",
            ],
            [["class", "precision", "recall", "F1", "support"]]
            + [
                [name, _fmt(scores["precision"]), _fmt(scores["recall"]), _fmt(scores["f1"]), str(scores["support"])]
                for name, scores in per_class.items()
            ]
            if per_class
            else [],
        ),
        (
            "Gate",
            [
                f"verdict: {'passed' if verdict.get('passed') else tags.get('gate', 'not gated')}; "
                f"baseline: {verdict.get('note', tags.get('gate.baseline', '-'))}"
            ],
            _gate_rows(verdict),
        ),
    ]
    champion = comparison.get("champion")
    mcnemar, bootstrap = comparison.get("mcnemar"), comparison.get("bootstrap")
    sections.append(
        (
            "Comparison with the champion it was gated on",
            [
                f"champion ({tags.get('evaluated_against', '-')}): accuracy {_fmt(champion['accuracy'])}, macro-F1 "
                f"{_fmt(champion['macro_f1'])}; McNemar p = {_fmt(mcnemar['p_value']) if mcnemar else '-'}; "
                f"bootstrap 95% interval of the accuracy difference "
                f"[{_fmt(bootstrap['low']) if bootstrap else '-'}, {_fmt(bootstrap['high']) if bootstrap else '-'}]"
            ]
            if champion
            else ["none: this was the first model (value thresholds only)"],
            [],
        )
    )
    version_tags = version.tags
    sections.append(
        (
            "Lineage",
            [],
            [
                ["", "value"],
                ["registered model", f"{version.name} version {version.version}"],
                ["MLflow run", run.info.run_id],
                ["data version", tags.get("data_version", "-")],
                ["git commit", tags.get("git_commit", "-")],
                ["Airflow", f"{tags.get('airflow.dag_id', '-')} / {tags.get('airflow.run_id', '-')}"],
                ["training fingerprint", tags.get("training_fingerprint", "-")],
            ],
        )
    )
    promoted = [
        f"promoted at {version_tags['promoted_at']} by {version_tags.get('promoted_by', '-')}: "
        f"{version_tags.get('promotion_reason', '-')} (replaced {version_tags.get('replaced_version', 'none')}"
        f"{', forced' if version_tags.get('promotion_forced') == 'true' else ''})"
    ] if version_tags.get("promoted_at") else ["never promoted"]  # fmt: skip
    if version_tags.get("retired_at"):
        promoted.append(f"retired at {version_tags['retired_at']}")
    promoted.append(f"infra validation: {version_tags.get('infra_validation', 'not yet')}")
    sections.append(("Promotion", promoted, []))
    weak = [name for name, scores in per_class.items() if float(scores["recall"]) < WEAK_RECALL]
    sections.append(
        (
            "Known limits",
            [
                f"Trained and tested only on '{config.dataset.name}' images of {height}x{width} pixels; accuracy on "
                "other sources is unknown. The monitor DAG compares served inputs with this training data.",
                f"Test split of {candidate.get('n', '-')} images: one error moves accuracy by about "
                f"{1 / candidate['n']:.2%}." if candidate.get("n") else "No test evaluation recorded.",
                f"Classes with test recall under {WEAK_RECALL:.0%}: {', '.join(weak)}." if weak
                else f"Every class has test recall of at least {WEAK_RECALL:.0%}.",
            ],
            [],
        )
    )  # fmt: skip
    return sections


def render_markdown(title: str, sections: list[Section]) -> str:
    """The card as Markdown."""
    lines = [f"# {title}"]
    for heading, paragraphs, table in sections:
        lines += ["", f"## {heading}", ""]
        lines += [*paragraphs]
        if table:
            header, *rows = table
            lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_html(title: str, sections: list[Section]) -> str:
    """The card as a self-contained HTML page."""
    return html_page(title, title, sections, max_width="60em")


def publish_model_card(project: Project, version: str) -> str:
    """Write the card of ``version`` (Markdown and HTML) to its run and link it from the version; return its URI."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import connect, with_retries

    connect(project)
    client = MlflowClient()
    name = project.config.registry.model_name
    model_version = client.get_model_version(name, version)
    title = f"Model card: {name} version {version}"
    sections = card_sections(project, client, model_version)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / MARKDOWN_NAME).write_text(render_markdown(title, sections), encoding="utf-8")
        (Path(folder) / HTML_NAME).write_text(render_html(title, sections), encoding="utf-8")
        with_retries(
            lambda: client.log_artifacts(str(model_version.run_id), folder, artifact_path=CARD_FOLDER),
            f"log the model card of version {version}",
        )
    uri = f"runs:/{model_version.run_id}/{CARD_FOLDER}/{MARKDOWN_NAME}"
    description = (
        f"Model card: {uri} (HTML: runs:/{model_version.run_id}/{CARD_FOLDER}/{HTML_NAME}); "
        f"in the MLflow UI, the run's artifacts, folder {CARD_FOLDER}."
    )
    with_retries(lambda: client.update_model_version(name, version, description=description), "link the model card")
    return uri
