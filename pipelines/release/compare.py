"""Compare two models side by side, for a reviewer deciding whether to promote one over the other.

``mlops compare A B`` (versions, ``champion``/``challenger``, or run ids): the training parameters that
differ, the metrics each run logged and their difference, both models scored again on the SAME test split
(the workspace's data version) with McNemar's exact test and a bootstrap interval of the accuracy difference,
per-class recall and where the two disagree, the data versions (and whether the data changed) and the code
commits. :func:`format_text` is for the terminal and task logs, ``--json`` dumps the report, :func:`format_html`
writes a page a reviewer can open.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipelines.errors import PipelineError
from pipelines.project import CHALLENGER_ALIAS, CHAMPION_ALIAS, Project
from pipelines.release.html_page import Section, html_page

SIGNIFICANCE = 0.05
"""McNemar p-value under which a difference in accuracy is called significant."""
SHOWN_METRICS = ("test_accuracy", "test_macro_f1", "test_log_loss", "val_accuracy", "val_macro_f1")
NOT_COMPARED_PARAMS = re.compile(r"^((registry|promote|schedule|serve|monitor)\.|opt_)")
"""Left out of the parameter diff: settings that do not change the model, and MLflow's callback's dump of the
optimizer (``opt_*``), which repeats ``train.optimizer`` and ``train.learning_rate``."""


class ModelRef(BaseModel):
    """One side of the comparison: which model, and how it was made."""

    model_config = ConfigDict(frozen=True)

    label: str
    run_id: str
    version: str | None
    model_uri: str
    data_version: str
    git_commit: str
    params: dict[str, str]
    metrics: dict[str, float]


class Row(BaseModel):
    """A named value on each side and, for numbers, B minus A."""

    model_config = ConfigDict(frozen=True)

    name: str
    a: str | float | None
    b: str | float | None
    difference: float | None = None


class PairedTest(BaseModel):
    """Both models scored on one test split: accuracies, McNemar's exact test, bootstrap interval, verdict."""

    model_config = ConfigDict(frozen=True)

    data_version: str
    examples: int
    a_accuracy: float
    b_accuracy: float
    only_a_right: int
    only_b_right: int
    p_value: float
    difference_low: float
    difference_high: float
    verdict: str
    disagreements: int
    disagreements_by_class: dict[str, int]


class ComparisonReport(BaseModel):
    """Everything :func:`compare_models` found."""

    model_config = ConfigDict(frozen=True)

    a: ModelRef
    b: ModelRef
    differing_params: list[Row]
    metrics: list[Row]
    paired: PairedTest
    per_class_recall: list[Row]
    data_changed: bool
    code_changed: bool


