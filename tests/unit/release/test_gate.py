"""Tests of the evaluation gate: value thresholds, change thresholds against the champion, the verdict's forms."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from pipelines.config import GateConfig
from pipelines.release.gate import NO_CHAMPION_NOTE, Check, Verdict, evaluate_gate
from pipelines.release.metrics import ClassificationMetrics, classification_metrics

CLASSES = ("a", "b", "c")
PER_CLASS = 10
CONFIG = GateConfig(
    min_accuracy=0.8, min_macro_f1=0.8, primary_metric="accuracy", max_primary_drop=0.05, max_class_recall_drop=0.1
)


def scored(errors: Sequence[int], classes: Sequence[str] = CLASSES) -> ClassificationMetrics:
    """Metrics of a model that gets ``errors[i]`` of the 10 examples of class ``i`` wrong (predicts the next class)."""
    k = len(classes)
    y_true = np.repeat(np.arange(k), PER_CLASS)
    y_pred = y_true.copy()
    for index, count in enumerate(errors):
        wrong = np.flatnonzero(y_true == index)[:count]
        y_pred[wrong] = (index + 1) % k
    return classification_metrics(y_true, np.eye(k)[y_pred], classes)


CHAMPION = scored([1, 1, 1])  # accuracy 0.9, every recall 0.9


def names(checks: Sequence[Check]) -> list[str]:
    return [check.name for check in checks]


def check_named(verdict: Verdict, name: str) -> Check:
    matches = [check for check in verdict.checks if check.name == name]
    assert len(matches) == 1, f"expected one check named {name!r}, got {names(verdict.checks)}"
    return matches[0]


def test_candidate_within_every_threshold_passes() -> None:
    # Accuracy 0.9 (same as the champion); recall of b drops 0.9 -> 0.8, exactly the allowed 0.1.
    verdict = evaluate_gate(scored([1, 2, 0]), CHAMPION, CONFIG)
    assert verdict.passed, f"candidate should pass:\n{verdict.format_table()}"
    assert verdict.has_champion, "the verdict should record that a champion was compared"
    expected = ["min_accuracy", "min_macro_f1", "class_set", "max_accuracy_drop", "max_class_recall_drop"]
    assert names(verdict.checks) == expected, f"checks: {names(verdict.checks)}"
    primary = check_named(verdict, "max_accuracy_drop")
    assert primary.baseline == pytest.approx(0.9), f"primary baseline should be the champion's accuracy: {primary}"
    assert primary.threshold == pytest.approx(0.85), f"primary threshold should be 0.9 - 0.05: {primary}"
    assert "champion" in verdict.note, f"note should name the champion baseline: {verdict.note!r}"


def test_accuracy_under_the_minimum_fails_on_value() -> None:
    config = CONFIG.model_copy(update={"min_macro_f1": 0.5})
    verdict = evaluate_gate(scored([3, 3, 3]), None, config)  # accuracy 0.7
    assert not verdict.passed, "accuracy 0.7 under 0.8 should fail"
    assert names(verdict.failing_checks) == ["min_accuracy"], f"failing: {names(verdict.failing_checks)}"
    check = check_named(verdict, "min_accuracy")
    assert check.value == pytest.approx(0.7), f"value should be the candidate accuracy: {check}"
    assert check.threshold == pytest.approx(0.8), f"threshold should be min_accuracy: {check}"
    assert "0.7000" in check.description, f"description should give the value: {check.description!r}"


def test_macro_f1_under_the_minimum_fails_on_value() -> None:
    config = CONFIG.model_copy(update={"min_accuracy": 0.5, "min_macro_f1": 0.95})
    verdict = evaluate_gate(scored([1, 1, 1]), None, config)
    assert names(verdict.failing_checks) == ["min_macro_f1"], f"failing: {names(verdict.failing_checks)}"


def test_primary_metric_drop_beyond_tolerance_fails() -> None:
    # Accuracy 25/30 = 0.833: above min_accuracy, but 0.067 under the champion's 0.9 (allowed 0.05).
    verdict = evaluate_gate(scored([2, 2, 1]), CHAMPION, CONFIG)
    assert not verdict.passed, f"an accuracy drop of 0.067 should fail:\n{verdict.format_table()}"
    assert names(verdict.failing_checks) == ["max_accuracy_drop"], f"failing: {names(verdict.failing_checks)}"
    check = check_named(verdict, "max_accuracy_drop")
    assert "dropped" in check.description, f"description should explain the drop: {check.description!r}"


def test_primary_metric_can_be_macro_f1() -> None:
    config = CONFIG.model_copy(update={"primary_metric": "macro_f1"})
    verdict = evaluate_gate(scored([2, 2, 1]), CHAMPION, config)
    check = check_named(verdict, "max_macro_f1_drop")
    assert check.baseline == pytest.approx(CHAMPION.macro_f1), f"baseline should be the champion's macro F1: {check}"
    assert "max_accuracy_drop" not in names(verdict.checks), f"only the primary metric is compared: {verdict.checks}"


def test_one_class_recall_drop_fails_and_names_the_class() -> None:
    # Same accuracy as the champion (0.9), but class b's recall falls 0.9 -> 0.7.
    verdict = evaluate_gate(scored([0, 3, 0]), CHAMPION, CONFIG)
    assert not verdict.passed, f"a recall drop of 0.2 should fail:\n{verdict.format_table()}"
    assert names(verdict.failing_checks) == ["max_class_recall_drop"], f"failing: {names(verdict.failing_checks)}"
    check = check_named(verdict, "max_class_recall_drop")
    assert "'b'" in check.description, f"the failing class should be named: {check.description!r}"
    assert "'a'" not in check.description, f"passing classes should not be named: {check.description!r}"
    assert check.value == pytest.approx(0.7), f"value should be the worst class's recall: {check}"
    assert check.baseline == pytest.approx(0.9), f"baseline should be the champion's recall of b: {check}"


def test_every_failing_class_is_named() -> None:
    champion = scored([0, 0, 3])  # recalls 1.0, 1.0, 0.7; accuracy 0.9
    verdict = evaluate_gate(scored([2, 2, 0]), champion, CONFIG)  # recalls 0.8, 0.8, 1.0; accuracy 0.867
    assert names(verdict.failing_checks) == ["max_class_recall_drop"], f"failing: {names(verdict.failing_checks)}"
    description = check_named(verdict, "max_class_recall_drop").description
    assert "'a'" in description, f"class a should be named: {description!r}"
    assert "'b'" in description, f"class b should be named: {description!r}"
    assert "2 classes" in description, f"the count of failing classes should be given: {description!r}"


def test_first_model_passes_on_value_thresholds_alone() -> None:
    # A candidate that would fail any change threshold still passes when there is no champion.
    verdict = evaluate_gate(scored([2, 2, 1]), None, CONFIG)
    assert verdict.passed, f"the first model should pass on value thresholds:\n{verdict.format_table()}"
    assert not verdict.has_champion, "there is no champion"
    assert verdict.note == NO_CHAMPION_NOTE, f"note should say value thresholds only: {verdict.note!r}"
    assert names(verdict.checks) == ["min_accuracy", "min_macro_f1"], f"checks: {names(verdict.checks)}"
    assert all(check.baseline is None for check in verdict.checks), "value thresholds have no baseline"
    assert NO_CHAMPION_NOTE in verdict.format_table(), "the table should show the baseline note"


def test_class_set_mismatch_fails_without_change_checks() -> None:
    champion = scored([0, 0, 0], classes=("a", "b", "d"))
    verdict = evaluate_gate(scored([0, 0, 0]), champion, CONFIG)
    assert not verdict.passed, "a champion with other classes cannot be compared: the gate must fail"
    assert names(verdict.failing_checks) == ["class_set"], f"failing: {names(verdict.failing_checks)}"
    description = check_named(verdict, "class_set").description
    assert "'c'" in description, f"the candidate-only class should be named: {description!r}"
    assert "'d'" in description, f"the champion-only class should be named: {description!r}"
    assert "max_accuracy_drop" not in names(verdict.checks), "change checks should be skipped on mismatch"


def test_champion_label_goes_into_the_note() -> None:
    verdict = evaluate_gate(scored([1, 1, 1]), CHAMPION, CONFIG, champion_label="version 3")
    assert "version 3" in verdict.note, f"note should name the champion version: {verdict.note!r}"


def test_nan_metric_never_passes() -> None:
    candidate = scored([0, 0, 0])
    broken = ClassificationMetrics.model_validate({**candidate.model_dump(), "accuracy": float("nan")})
    verdict = evaluate_gate(broken, None, CONFIG)
    assert names(verdict.failing_checks) == ["min_accuracy"], f"NaN accuracy should fail: {verdict.checks}"


def test_verdict_json_round_trip() -> None:
    for verdict in (
        evaluate_gate(scored([1, 2, 0]), CHAMPION, CONFIG),
        evaluate_gate(scored([0, 3, 0]), CHAMPION, CONFIG),
        evaluate_gate(scored([1, 1, 1]), None, CONFIG),
    ):
        document = verdict.model_dump(mode="json")
        restored = Verdict.model_validate(json.loads(json.dumps(document)))
        assert restored == verdict, f"verdict should survive a JSON round trip: {document}"


def test_verdict_refuses_a_pass_its_checks_do_not_support() -> None:
    data: dict[str, Any] = evaluate_gate(scored([0, 3, 0]), CHAMPION, CONFIG).model_dump(mode="json")
    data["passed"] = True
    with pytest.raises(ValueError, match="checks say otherwise"):
        Verdict.model_validate(data)


def test_verdict_needs_checks_with_unique_names() -> None:
    data: dict[str, Any] = evaluate_gate(scored([1, 1, 1]), None, CONFIG).model_dump(mode="json")
    with pytest.raises(ValueError, match="at least one check"):
        Verdict.model_validate({**data, "checks": []})
    with pytest.raises(ValueError, match="must be unique"):
        Verdict.model_validate({**data, "checks": [data["checks"][0], data["checks"][0]]})


@pytest.mark.parametrize(
    ("key", "value"),
    [("passed", "yes"), ("checks", None), ("note", 3), ("has_champion", None)],
)
def test_malformed_verdict_is_refused(key: str, value: object) -> None:
    data: dict[str, Any] = evaluate_gate(scored([1, 1, 1]), None, CONFIG).model_dump(mode="json")
    data[key] = value
    with pytest.raises(ValueError, match=key):
        Verdict.model_validate(data)


def test_malformed_check_is_refused() -> None:
    data: dict[str, Any] = evaluate_gate(scored([1, 1, 1]), None, CONFIG).model_dump(mode="json")
    data["checks"][0]["value"] = "0.9"
    with pytest.raises(ValueError, match="value"):
        Verdict.model_validate(data)


# A verdict as the hand-written ``to_dict`` wrote it to ``evaluation/verdict.json`` before the verdict became a
# pydantic model: runs gated then must still be readable.
OLD_VERDICT = {
    "passed": False,
    "has_champion": True,
    "note": "champion (version 3), value and change thresholds",
    "checks": [
        {
            "name": "min_accuracy",
            "passed": True,
            "value": 0.9,
            "threshold": 0.8,
            "baseline": None,
            "description": "accuracy 0.9000 >= minimum 0.8000",
        },
        {
            "name": "min_macro_f1",
            "passed": True,
            "value": 0.8976982097186701,
            "threshold": 0.8,
            "baseline": None,
            "description": "macro_f1 0.8977 >= minimum 0.8000",
        },
        {
            "name": "class_set",
            "passed": True,
            "value": 1.0,
            "threshold": 1.0,
            "baseline": None,
            "description": "candidate and champion share the same 3 classes",
        },
        {
            "name": "max_accuracy_drop",
            "passed": True,
            "value": 0.9,
            "threshold": 0.85,
            "baseline": 0.9,
            "description": "accuracy 0.9000 vs champion 0.9000 (+0.0000), allowed drop 0.0500",
        },
        {
            "name": "max_class_recall_drop",
            "passed": False,
            "value": 0.7,
            "threshold": 0.8,
            "baseline": 0.9,
            "description": "recall dropped more than 0.1000 for 1 class: 'b' 0.9000 -> 0.7000 (-0.2000)",
        },
    ],
}


def test_verdict_logged_in_the_old_format_is_read_back() -> None:
    verdict = Verdict.model_validate(json.loads(json.dumps(OLD_VERDICT)))
    assert not verdict.passed, "the stored verdict failed"
    assert verdict.has_champion, "the stored verdict was against a champion"
    assert names(verdict.failing_checks) == ["max_class_recall_drop"], f"failing: {names(verdict.failing_checks)}"
    recall = check_named(verdict, "max_class_recall_drop")
    assert (recall.value, recall.threshold, recall.baseline) == (0.7, 0.8, 0.9), f"recall check: {recall}"
    assert check_named(verdict, "min_accuracy").baseline is None, "a value threshold has no baseline"
    tags = verdict.as_tags()
    assert tags["gate.max_class_recall_drop"] == "fail 0.7000/0.8000 (baseline 0.9000)", f"tags: {tags}"
    assert verdict.format_table().splitlines()[-1] == "GATE FAILED: max_class_recall_drop", verdict.format_table()
    rewritten = verdict.model_dump(mode="json")
    assert rewritten == OLD_VERDICT, f"new documents should keep the old keys and structure: {rewritten}"


def test_tags_for_mlflow() -> None:
    verdict = evaluate_gate(scored([0, 3, 0]), CHAMPION, CONFIG)
    tags = verdict.as_tags()
    assert tags["gate"] == "failed", f"gate tag: {tags}"
    assert tags["gate.min_accuracy"] == "pass 0.9000/0.8000", f"value check tag: {tags['gate.min_accuracy']!r}"
    recall_tag = tags["gate.max_class_recall_drop"]
    assert recall_tag == "fail 0.7000/0.8000 (baseline 0.9000)", f"change check tag: {recall_tag!r}"
    assert all(isinstance(value, str) for value in tags.values()), f"tag values must be strings: {tags}"
    first = evaluate_gate(scored([1, 1, 1]), None, CONFIG).as_tags()
    assert first["gate"] == "passed", f"gate tag: {first}"
    assert first["gate.baseline"] == NO_CHAMPION_NOTE, f"baseline tag: {first}"


def test_table_lists_every_check_and_ends_with_the_result() -> None:
    passing = evaluate_gate(scored([1, 2, 0]), CHAMPION, CONFIG)
    table = passing.format_table()
    for check in passing.checks:
        assert check.name in table, f"{check.name} missing from table:\n{table}"
    assert table.splitlines()[-1] == "GATE PASSED", f"last line:\n{table}"

    failing = evaluate_gate(scored([2, 4, 1]), CHAMPION, CONFIG)
    table = failing.format_table()
    expected = "GATE FAILED: min_accuracy, min_macro_f1, max_accuracy_drop, max_class_recall_drop"
    assert table.splitlines()[-1] == expected, f"last line:\n{table}"
    assert "'b'" in table, f"the failing class should appear in the table's reasons:\n{table}"


def test_table_columns_are_aligned() -> None:
    verdict = evaluate_gate(scored([0, 3, 0]), CHAMPION, CONFIG)
    lines = verdict.format_table().splitlines()
    table = lines[: 2 + len(verdict.checks)]
    header = table[0]
    for column in ("check", "value", "threshold", "baseline", "result"):
        assert column in header, f"header should have a {column} column: {header!r}"
    separators = [[i for i, char in enumerate(line) if char in "|+"] for line in table]
    assert all(positions == separators[0] for positions in separators), "column separators should line up:\n" + (
        "\n".join(table)
    )
