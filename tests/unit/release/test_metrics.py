"""Tests of the pure metric functions: hand-computed scores, the exact McNemar test, the paired bootstrap."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, f1_score, log_loss, precision_recall_fscore_support

from pipelines.config import EvaluateConfig
from pipelines.release.metrics import (
    BootstrapInterval,
    ClassificationMetrics,
    Comparison,
    McNemarResult,
    bootstrap_accuracy_difference,
    classification_metrics,
    compare_models,
    mcnemar_exact,
)

CLASSES = ("a", "b", "c")

# Eight examples of three classes. Predictions (argmax): 0 0 1 | 1 2 | 2 2 0.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2])
PROBABILITIES = np.array(
    [
        [0.8, 0.1, 0.1],
        [0.6, 0.3, 0.1],
        [0.3, 0.6, 0.1],
        [0.2, 0.7, 0.1],
        [0.1, 0.4, 0.5],
        [0.1, 0.1, 0.8],
        [0.2, 0.2, 0.6],
        [0.5, 0.25, 0.25],
    ]
)
TRUE_CLASS_PROBABILITY = [0.8, 0.6, 0.3, 0.7, 0.4, 0.8, 0.6, 0.25]


def one_hot(predictions: list[int], k: int = 3) -> np.ndarray:
    return np.eye(k)[predictions]


def paired(b: int, c: int, both: int = 0, neither: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correctness arrays with ``b`` candidate-only, ``c`` champion-only, and concordant examples."""
    candidate = np.array([True] * b + [False] * c + [True] * both + [False] * neither)
    champion = np.array([False] * b + [True] * c + [True] * both + [False] * neither)
    return candidate, champion


# classification_metrics


def test_metrics_match_hand_computed_values() -> None:
    metrics = classification_metrics(Y_TRUE, PROBABILITIES, CLASSES)
    # Confusion (rows true, columns predicted): [[2,1,0],[0,1,1],[1,0,2]].
    assert metrics.confusion_matrix == [[2, 1, 0], [0, 1, 1], [1, 0, 2]], metrics.confusion_matrix
    assert metrics.n == 8, f"n should be 8, got {metrics.n}"
    assert metrics.accuracy == pytest.approx(5 / 8), f"accuracy should be 5/8, got {metrics.accuracy}"
    # Precision = recall = F1 per class: 2/3, 1/2, 2/3; macro F1 = 11/18.
    expected = {"a": 2 / 3, "b": 1 / 2, "c": 2 / 3}
    for name, value in expected.items():
        scores = metrics.per_class[name]
        assert scores.precision == pytest.approx(value), f"precision of {name}: {scores.precision} != {value}"
        assert scores.recall == pytest.approx(value), f"recall of {name}: {scores.recall} != {value}"
        assert scores.f1 == pytest.approx(value), f"f1 of {name}: {scores.f1} != {value}"
    supports = {name: metrics.per_class[name].support for name in CLASSES}
    assert supports == {"a": 3, "b": 2, "c": 3}, f"supports: {supports}"
    assert metrics.macro_f1 == pytest.approx(11 / 18), f"macro F1 should be 11/18, got {metrics.macro_f1}"
    expected_loss = -sum(math.log(p) for p in TRUE_CLASS_PROBABILITY) / 8
    assert metrics.log_loss == pytest.approx(expected_loss), f"log loss {metrics.log_loss} != {expected_loss}"