def resolve(project: Project, spec: str) -> ModelRef:
    """The model ``spec`` names: a version number, ``champion`` / ``challenger``, or an MLflow run id."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import connect

    connect(project)
    client = MlflowClient()
    name = project.config.registry.model_name
    spec = str(spec).strip()
    version = None
    try:
        if spec in (CHAMPION_ALIAS, CHALLENGER_ALIAS):
            version = client.get_model_version_by_alias(name, spec)
            label = f"{spec} (version {version.version})"
        elif spec.isdigit():
            version = client.get_model_version(name, spec)
            label = f"version {spec}"
        else:
            label = f"run {spec[:12]}"
        run = client.get_run(str(version.run_id) if version is not None else spec)
    except MlflowException:
        raise PipelineError(f"{spec!r}: no such version, alias or run of {name} in the registry") from None
    tags = run.data.tags
    params = {key: value for key, value in run.data.params.items() if not NOT_COMPARED_PARAMS.match(key)}
    return ModelRef(
        label=label,
        run_id=run.info.run_id,
        version=str(version.version) if version is not None else None,
        model_uri=f"models:/{name}/{version.version}" if version is not None else f"runs:/{run.info.run_id}/model",
        data_version=tags.get("data_version", ""),
        git_commit=tags.get("git_commit", "unknown"),
        params=params,
        metrics=dict(run.data.metrics),
    )


def _number(value: float | None) -> float | None:
    return None if value is None else float(value)


def compare_models(project: Project, spec_a: str, spec_b: str) -> ComparisonReport:
    """Compare ``spec_a`` with ``spec_b``; both are scored on the test split of the workspace's data version."""
    from pipelines.data.versioning import current_version
    from pipelines.release.evaluate import predict_probabilities
    from pipelines.release.metrics import bootstrap_accuracy_difference, classification_metrics, mcnemar_exact
    from pipelines.training.inputs import load_arrays

    a, b = resolve(project, spec_a), resolve(project, spec_b)
    classes = project.config.dataset.classes
    images, labels = load_arrays(project, "test")
    probabilities = {side.label: predict_probabilities(side.model_uri, images, classes) for side in (a, b)}
    scores_a = classification_metrics(labels, probabilities[a.label], classes)
    scores_b = classification_metrics(labels, probabilities[b.label], classes)
    predicted_a, predicted_b = probabilities[a.label].argmax(axis=1), probabilities[b.label].argmax(axis=1)
    right_a, right_b = predicted_a == labels, predicted_b == labels
    mcnemar = mcnemar_exact(right_a, right_b)
    interval = bootstrap_accuracy_difference(
        right_b, right_a, samples=project.config.evaluate.bootstrap_samples, seed=project.config.evaluate.seed
    )
    if mcnemar.p_value >= SIGNIFICANCE:
        verdict = f"no significant difference (McNemar p = {mcnemar.p_value:.3g} >= {SIGNIFICANCE})"
    else:
        better = b.label if scores_b.accuracy > scores_a.accuracy else a.label
        verdict = f"{better} is significantly more accurate (McNemar p = {mcnemar.p_value:.3g})"
    disagree = predicted_a != predicted_b
    paired = PairedTest(
        data_version=current_version(project),
        examples=len(labels),
        a_accuracy=scores_a.accuracy,
        b_accuracy=scores_b.accuracy,
        only_a_right=mcnemar.b,
        only_b_right=mcnemar.c,
        p_value=mcnemar.p_value,
        difference_low=interval.low,
        difference_high=interval.high,
        verdict=verdict,
        disagreements=int(np.count_nonzero(disagree)),
        disagreements_by_class={
            name: int(np.count_nonzero(disagree & (labels == index))) for index, name in enumerate(classes)
        },
    )
    names = sorted(set(a.params) | set(b.params))
    differing = [
        Row(name=name, a=a.params.get(name), b=b.params.get(name))
        for name in names
        if a.params.get(name) != b.params.get(name)
    ]
    metrics = []
    for name in SHOWN_METRICS:
        value_a, value_b = _number(a.metrics.get(name)), _number(b.metrics.get(name))
        difference = value_b - value_a if value_a is not None and value_b is not None else None
        metrics.append(Row(name=name, a=value_a, b=value_b, difference=difference))
    recall = [
        Row(
            name=name,
            a=scores_a.per_class[name].recall,
            b=scores_b.per_class[name].recall,
            difference=scores_b.per_class[name].recall - scores_a.per_class[name].recall,
        )
        for name in classes
    ]
    return ComparisonReport(
        a=a,
        b=b,
        differing_params=differing,
        metrics=metrics,
        paired=paired,
        per_class_recall=recall,
        data_changed=a.data_version != b.data_version,
        code_changed=a.git_commit != b.git_commit,
    )


