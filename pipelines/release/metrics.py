"""Metrics: score a candidate on the test split and compare it, example by example, with the champion.

Pure functions over numpy arrays (no TensorFlow, no MLflow), so the evaluate step, the CLI and the
tests all compute the same numbers:

* :func:`classification_metrics` – accuracy, macro F1, log loss, per-class precision/recall/F1/support
  and the confusion matrix of one model, from its class probabilities (scikit-learn's metrics);
* :func:`mcnemar_exact` – the exact McNemar test on the paired correctness of two models (SciPy's binomial test);
* :func:`bootstrap_accuracy_difference` – a seeded paired-bootstrap interval of the accuracy difference;
* :func:`compare_models` – all of the above for a candidate and, when there is one, the champion.

Classes are always indexed ``0..k-1`` in the order of ``class_names``, also when a class is absent from
the test split, so metric names and confusion matrices line up from run to run.

The results are frozen pydantic models: ``model_dump(mode="json")`` gives the documents logged to MLflow
(``evaluation/comparison.json``) and ``model_validate`` reads them back, raising :class:`ValueError`
(pydantic's ``ValidationError``) on a malformed document.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, model_validator

from pipelines.config import EvaluateConfig

LOG_LOSS_EPSILON = 1e-15
"""Probabilities are clipped to ``[LOG_LOSS_EPSILON, 1]`` so a zero probability gives a finite log loss."""

PROBABILITY_SUM_TOLERANCE = 1e-3
"""How far a row of probabilities may sum from 1 (float32 softmax); logits are refused, not silently scored."""

_METRIC_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/ ]")

BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.integer[Any]]
FloatArray = NDArray[np.floating[Any]]


class ClassMetrics(BaseModel):
    """Precision, recall and F1 of one class, and its support (examples of that class in the split)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: float
    recall: float
    f1: float
    support: int


class ClassificationMetrics(BaseModel):
    """The scores of one model on one labelled split.

    ``per_class`` is keyed by class name, in the order of ``class_names``, with exactly one entry per class.
    ``confusion_matrix[i][j]`` counts examples of true class ``i`` predicted as class ``j``. Precision,
    recall and F1 of a class with no predicted (or no true) examples are 0, and macro F1 averages over
    all ``k`` classes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    class_names: tuple[str, ...]
    accuracy: float
    macro_f1: float
    log_loss: float
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]
    n: int

    @model_validator(mode="after")
    def _check_per_class(self) -> ClassificationMetrics:
        missing = [name for name in self.class_names if name not in self.per_class]
        if missing:
            raise ValueError(f"metrics: per_class has no entry for classes {missing}")
        unknown = [name for name in self.per_class if name not in self.class_names]
        if unknown:
            raise ValueError(f"metrics: per_class has entries for unknown classes {unknown}")
        return self

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


class McNemarResult(BaseModel):
    """The exact McNemar test: ``b`` examples only the candidate got right, ``c`` only the champion did.

    ``p_value`` is two-sided, from the binomial distribution of ``b`` among ``b + c`` discordant pairs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    b: int
    c: int
    p_value: float


class BootstrapInterval(BaseModel):
    """A paired-bootstrap percentile interval of candidate accuracy minus champion accuracy.

    ``mean_difference`` is the observed difference on the full split; ``low`` and ``high`` bound the
    central ``confidence`` share of the ``samples`` bootstrap differences.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mean_difference: float
    low: float
    high: float
    samples: int
    confidence: float = 0.95


class Comparison(BaseModel):
    """The candidate's metrics and, when a champion exists, its metrics and the paired statistics.

    Absent parts are ``None`` (``null`` in JSON, and may be left out of a document).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    candidate: ClassificationMetrics
    champion: ClassificationMetrics | None = None
    mcnemar: McNemarResult | None = None
    bootstrap: BootstrapInterval | None = None


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


def classification_metrics(
    y_true: IntArray, probabilities: FloatArray, class_names: Sequence[str]
) -> ClassificationMetrics:
    """Score one model from its class probabilities, with scikit-learn's metrics.

    ``y_true`` holds ``n`` class indices into ``class_names``; ``probabilities`` has shape ``(n, k)`` with
    ``k = len(class_names)`` and rows summing to 1. The prediction is the most probable class (the first
    on ties). Log loss clips probabilities to ``[1e-15, 1]``, so a zero probability on the true class costs
    ``-log(1e-15) ≈ 34.5`` instead of infinity. Raises :class:`ValueError` on inconsistent inputs.
    """
    from sklearn import metrics as sklearn_metrics  # sklearn.metrics takes about a second to import

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
    indices = range(k)
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        labels, predicted, labels=indices, zero_division=0
    )
    macro_f1 = sklearn_metrics.f1_score(labels, predicted, average="macro", labels=indices, zero_division=0)
    confusion = sklearn_metrics.confusion_matrix(labels, predicted, labels=indices)
    with warnings.catch_warnings():
        # Rows were checked against PROBABILITY_SUM_TOLERANCE above; scikit-learn's far tighter check
        # would warn on every float32 softmax output.
        warnings.filterwarnings("ignore", message="The y_prob values do not sum to one", category=UserWarning)
        loss = sklearn_metrics.log_loss(labels, np.clip(probs, LOG_LOSS_EPSILON, 1.0), labels=indices)
    return ClassificationMetrics(
        class_names=names,
        accuracy=float(sklearn_metrics.accuracy_score(labels, predicted)),
        macro_f1=float(macro_f1),
        log_loss=float(loss),
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
    null hypothesis of equal accuracy ``b ~ Binomial(b + c, 1/2)``; the p-value is that of SciPy's
    two-sided ``binomtest(b, b + c, 0.5)`` (equal to ``min(1, 2 * P(X <= min(b, c)))``), and 1 when there
    are no discordant pairs. Raises :class:`ValueError` when the arrays differ in shape.
    """
    from scipy.stats import binomtest  # scipy.stats takes about half a second to import

    candidate, champion = _paired_correct(candidate_correct, champion_correct)
    b = int(np.count_nonzero(candidate & ~champion))
    c = int(np.count_nonzero(~candidate & champion))
    if b + c == 0:
        return McNemarResult(b=b, c=c, p_value=1.0)
    return McNemarResult(b=b, c=c, p_value=float(binomtest(b, b + c, 0.5).pvalue))


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
