"""Metrics: score a candidate on the test split and compare it, example by example, with the champion.

Pure functions over numpy arrays (no TensorFlow, no MLflow), so the evaluate step, the CLI and the
tests all compute the same numbers:

* :func:`classification_metrics` – accuracy, macro F1, log loss, per-class precision/recall/F1/support
  and the confusion matrix of one model, from its class probabilities;
* :func:`mcnemar_exact` – the exact McNemar test on the paired correctness of two models;
* :func:`bootstrap_accuracy_difference` – a seeded paired-bootstrap interval of the accuracy difference;
* :func:`compare_models` – all of the above for a candidate and, when there is one, the champion.

Classes are always indexed ``0..k-1`` in the order of ``class_names``, also when a class is absent from
the test split, so metric names and confusion matrices line up from run to run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipelines.config import EvaluateConfig

LOG_LOSS_EPSILON = 1e-15
"""Probabilities are clipped to ``[LOG_LOSS_EPSILON, 1]`` so a zero probability gives a finite log loss."""

PROBABILITY_SUM_TOLERANCE = 1e-3
"""How far a row of probabilities may sum from 1 (float32 softmax); logits are refused, not silently scored."""

_METRIC_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/ ]")

BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.integer[Any]]
FloatArray = NDArray[np.floating[Any]]


@dataclass(frozen=True)
class ClassMetrics:
    """Precision, recall and F1 of one class, and its support (examples of that class in the split)."""

    precision: float
    recall: float
    f1: float
    support: int

    def to_dict(self) -> dict[str, float | int]:
        """A JSON-serialisable form."""
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1, "support": self.support}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassMetrics:
        """The inverse of :meth:`to_dict`."""
        return cls(
            precision=float(data["precision"]),
            recall=float(data["recall"]),
            f1=float(data["f1"]),
            support=int(data["support"]),
        )


@dataclass(frozen=True)
class ClassificationMetrics:
    """The scores of one model on one labelled split.

    ``per_class`` is keyed by class name, in the order of ``class_names``. ``confusion_matrix[i][j]``
    counts examples of true class ``i`` predicted as class ``j``. Precision, recall and F1 of a class
    with no predicted (or no true) examples are 0, and macro F1 averages over all ``k`` classes.
    """

    class_names: tuple[str, ...]
    accuracy: float
    macro_f1: float
    log_loss: float
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]
    n: int

    def as_flat_dict(self) -> dict[str, float]:
        """Metrics under stable names for MLflow, so runs line up in its compare view.

        The names are ``accuracy``, ``macro_f1``, ``log_loss`` and, per class, ``precision_<class>``,
        ``recall_<class>`` and ``f1_<class>``. Characters MLflow refuses in a metric name are replaced by
        ``_``; two classes that would then share a name raise :class:`ValueError` rather than overwrite
        each other.
        """
        flat: dict[str, float] = {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "log_loss": self.log_loss}
        seen: dict[str, str] = {}
        for name in self.class_names:
            safe = _METRIC_NAME_UNSAFE.sub("_", name)
            if safe in seen:
                raise ValueError(f"classes {seen[safe]!r} and {name!r} both map to metric suffix {safe!r}")
            seen[safe] = name
            scores = self.per_class[name]
            flat[f"precision_{safe}"] = scores.precision
            flat[f"recall_{safe}"] = scores.recall
            flat[f"f1_{safe}"] = scores.f1
        return flat

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (see :meth:`from_dict`)."""
        return {
            "class_names": list(self.class_names),
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "log_loss": self.log_loss,
            "per_class": {name: self.per_class[name].to_dict() for name in self.class_names},
            "confusion_matrix": [list(row) for row in self.confusion_matrix],
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassificationMetrics:
        """The inverse of :meth:`to_dict`; raises :class:`ValueError` when a class's scores are missing."""
        class_names = tuple(str(name) for name in data["class_names"])
        per_class_data = data["per_class"]
        missing = [name for name in class_names if name not in per_class_data]
        if missing:
            raise ValueError(f"metrics: per_class has no entry for classes {missing}")
        return cls(
            class_names=class_names,
            accuracy=float(data["accuracy"]),
            macro_f1=float(data["macro_f1"]),
            log_loss=float(data["log_loss"]),
            per_class={name: ClassMetrics.from_dict(per_class_data[name]) for name in class_names},
            confusion_matrix=[[int(count) for count in row] for row in data["confusion_matrix"]],
            n=int(data["n"]),
        )


@dataclass(frozen=True)
class McNemarResult:
    """The exact McNemar test: ``b`` examples only the candidate got right, ``c`` only the champion did.

    ``p_value`` is two-sided, from the binomial distribution of ``b`` among ``b + c`` discordant pairs.
    """

    b: int
    c: int
    p_value: float

    def to_dict(self) -> dict[str, float | int]:
        """A JSON-serialisable form."""
        return {"b": self.b, "c": self.c, "p_value": self.p_value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> McNemarResult:
        """The inverse of :meth:`to_dict`."""
        return cls(b=int(data["b"]), c=int(data["c"]), p_value=float(data["p_value"]))


@dataclass(frozen=True)
class BootstrapInterval:
    """A paired-bootstrap percentile interval of candidate accuracy minus champion accuracy.

    ``mean_difference`` is the observed difference on the full split; ``low`` and ``high`` bound the
    central ``confidence`` share of the ``samples`` bootstrap differences.
    """

    mean_difference: float
    low: float
    high: float
    samples: int
    confidence: float = 0.95

    def to_dict(self) -> dict[str, float | int]:
        """A JSON-serialisable form."""
        return {
            "mean_difference": self.mean_difference,
            "low": self.low,
            "high": self.high,
            "samples": self.samples,
            "confidence": self.confidence,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BootstrapInterval:
        """The inverse of :meth:`to_dict`."""
        return cls(
            mean_difference=float(data["mean_difference"]),
            low=float(data["low"]),
            high=float(data["high"]),
            samples=int(data["samples"]),
            confidence=float(data.get("confidence", 0.95)),
        )


@dataclass(frozen=True)
class Comparison:
    """The candidate's metrics and, when a champion exists, its metrics and the paired statistics."""

    candidate: ClassificationMetrics
    champion: ClassificationMetrics | None
    mcnemar: McNemarResult | None
    bootstrap: BootstrapInterval | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (see :meth:`from_dict`); absent parts are ``None``."""
        return {
            "candidate": self.candidate.to_dict(),
            "champion": self.champion.to_dict() if self.champion is not None else None,
            "mcnemar": self.mcnemar.to_dict() if self.mcnemar is not None else None,
            "bootstrap": self.bootstrap.to_dict() if self.bootstrap is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Comparison:
        """The inverse of :meth:`to_dict`."""
        champion, mcnemar, bootstrap = data.get("champion"), data.get("mcnemar"), data.get("bootstrap")
        return cls(
            candidate=ClassificationMetrics.from_dict(data["candidate"]),
            champion=ClassificationMetrics.from_dict(champion) if champion is not None else None,
            mcnemar=McNemarResult.from_dict(mcnemar) if mcnemar is not None else None,
            bootstrap=BootstrapInterval.from_dict(bootstrap) if bootstrap is not None else None,
        )


def _labels(y_true: IntArray, k: int) -> NDArray[np.intp]:
    labels = np.asarray(y_true)
    if labels.ndim != 1:
        raise ValueError(f"y_true must be one-dimensional, got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError("y_true is empty: there is nothing to score")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"y_true holds class indices outside 0..{k - 1}")
    return labels.astype(np.intp)


def _probabilities(probabilities: FloatArray, n: int, k: int) -> NDArray[np.float64]:
    array = np.asarray(probabilities, dtype=np.float64)
    if array.shape != (n, k):
        raise ValueError(f"probabilities must have shape (n, k) = ({n}, {k}), got {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError("probabilities must be finite and non-negative")
    sums = array.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise ValueError(
            f"probabilities of example {worst} sum to {sums[worst]:.6f}, not 1 (pass softmax outputs, not logits)"
        )
    return array


def _ratio(numerator: NDArray[np.int64], denominator: NDArray[np.int64]) -> NDArray[np.float64]:
    """``numerator / denominator`` element-wise, 0 where the denominator is 0."""
    result = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=result, where=denominator > 0)
    return result


def classification_metrics(
    y_true: IntArray, probabilities: FloatArray, class_names: Sequence[str]
) -> ClassificationMetrics:
    """Score one model from its class probabilities.

    ``y_true`` holds ``n`` class indices into ``class_names``; ``probabilities`` has shape ``(n, k)`` with
    ``k = len(class_names)`` and rows summing to 1. The prediction is the most probable class (the first
    on ties). Log loss clips probabilities to ``[1e-15, 1]``, so a zero probability on the true class costs
    ``-log(1e-15) ≈ 34.5`` instead of infinity. Raises :class:`ValueError` on inconsistent inputs.
    """
    names = tuple(class_names)
    k = len(names)
    if k < 2:
        raise ValueError("class_names: at least two classes are needed")
    if len(set(names)) != k:
        raise ValueError("class_names: class names must be unique")
    labels = _labels(y_true, k)
    n = labels.size
    probs = _probabilities(probabilities, n, k)

    predicted = np.argmax(probs, axis=1)
    confusion = np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k).astype(np.int64)
    true_positives = np.diag(confusion)
    support = confusion.sum(axis=1)
    precision = _ratio(true_positives, confusion.sum(axis=0))
    recall = _ratio(true_positives, support)
    f1 = np.zeros(k, dtype=np.float64)
    np.divide(2 * precision * recall, precision + recall, out=f1, where=(precision + recall) > 0)

    true_class_probability = np.clip(probs[np.arange(n), labels], LOG_LOSS_EPSILON, 1.0)
    return ClassificationMetrics(
        class_names=names,
        accuracy=float(true_positives.sum() / n),
        macro_f1=float(f1.mean()),
        log_loss=float(-np.mean(np.log(true_class_probability))),
        per_class={
            name: ClassMetrics(
                precision=float(precision[i]), recall=float(recall[i]), f1=float(f1[i]), support=int(support[i])
            )
            for i, name in enumerate(names)
        },
        confusion_matrix=confusion.tolist(),
        n=int(n),
    )


def _paired_correct(candidate_correct: BoolArray, champion_correct: BoolArray) -> tuple[BoolArray, BoolArray]:
    """Both arrays as 1-D booleans of one length; integer 0/1 arrays are accepted too."""
    arrays: list[BoolArray] = []
    for name, values in (("candidate_correct", candidate_correct), ("champion_correct", champion_correct)):
        array = np.asarray(values)
        if array.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
        if array.dtype != np.bool_:
            if not np.issubdtype(array.dtype, np.integer) or not np.all((array == 0) | (array == 1)):
                raise ValueError(f"{name} must hold booleans (or 0/1), got dtype {array.dtype}")
            array = array.astype(np.bool_)
        arrays.append(array)
    if arrays[0].shape != arrays[1].shape:
        raise ValueError(
            f"candidate_correct and champion_correct must have the same shape, got {arrays[0].shape} "
            f"and {arrays[1].shape}"
        )
    return arrays[0], arrays[1]


def mcnemar_exact(candidate_correct: BoolArray, champion_correct: BoolArray) -> McNemarResult:
    """The exact (binomial) McNemar test of two models scored on the same examples.

    ``b`` counts examples the candidate got right and the champion wrong, ``c`` the reverse. Under the
    null hypothesis of equal accuracy ``b ~ Binomial(b + c, 1/2)``; the two-sided p-value is
    ``min(1, 2 * P(X <= min(b, c)))``, and 1 when there are no discordant pairs. Raises
    :class:`ValueError` when the arrays differ in shape.
    """
    from scipy.stats import binom  # scipy.stats takes about half a second to import

    candidate, champion = _paired_correct(candidate_correct, champion_correct)
    b = int(np.count_nonzero(candidate & ~champion))
    c = int(np.count_nonzero(~candidate & champion))
    if b + c == 0:
        return McNemarResult(b=b, c=c, p_value=1.0)
    p_value = min(1.0, 2.0 * float(binom.cdf(min(b, c), b + c, 0.5)))
    return McNemarResult(b=b, c=c, p_value=p_value)


def bootstrap_accuracy_difference(
    candidate_correct: BoolArray,
    champion_correct: BoolArray,
    samples: int,
    seed: int,
    confidence: float = 0.95,
) -> BootstrapInterval:
    """A paired-bootstrap percentile interval of candidate accuracy minus champion accuracy.

    Each bootstrap sample draws ``n`` example indices with replacement and scores both models on the same
    indices. The difference of a sample depends only on how many drawn examples are of each pair type
    (only the candidate right, only the champion right, both or neither), so those counts are drawn
    directly from the equivalent multinomial: the same distribution as resampling indices, in
    ``O(samples)`` memory whatever ``n`` is. The result depends only on the inputs and ``seed``.
    """
    candidate, champion = _paired_correct(candidate_correct, champion_correct)
    n = candidate.size
    if n == 0:
        raise ValueError("cannot bootstrap an empty set of examples")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")

    b = int(np.count_nonzero(candidate & ~champion))
    c = int(np.count_nonzero(~candidate & champion))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [b / n, c / n, (n - b - c) / n], size=samples)
    differences = (counts[:, 0] - counts[:, 1]) / n
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(differences, [alpha, 1.0 - alpha])
    return BootstrapInterval(
        mean_difference=(b - c) / n,
        low=float(low),
        high=float(high),
        samples=samples,
        confidence=confidence,
    )


def compare_models(
    y_true: IntArray,
    candidate_probabilities: FloatArray,
    champion_probabilities: FloatArray | None,
    class_names: Sequence[str],
    config: EvaluateConfig,
) -> Comparison:
    """Score the candidate and, when ``champion_probabilities`` is given, the champion on the same examples.

    With a champion, also the exact McNemar test and a paired-bootstrap interval of the accuracy
    difference (``evaluate.bootstrap_samples`` samples, seeded with ``evaluate.seed``); without one, those
    are ``None``.
    """
    candidate = classification_metrics(y_true, candidate_probabilities, class_names)
    if champion_probabilities is None:
        return Comparison(candidate=candidate, champion=None, mcnemar=None, bootstrap=None)
    champion = classification_metrics(y_true, champion_probabilities, class_names)
    labels = np.asarray(y_true)
    candidate_correct = np.argmax(np.asarray(candidate_probabilities), axis=1) == labels
    champion_correct = np.argmax(np.asarray(champion_probabilities), axis=1) == labels
    bootstrap = bootstrap_accuracy_difference(
        candidate_correct, champion_correct, samples=config.bootstrap_samples, seed=config.seed
    )
    return Comparison(
        candidate=candidate,
        champion=champion,
        mcnemar=mcnemar_exact(candidate_correct, champion_correct),
        bootstrap=bootstrap,
    )