def _cell(value: str | float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _difference(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def _sections(report: ComparisonReport) -> list[Section]:
    """(title, lines, table rows with a header row) for each part of the report, in order."""
    a, b, paired = report.a, report.b, report.paired
    return [
        (
            "Models",
            [],
            [
                ["", "A", "B"],
                ["model", a.label, b.label],
                ["MLflow run", a.run_id, b.run_id],
                ["data version", a.data_version or "-", b.data_version or "-"],
                ["git commit", a.git_commit[:12], b.git_commit[:12]],
            ],
        ),
        (
            "What changed",
            [
                f"data: {'changed' if report.data_changed else 'same data version'}",
                f"code: {'changed' if report.code_changed else 'same commit'}",
            ],
            [["parameter", "A", "B"]] + [[row.name, _cell(row.a), _cell(row.b)] for row in report.differing_params]
            if report.differing_params
            else [],
        ),
        (
            "Logged metrics",
            [],
            [["metric", "A", "B", "B - A"]]
            + [[row.name, _cell(row.a), _cell(row.b), _difference(row.difference)] for row in report.metrics],
        ),
        (
            f"On the same test split (data version {paired.data_version[:12] or '-'}, {paired.examples} images)",
            [
                f"accuracy A {paired.a_accuracy:.4f}, B {paired.b_accuracy:.4f}; only A right on "
                f"{paired.only_a_right}, only B right on {paired.only_b_right}",
                f"95% bootstrap interval of B - A: [{paired.difference_low:+.4f}, {paired.difference_high:+.4f}]",
                f"verdict: {paired.verdict}",
                f"the two disagree on {paired.disagreements} images",
            ],
            [["class", "recall A", "recall B", "B - A", "disagreements"]]
            + [
                [
                    row.name,
                    _cell(row.a),
                    _cell(row.b),
                    _difference(row.difference),
                    str(paired.disagreements_by_class.get(row.name, 0)),
                ]
                for row in report.per_class_recall
            ],
        ),
    ]


def format_text(report: ComparisonReport) -> str:
    """The report as aligned plain text (the terminal, task logs)."""
    lines = [f"compare A = {report.a.label}  with  B = {report.b.label}"]
    for title, text, table in _sections(report):
        lines += ["", title, *(f"  {line}" for line in text)]
        if table:
            widths = [max(len(row[index]) for row in table) for index in range(len(table[0]))]
            lines += [
                "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in table
            ]
    return "\n".join(lines)


def format_html(report: ComparisonReport) -> str:
    """The report as a self-contained HTML page."""
    a, b = report.a.label, report.b.label
    return html_page(f"{a} vs {b}", f"A = {a} vs B = {b}", _sections(report))


def comparison_with_champion(project: Project, version: str) -> str:
    """The comparison of ``version`` against the current champion, as text for a task log; never raises.

    When ``version`` was evaluated against the current champion, that evaluation (the same test split, both
    models, McNemar and the bootstrap interval) is printed as it was logged: no model is loaded. Otherwise
    both are scored again (:func:`compare_models`). Empty when there is no champion or ``version`` is it.
    """
    from pipelines.release.champion_ledger import alias_version, registry_client
    from pipelines.release.evaluate import load_comparison

    try:
        client = registry_client(project)
        name = project.config.registry.model_name
        champion = alias_version(client, name, CHAMPION_ALIAS)
        if champion is None or champion == version:
            return ""
        run = client.get_run(client.get_model_version(name, version).run_id)
        if run.data.tags.get("evaluated_against") == f"version {champion}":
            return _format_logged(load_comparison(run.info.run_id), champion, version)
        return format_text(compare_models(project, CHAMPION_ALIAS, version))
    except Exception as error:  # a comparison is for the reader; it never blocks a promotion
        return f"comparison with the champion skipped: {type(error).__name__}: {error}"


def _format_logged(comparison: Any, champion: str, version: str) -> str:
    """The evaluation logged with ``version``'s run, against champion ``champion``, as text."""
    candidate, held = comparison.candidate, comparison.champion
    lines = [f"version {version} against the champion, version {champion} (from its evaluation, same test split)"]
    if held is None:
        return "\n".join([*lines, "  the champion could not be scored on the same classes"])
    lines.append(f"  accuracy {held.accuracy:.4f} -> {candidate.accuracy:.4f}, macro-F1 {held.macro_f1:.4f} -> "
                 f"{candidate.macro_f1:.4f} on {candidate.n} test images")  # fmt: skip
    if comparison.mcnemar is not None and comparison.bootstrap is not None:
        lines.append(
            f"  McNemar p = {comparison.mcnemar.p_value:.3g} (only the candidate right on {comparison.mcnemar.b}, "
            f"only the champion on {comparison.mcnemar.c}); 95% interval of the accuracy difference "
            f"[{comparison.bootstrap.low:+.4f}, {comparison.bootstrap.high:+.4f}]"
        )
    for name in candidate.class_names:
        before, after = held.per_class[name].recall, candidate.per_class[name].recall
        if abs(after - before) > 1e-9:
            lines.append(f"  recall of {name}: {before:.4f} -> {after:.4f}")
    return "\n".join(lines)
