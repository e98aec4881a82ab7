"""Gate: decide from the metrics whether a candidate may be registered, and say why.

Two kinds of thresholds, as in TFX's evaluator (``gate`` in params.yaml):

* value thresholds, always: ``accuracy >= min_accuracy`` and ``macro_f1 >= min_macro_f1``;
* change thresholds, against the champion when there is one: the primary metric may not drop by more
  than ``max_primary_drop``, and no class's recall by more than ``max_class_recall_drop``.

The first model (no champion) passes on value thresholds alone, and its verdict says so. A champion
scored on a different set of classes cannot be compared: the verdict fails on a ``class_set`` check.

Pure functions over :class:`~pipelines.release.metrics.ClassificationMetrics`: the verdict is a frozen
pydantic model that round-trips through JSON (``model_dump(mode="json")``, ``model_validate``), becomes
MLflow run tags, and prints as a table for the CLI and logs.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.config import GateConfig
from pipelines.release.metrics import ClassificationMetrics

FLOAT_TOLERANCE = 1e-9
"""Slack in every comparison, so a value exactly on its threshold is not failed by float rounding."""

NO_CHAMPION_NOTE = "none: first model, value thresholds only"
"""The verdict's note when there is no champion to compare with."""

CLASS_SET_CHECK = "class_set"


class Check(BaseModel):
    """One threshold: the value measured, the threshold it had to reach, the champion's value if any.

    Every check passes when ``value >= threshold`` (within :data:`FLOAT_TOLERANCE`); ``description``
    says in words what was compared and, on failure, what failed.
    """

    # Strict, like Verdict: a stored "value": "0.9" is refused, not coerced.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    name: str
    passed: bool
    value: float
    threshold: float
    baseline: float | None = None
    description: str


class Verdict(BaseModel):
    """The gate's decision: it passed when every check passed.

    ``note`` names the baseline: :data:`NO_CHAMPION_NOTE` for a first model, else the champion.
    Validation refuses a verdict without checks, with two checks of one name, or whose ``passed``
    disagrees with its checks, so a verdict read back from JSON cannot claim a pass its checks do not
    support.
    """

    # Strict: a stored "passed": "yes" is refused, not coerced to True.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    passed: bool
    has_champion: bool
    note: str
    checks: tuple[Check, ...] = Field(strict=False)  # a JSON array is a list; each Check stays strict

    @model_validator(mode="after")
    def _check_consistency(self) -> Verdict:
        if not self.checks:
            raise ValueError("a verdict needs at least one check")
        names = [check.name for check in self.checks]
        if len(set(names)) != len(names):
            raise ValueError(f"verdict check names must be unique, got {names}")
        if self.passed != all(check.passed for check in self.checks):
            raise ValueError(f"verdict says passed={self.passed} but its checks say otherwise")
        return self

    @property
    def failing_checks(self) -> tuple[Check, ...]:
        """The checks that failed, in order."""
        return tuple(check for check in self.checks if not check.passed)

    def as_tags(self) -> dict[str, str]:
        """MLflow run tags: ``gate`` (``passed``/``failed``), ``gate.baseline``, and ``gate.<check>``.

        A check's tag reads ``pass 0.9120/0.8500`` (value/threshold), followed by
        ``(baseline 0.9200)`` for a change threshold.
        """
        tags = {
            "gate": "passed" if self.passed else "failed",
            "gate.baseline": self.note,
        }
        for check in self.checks:
            text = f"{_result(check)} {_number_text(check.value)}/{_number_text(check.threshold)}"
            if check.baseline is not None:
                text += f" (baseline {_number_text(check.baseline)})"
            tags[f"gate.{check.name}"] = text
        return tags

    def format_table(self) -> str:
        """A fixed-width table of the checks, the reasons of failing checks, and a final summary line.

        The last line is ``GATE PASSED`` or ``GATE FAILED: <failing check names>``.
        """
        header = ("check", "value", "threshold", "baseline", "result")
        rows = [
            (
                check.name,
                _number_text(check.value),
                _number_text(check.threshold),
                "-" if check.baseline is None else _number_text(check.baseline),
                _result(check),
            )
            for check in self.checks
        ]
        widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]

        def line(cells: tuple[str, ...]) -> str:
            first, *numbers, last = cells
            parts = [first.ljust(widths[0])]
            parts += [cell.rjust(width) for cell, width in zip(numbers, widths[1:-1], strict=True)]
            parts.append(last.ljust(widths[-1]))
            return " | ".join(parts).rstrip()

        lines = [line(header), "-+-".join("-" * width for width in widths)]
        lines += [line(row) for row in rows]
        lines.append(f"baseline: {self.note}")
        lines += [f"{check.name}: {check.description}" for check in self.failing_checks]
        if self.passed:
            lines.append("GATE PASSED")
        else:
            lines.append("GATE FAILED: " + ", ".join(check.name for check in self.failing_checks))
        return "\n".join(lines)


def _number_text(value: float) -> str:
    return f"{value:.4f}"


def _result(check: Check) -> str:
    return "pass" if check.passed else "fail"


