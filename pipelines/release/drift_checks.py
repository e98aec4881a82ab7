"""The monitor's three checks of served data, pure functions of what the prediction log recorded.

* :func:`check_pixels` – the served images' pooled pixel mean and std against the champion's training
  profile (:func:`pooled`): input drift when either differs by more than a tolerance;
* :func:`check_classes` – the served class counts against the champion's test prediction shares, by
  Pearson's chi-square test and the total variation distance;
* :func:`check_accuracy` – the champion's predictions against the labels fed back for them.

Each needs a minimum of data to give a verdict. :mod:`pipelines.release.monitor` reads the log, runs them
and logs the report.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.data.profile import ClassProfile, ImageStats, compute_profile


@dataclass(frozen=True)
class PixelCheck:
    """Served pixel statistics against the champion's training profile."""

    served_mean: float | None = None
    served_std: float | None = None
    reference_mean: float | None = None
    reference_std: float | None = None
    mean_difference: float | None = None
    std_difference: float | None = None
    drift: bool = False
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class ClassCheck:
    """The served class distribution against the champion's test predictions (chi-square test)."""

    served: dict[str, int] = field(default_factory=dict)
    expected_share: dict[str, float] = field(default_factory=dict)
    chi_square: float | None = None
    p_value: float | None = None
    distance: float | None = None
    shifted: bool = False


@dataclass(frozen=True)
class AccuracyCheck:
    """The champion's accuracy on the served images that received a feedback label."""

    labelled: int = 0
    correct: int = 0
    accuracy: float | None = None
    below: bool = False


def pooled(profile: Mapping[str, ClassProfile]) -> tuple[float, float] | None:
    """Mean and std of all pixel values of a per-class profile (images of one size: weighted by image count)."""
    total = sum(item.count for item in profile.values())
    if total == 0:
        return None
    mean = sum(item.count * item.mean for item in profile.values()) / total
    second = sum(item.count * (item.std**2 + item.mean**2) for item in profile.values()) / total
    return mean, math.sqrt(max(second - mean**2, 0.0))


def served_profile(images: Sequence[Mapping[str, Any]], values: int, by_class: bool) -> dict[str, ClassProfile]:
    """The profile of served images (pooled as ``all``, or per predicted class), from their logged mean and std."""
    stats = [
        ImageStats(
            path="",
            label=str(image["class"]) if by_class else "all",
            split="served",
            sha256=str(image.get("sha256", "")),
            decodes=True,
            mean=float(image["mean"]),
            std=float(image["std"]),
            values=values,
        )
        for image in images
    ]
    return compute_profile(stats)


def check_pixels(
    images: Sequence[Mapping[str, Any]],
    reference: Mapping[str, ClassProfile],
    values: int,
    tolerance: float,
    minimum: int,
) -> PixelCheck:
    """Served pixel mean and std against the pooled training profile; drift beyond ``tolerance``."""
    served = served_profile(images, values, by_class=False).get("all")
    expected = pooled(reference)
    if served is None or expected is None:
        return PixelCheck()
    mean_difference, std_difference = served.mean - expected[0], served.std - expected[1]
    per_class = {}
    for label, item in served_profile(images, values, by_class=True).items():
        if label in reference:
            per_class[label] = {
                "served_images": float(item.count),
                "mean_difference": item.mean - reference[label].mean,
                "std_difference": item.std - reference[label].std,
            }
    return PixelCheck(
        served_mean=served.mean,
        served_std=served.std,
        reference_mean=expected[0],
        reference_std=expected[1],
        mean_difference=mean_difference,
        std_difference=std_difference,
        drift=len(images) >= minimum and max(abs(mean_difference), abs(std_difference)) > tolerance,
        per_class=per_class,
    )


def check_classes(
    served: Sequence[str], expected_counts: Mapping[str, int], p_value: float, distance: float, minimum: int
) -> ClassCheck:
    """Pearson's chi-square test of the served class counts against the champion's test prediction shares."""
    from scipy.stats import chisquare

    classes = list(expected_counts)
    counts = Counter(served)
    observed = [counts.get(name, 0) for name in classes]
    total = sum(observed)
    smoothed = [expected_counts[name] + 0.5 for name in classes]
    shares = [value / sum(smoothed) for value in smoothed]
    if total == 0:
        return ClassCheck(
            served=dict(zip(classes, observed, strict=True)), expected_share=dict(zip(classes, shares, strict=True))
        )
    statistic, p = chisquare(observed, f_exp=[share * total for share in shares])
    tvd = 0.5 * sum(abs(count / total - share) for count, share in zip(observed, shares, strict=True))
    return ClassCheck(
        served=dict(zip(classes, observed, strict=True)),
        expected_share=dict(zip(classes, shares, strict=True)),
        chi_square=float(statistic),
        p_value=float(p),
        distance=float(tvd),
        shifted=total >= minimum and float(p) < p_value and tvd >= distance,
    )


def check_accuracy(
    predictions: Mapping[tuple[str, int], str], feedback: Sequence[Mapping[str, Any]], threshold: float, minimum: int
) -> AccuracyCheck:
    """Accuracy of ``predictions`` ((request id, image index) -> class) on the fed-back labels (last label wins)."""
    labels: dict[tuple[str, int], str] = {}
    for record in feedback:
        labels[(str(record["request_id"]), int(record["image_index"]))] = str(record["label"])
    matched = [(predictions[key], label) for key, label in labels.items() if key in predictions]
    if not matched:
        return AccuracyCheck()
    correct = sum(1 for predicted, label in matched if predicted == label)
    accuracy = correct / len(matched)
    return AccuracyCheck(len(matched), correct, accuracy, below=len(matched) >= minimum and accuracy < threshold)