def test_metrics_agree_with_sklearn_on_random_data() -> None:
    rng = np.random.default_rng(3)
    k, n = 5, 300
    y_true = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[y_true]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    names = [f"class{i}" for i in range(k)]
    metrics = classification_metrics(y_true, probabilities, names)
    y_pred = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=range(k), zero_division=0)
    for i, name in enumerate(names):
        scores = metrics.per_class[name]
        assert scores.precision == pytest.approx(precision[i]), f"precision of {name} differs from sklearn"
        assert scores.recall == pytest.approx(recall[i]), f"recall of {name} differs from sklearn"
        assert scores.f1 == pytest.approx(f1[i]), f"f1 of {name} differs from sklearn"
        assert scores.support == support[i], f"support of {name} differs from sklearn"
    assert metrics.macro_f1 == pytest.approx(f1_score(y_true, y_pred, average="macro")), "macro F1 differs"
    assert metrics.log_loss == pytest.approx(log_loss(y_true, probabilities, labels=range(k))), "log loss differs"
    assert metrics.confusion_matrix == confusion_matrix(y_true, y_pred).tolist(), "confusion matrix differs"


def test_log_loss_is_finite_with_a_zero_probability_on_the_true_class() -> None:
    probabilities = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    metrics = classification_metrics(np.array([0, 0]), probabilities, CLASSES)
    assert math.isfinite(metrics.log_loss), f"log loss should be finite, got {metrics.log_loss}"
    expected = -math.log(1e-15) / 2
    assert metrics.log_loss == pytest.approx(expected), f"clipped log loss {metrics.log_loss} != {expected}"


def test_absent_class_keeps_its_index_and_scores_zero() -> None:
    # Class "c" never appears and is never predicted: it is still a row, a column and a metric name.
    metrics = classification_metrics(np.array([0, 1, 1]), one_hot([0, 1, 0]), CLASSES)
    assert len(metrics.confusion_matrix) == 3, f"confusion matrix should be 3x3: {metrics.confusion_matrix}"
    absent = metrics.per_class["c"]
    assert (absent.precision, absent.recall, absent.f1, absent.support) == (0.0, 0.0, 0.0, 0), f"absent: {absent}"
    assert math.isfinite(metrics.log_loss), "log loss must be finite with an absent class"


def test_flat_dict_has_stable_names() -> None:
    flat = classification_metrics(Y_TRUE, PROBABILITIES, CLASSES).as_flat_dict()
    expected = {"accuracy", "macro_f1", "log_loss"} | {
        f"{metric}_{name}" for metric in ("precision", "recall", "f1") for name in CLASSES
    }
    assert set(flat) == expected, f"flat metric names: {sorted(flat)}"
    assert all(isinstance(value, float) for value in flat.values()), f"values must be floats: {flat}"


def test_flat_dict_sanitises_and_refuses_colliding_class_names() -> None:
    flat = classification_metrics(np.array([0, 1]), one_hot([0, 1], 2), ["cat:1", "dog"]).as_flat_dict()
    assert "recall_cat_1" in flat, f"':' should become '_': {sorted(flat)}"
    colliding = classification_metrics(np.array([0, 1]), one_hot([0, 1], 2), ["x:1", "x?1"])
    with pytest.raises(ValueError, match="both map to"):
        colliding.as_flat_dict()