def _at_least(value: float, threshold: float) -> bool:
    """``value >= threshold`` within :data:`FLOAT_TOLERANCE`; NaN never passes."""
    return not math.isnan(value) and value >= threshold - FLOAT_TOLERANCE


def _value_check(metric: str, value: float, minimum: float) -> Check:
    passed = _at_least(value, minimum)
    relation = ">=" if passed else "<"
    return Check(
        name=f"min_{metric}",
        passed=passed,
        value=value,
        threshold=minimum,
        baseline=None,
        description=f"{metric} {value:.4f} {relation} minimum {minimum:.4f}",
    )


def _primary_value(metrics: ClassificationMetrics, metric: str) -> float:
    return {"accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1}[metric]


def _primary_drop_check(metric: str, value: float, champion: float, max_drop: float) -> Check:
    threshold = champion - max_drop
    passed = _at_least(value, threshold)
    change = value - champion
    if passed:
        description = f"{metric} {value:.4f} vs champion {champion:.4f} ({change:+.4f}), allowed drop {max_drop:.4f}"
    else:
        description = (
            f"{metric} dropped from champion {champion:.4f} to {value:.4f} ({change:+.4f}), "
            f"more than the allowed {max_drop:.4f}"
        )
    return Check(
        name=f"max_{metric}_drop",
        passed=passed,
        value=value,
        threshold=threshold,
        baseline=champion,
        description=description,
    )


def _class_recall_check(candidate: ClassificationMetrics, champion: ClassificationMetrics, max_drop: float) -> Check:
    """One check over all classes: it reports the class with the largest drop and names every failing one."""
    drops = [
        (name, champion.per_class[name].recall, candidate.per_class[name].recall) for name in candidate.class_names
    ]
    worst_name, worst_baseline, worst_value = max(drops, key=lambda item: item[1] - item[2])
    failing = [(name, base, value) for name, base, value in drops if not _at_least(value, base - max_drop)]
    if failing:
        listed = ", ".join(f"'{name}' {base:.4f} -> {value:.4f} ({value - base:+.4f})" for name, base, value in failing)
        noun = "class" if len(failing) == 1 else "classes"
        description = f"recall dropped more than {max_drop:.4f} for {len(failing)} {noun}: {listed}"
    else:
        description = (
            f"no class recall dropped more than {max_drop:.4f} (largest change: '{worst_name}' "
            f"{worst_baseline:.4f} -> {worst_value:.4f}, {worst_value - worst_baseline:+.4f})"
        )
    return Check(
        name="max_class_recall_drop",
        passed=not failing,
        value=worst_value,
        threshold=worst_baseline - max_drop,
        baseline=worst_baseline,
        description=description,
    )


def _class_set_check(candidate: ClassificationMetrics, champion: ClassificationMetrics) -> Check:
    """The share of classes the two models have in common (intersection over union) must be 1."""
    candidate_set, champion_set = set(candidate.class_names), set(champion.class_names)
    only_candidate = sorted(candidate_set - champion_set)
    only_champion = sorted(champion_set - candidate_set)
    shared = len(candidate_set & champion_set) / len(candidate_set | champion_set)
    if only_candidate or only_champion:
        description = (
            f"candidate and champion were scored on different classes (only candidate: {only_candidate}, "
            f"only champion: {only_champion}); they cannot be compared, change thresholds were not evaluated"
        )
    else:
        description = f"candidate and champion share the same {len(candidate_set)} classes"
    return Check(
        name=CLASS_SET_CHECK,
        passed=not (only_candidate or only_champion),
        value=shared,
        threshold=1.0,
        baseline=None,
        description=description,
    )


def evaluate_gate(
    candidate: ClassificationMetrics,
    champion: ClassificationMetrics | None,
    config: GateConfig,
    *,
    champion_label: str | None = None,
) -> Verdict:
    """The gate's verdict on ``candidate``, against ``champion`` when there is one.

    Value thresholds always apply. With a champion, the class sets must match (else the verdict fails
    on ``class_set`` and no change threshold is evaluated), then the primary metric may not drop by
    more than ``max_primary_drop`` and no class recall by more than ``max_class_recall_drop``; every
    class over the limit is named. Without a champion the verdict rests on value thresholds alone and
    its note is :data:`NO_CHAMPION_NOTE`. ``champion_label`` (e.g. ``"version 3"``) goes into the note.
    """
    checks = [
        _value_check("accuracy", candidate.accuracy, config.min_accuracy),
        _value_check("macro_f1", candidate.macro_f1, config.min_macro_f1),
    ]
    if champion is None:
        note = NO_CHAMPION_NOTE
    else:
        note = "champion" + (f" ({champion_label})" if champion_label else "") + ", value and change thresholds"
        class_set = _class_set_check(candidate, champion)
        checks.append(class_set)
        if class_set.passed:
            primary = config.primary_metric
            value, baseline = _primary_value(candidate, primary), _primary_value(champion, primary)
            checks.append(_primary_drop_check(primary, value, baseline, config.max_primary_drop))
            checks.append(_class_recall_check(candidate, champion, config.max_class_recall_drop))
    return Verdict(
        passed=all(check.passed for check in checks),
        checks=tuple(checks),
        has_champion=champion is not None,
        note=note,
    )