@pytest.mark.parametrize(
    ("y_true", "probabilities", "message"),
    [
        (np.array([0, 1]), np.ones((3, 3)) / 3, "shape"),
        (np.array([0, 3]), np.ones((2, 3)) / 3, "outside"),
        (np.array([0.0, 1.0]), np.ones((2, 3)) / 3, "integer"),
        (np.array([], dtype=int), np.ones((0, 3)), "empty"),
        (np.array([0, 1]), np.array([[2.0, 1.0, 0.5], [0.1, 0.2, 0.3]]), "logits"),
        (np.array([0, 1]), np.array([[np.nan, 0.5, 0.5], [0.2, 0.4, 0.4]]), "finite"),
    ],
)
def test_inconsistent_inputs_are_refused(y_true: np.ndarray, probabilities: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(y_true, probabilities, CLASSES)


def test_metrics_dict_round_trip() -> None:
    metrics = classification_metrics(Y_TRUE, PROBABILITIES, CLASSES)
    restored = ClassificationMetrics.model_validate(json.loads(json.dumps(metrics.model_dump(mode="json"))))
    assert restored == metrics, "metrics should survive a JSON round trip"


def test_metrics_document_must_score_exactly_its_classes() -> None:
    data = classification_metrics(Y_TRUE, PROBABILITIES, CLASSES).model_dump(mode="json")
    missing = {**data, "per_class": {name: data["per_class"][name] for name in ("a", "c")}}
    with pytest.raises(ValueError, match=r"per_class has no entry for classes \['b'\]"):
        ClassificationMetrics.model_validate(missing)
    unknown = {**data, "per_class": {**data["per_class"], "z": data["per_class"]["a"]}}
    with pytest.raises(ValueError, match="unknown classes"):
        ClassificationMetrics.model_validate(unknown)


# mcnemar_exact


@pytest.mark.parametrize(
    ("b", "c", "expected"),
    [
        (0, 0, 1.0),
        (10, 0, 2 * 0.5**10),
        (0, 10, 2 * 0.5**10),
        (12, 3, 2 * (1 + 15 + 105 + 455) / 2**15),  # 2 * P(X <= 3), X ~ Binomial(15, 1/2) = 0.03515625
        (7, 7, 1.0),
    ],
)
def test_mcnemar_on_known_tables(b: int, c: int, expected: float) -> None:
    candidate, champion = paired(b, c, both=20, neither=5)
    result = mcnemar_exact(candidate, champion)
    assert (result.b, result.c) == (b, c), f"discordant counts should be ({b}, {c}), got ({result.b}, {result.c})"
    assert result.p_value == pytest.approx(expected), f"p-value for b={b}, c={c}: {result.p_value} != {expected}"


@pytest.mark.parametrize(("b", "c"), [(12, 3), (25, 15), (40, 61), (1, 0), (200, 170)])
def test_mcnemar_matches_scipy_binomtest(b: int, c: int) -> None:
    candidate, champion = paired(b, c, both=3)
    expected = binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    result = mcnemar_exact(candidate, champion)
    assert result.p_value == pytest.approx(expected, rel=1e-9), f"b={b}, c={c}: {result.p_value} != {expected}"


def test_mcnemar_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        mcnemar_exact(np.array([True, False]), np.array([True, False, True]))


def test_correctness_must_be_boolean() -> None:
    result = mcnemar_exact(np.array([1, 0, 1]), np.array([0, 0, 1]))
    assert (result.b, result.c) == (1, 0), f"0/1 integers should be accepted as booleans: {result}"
    with pytest.raises(ValueError, match="booleans"):
        mcnemar_exact(np.array([0.9, 0.1]), np.array([0.2, 0.3]))


# bootstrap_accuracy_difference


def test_bootstrap_contains_the_observed_difference() -> None:
    candidate, champion = paired(b=30, c=10, both=150, neither=10)
    interval = bootstrap_accuracy_difference(candidate, champion, samples=2000, seed=1)
    assert interval.mean_difference == pytest.approx(0.1), f"observed difference should be 0.1: {interval}"
    assert interval.low < 0.1 < interval.high, f"interval should contain 0.1: {interval}"
    assert interval.low > 0.0, f"a 20-example lead out of 200 should exclude 0: {interval}"
    assert interval.samples == 2000, f"samples should be recorded: {interval}"


def test_bootstrap_contains_the_population_difference() -> None:
    rng = np.random.default_rng(11)
    candidate = rng.random(3000) < 0.90
    champion = rng.random(3000) < 0.85
    interval = bootstrap_accuracy_difference(candidate, champion, samples=2000, seed=5)
    assert interval.low < 0.05 < interval.high, f"interval should contain the true difference 0.05: {interval}"


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    candidate, champion = paired(b=17, c=9, both=60, neither=14)
    first = bootstrap_accuracy_difference(candidate, champion, samples=500, seed=42)
    second = bootstrap_accuracy_difference(candidate, champion, samples=500, seed=42)
    other = bootstrap_accuracy_difference(candidate, champion, samples=500, seed=43)
    assert first == second, f"same seed should give the same interval: {first} vs {second}"
    assert (first.low, first.high) != (other.low, other.high), "another seed should give another interval"


def test_bootstrap_of_identical_models_has_zero_width() -> None:
    correct = np.array([True] * 40 + [False] * 10)
    interval = bootstrap_accuracy_difference(correct, correct.copy(), samples=300, seed=0)
    assert (interval.mean_difference, interval.low, interval.high) == (0.0, 0.0, 0.0), f"zero width: {interval}"


def test_bootstrap_matches_an_index_resampling_bootstrap() -> None:
    candidate, champion = paired(b=40, c=25, both=120, neither=15)
    interval = bootstrap_accuracy_difference(candidate, champion, samples=4000, seed=9)
    rng = np.random.default_rng(123)
    indices = rng.integers(0, candidate.size, size=(4000, candidate.size))
    differences = candidate[indices].mean(axis=1) - champion[indices].mean(axis=1)
    low, high = np.quantile(differences, [0.025, 0.975])
    assert interval.low == pytest.approx(low, abs=0.01), f"low {interval.low} vs index bootstrap {low}"
    assert interval.high == pytest.approx(high, abs=0.01), f"high {interval.high} vs index bootstrap {high}"


def test_bootstrap_confidence_widens_the_interval() -> None:
    candidate, champion = paired(b=20, c=12, both=60, neither=8)
    narrow = bootstrap_accuracy_difference(candidate, champion, samples=2000, seed=2, confidence=0.5)
    wide = bootstrap_accuracy_difference(candidate, champion, samples=2000, seed=2, confidence=0.99)
    assert wide.high - wide.low > narrow.high - narrow.low, f"99% {wide} should be wider than 50% {narrow}"


@pytest.mark.parametrize(
    ("samples", "confidence", "size", "message"),
    [(0, 0.95, 5, "samples"), (100, 1.0, 5, "confidence"), (100, 0.95, 0, "empty")],
)
def test_bootstrap_refuses_bad_arguments(samples: int, confidence: float, size: int, message: str) -> None:
    correct = np.ones(size, dtype=bool)
    with pytest.raises(ValueError, match=message):
        bootstrap_accuracy_difference(correct, correct, samples=samples, seed=0, confidence=confidence)


# compare_models


def test_compare_without_champion_has_no_paired_statistics() -> None:
    comparison = compare_models(Y_TRUE, PROBABILITIES, None, CLASSES, EvaluateConfig())
    assert comparison.champion is None, "no champion metrics expected"
    assert comparison.mcnemar is None, "no McNemar test expected without a champion"
    assert comparison.bootstrap is None, "no bootstrap expected without a champion"
    assert comparison.candidate.accuracy == pytest.approx(5 / 8), "candidate metrics should be computed"


def test_compare_with_champion_bundles_everything_and_serialises() -> None:
    champion_probabilities = one_hot([0, 0, 0, 1, 1, 2, 2, 1])  # 7/8 right
    config = EvaluateConfig(bootstrap_samples=200, seed=3)
    comparison = compare_models(Y_TRUE, PROBABILITIES, champion_probabilities, CLASSES, config)
    assert comparison.champion is not None, "champion metrics expected"
    assert comparison.champion.accuracy == pytest.approx(7 / 8), f"champion accuracy: {comparison.champion}"
    assert comparison.mcnemar is not None, "McNemar expected"
    # Candidate misses examples 2, 4, 7; the champion misses 7: only the champion right on 2 and 4.
    assert (comparison.mcnemar.b, comparison.mcnemar.c) == (0, 2), f"McNemar counts: {comparison.mcnemar}"
    assert comparison.bootstrap is not None, "bootstrap expected"
    assert comparison.bootstrap == BootstrapInterval(
        mean_difference=-0.25,
        low=comparison.bootstrap.low,
        high=comparison.bootstrap.high,
        samples=200,
    ), f"bootstrap difference should be 5/8 - 7/8: {comparison.bootstrap}"
    text = json.dumps(comparison.model_dump(mode="json"))
    assert Comparison.model_validate(json.loads(text)) == comparison, "comparison should survive a JSON round trip"


# Documents as the hand-written ``to_dict`` wrote them to ``evaluation/comparison.json`` before the models
# became pydantic models: runs logged then must still be readable.
OLD_CANDIDATE = {
    "class_names": ["cat", "dog"],
    "accuracy": 0.75,
    "macro_f1": 0.7333333333333334,
    "log_loss": 0.5108256237659907,
    "per_class": {
        "cat": {"precision": 0.6666666666666666, "recall": 1.0, "f1": 0.8, "support": 2},
        "dog": {"precision": 1.0, "recall": 0.5, "f1": 0.6666666666666666, "support": 2},
    },
    "confusion_matrix": [[2, 0], [1, 1]],
    "n": 4,
}
OLD_CHAMPION = {
    "class_names": ["cat", "dog"],
    "accuracy": 1.0,
    "macro_f1": 1.0,
    "log_loss": 0.10536051565782628,
    "per_class": {
        "cat": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2},
        "dog": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2},
    },
    "confusion_matrix": [[2, 0], [0, 2]],
    "n": 4,
}
OLD_COMPARISON = {
    "candidate": OLD_CANDIDATE,
    "champion": OLD_CHAMPION,
    "mcnemar": {"b": 0, "c": 1, "p_value": 1.0},
    "bootstrap": {"mean_difference": -0.25, "low": -0.75, "high": 0.0, "samples": 1000, "confidence": 0.95},
}
OLD_FIRST_COMPARISON = {"candidate": OLD_CANDIDATE, "champion": None, "mcnemar": None, "bootstrap": None}


def test_comparison_logged_in_the_old_format_is_read_back() -> None:
    comparison = Comparison.model_validate(json.loads(json.dumps(OLD_COMPARISON)))
    assert comparison.candidate.per_class["dog"].recall == 0.5, f"candidate per-class scores: {comparison.candidate}"
    assert comparison.candidate.confusion_matrix == [[2, 0], [1, 1]], "the confusion matrix should be read back"
    assert comparison.champion is not None, "the champion's metrics should be read back"
    assert comparison.champion.accuracy == 1.0, f"champion accuracy: {comparison.champion}"
    assert comparison.mcnemar == McNemarResult(b=0, c=1, p_value=1.0), f"McNemar: {comparison.mcnemar}"
    assert comparison.bootstrap is not None, "the bootstrap interval should be read back"
    assert (comparison.bootstrap.low, comparison.bootstrap.high) == (-0.75, 0.0), f"interval: {comparison.bootstrap}"
    assert comparison.candidate.as_flat_dict()["recall_dog"] == 0.5, "a read-back document gives the MLflow metrics"
    rewritten = comparison.model_dump(mode="json")
    assert rewritten == OLD_COMPARISON, f"new documents should keep the old keys and structure: {rewritten}"


def test_first_model_comparison_in_the_old_format_is_read_back() -> None:
    comparison = Comparison.model_validate(json.loads(json.dumps(OLD_FIRST_COMPARISON)))
    assert comparison.champion is None, "no champion in a first model's comparison"
    assert comparison.mcnemar is None, "no McNemar test in a first model's comparison"
    assert comparison.bootstrap is None, "no bootstrap in a first model's comparison"
    rewritten = comparison.model_dump(mode="json")
    assert rewritten == OLD_FIRST_COMPARISON, f"absent parts should still be written as null: {rewritten}"


def test_malformed_comparison_is_refused() -> None:
    with pytest.raises(ValueError, match="candidate"):
        Comparison.model_validate({"champion": None})
    with pytest.raises(ValueError, match="accuracy"):
        Comparison.model_validate({"candidate": {**OLD_CANDIDATE, "accuracy": "high"}})
