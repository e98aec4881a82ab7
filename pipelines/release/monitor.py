"""Monitor: what production served, against what the champion was trained and tested on; when to retrain.

:func:`monitor` reads the last ``monitor.window_hours`` of the prediction log
(:mod:`pipelines.release.serving.prediction_log`) and compares:

* **inputs** – the served images' pixel mean and std (pooled over images, as :mod:`pipelines.data.profile`
  pools a class) with the champion's training-data profile (``data/profile.json`` logged with its run, else
  ``validate.reference_profile``): drift when either differs by more than ``monitor.drift_tolerance``;
* **predictions** – the class distribution the champion served with its predictions on the test split
  (column sums of the confusion matrix its evaluation logged), by Pearson's chi-square test
  (``scipy.stats.chisquare``, add-half smoothing of the expected counts): a class shift when
  p < ``monitor.class_p_value`` and the total variation distance is at least ``monitor.min_class_distance``;
* **live accuracy** – the champion's predictions that received a feedback label: below
  ``monitor.min_live_accuracy`` (with at least ``monitor.min_feedback`` labels) asks for a retrain.

Each run is an MLflow run in the ``monitor.experiment`` experiment (metrics, ``monitor/report.json``, the
figure ``monitor/report.png``), tagged with the champion's name, version and run, and the version gets the
tags ``last_monitor_run`` and ``last_monitor_verdict``. ``retrain`` is true when a threshold is crossed
with enough data and no retrain was requested within ``monitor.cooldown_hours``: the ``monitor`` DAG then
updates the ``incoming_images`` asset the ``retrain`` DAG is scheduled on. The checks themselves, pure
functions of the logged records, are :mod:`pipelines.release.drift_checks`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pipelines.data.profile import ClassProfile, read_profile
from pipelines.project import Project
from pipelines.release.drift_checks import (
    AccuracyCheck,
    ClassCheck,
    PixelCheck,
    check_accuracy,
    check_classes,
    check_pixels,
)

REPORT_ARTIFACT = "monitor/report.json"
FIGURE_ARTIFACT = "monitor/report.png"
RETRAIN_TAG = "retrain_requested"


@dataclass(frozen=True)
class MonitorReport:
    """One monitoring run: the window, the three checks, the verdict and the MLflow run holding it."""

    model: str
    champion_version: str | None
    window_start: str
    window_end: str
    served_images: int = 0
    champion_images: int = 0
    pixels: PixelCheck = field(default_factory=PixelCheck)
    classes: ClassCheck = field(default_factory=ClassCheck)
    accuracy: AccuracyCheck = field(default_factory=AccuracyCheck)
    drift_detected: bool = False
    retrain: bool = False
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    run_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The whole report as plain data (``monitor/report.json``)."""
        return asdict(self)

    def summary(self) -> str:
        """A few readable lines."""
        if self.retrain:
            verdict = "drift: retrain requested"
        elif self.drift_detected:
            verdict = "drift, but no retrain requested (see the notes)"
        else:
            verdict = "no drift"
        lines = [
            f"{self.model} version {self.champion_version or '(no champion)'}: {self.served_images} images served "
            f"from {self.window_start} to {self.window_end}; {verdict}"
        ]
        lines += [f"  {reason}" for reason in self.reasons]
        lines += [f"  note: {note}" for note in self.notes]
        if self.run_id:
            lines.append(f"  MLflow run {self.run_id}")
        return "\n".join(lines)


def _reference_profile(project: Project, client: Any, run_id: str, notes: list[str]) -> dict[str, ClassProfile]:
    """The champion's training-data profile: logged with its run, else the installed reference profile."""
    import tempfile
    from pathlib import Path

    from pipelines.errors import PipelineError
    from pipelines.release.promote import PROFILE_ARTIFACT

    with tempfile.TemporaryDirectory() as folder:
        try:
            return read_profile(Path(client.download_artifacts(run_id, PROFILE_ARTIFACT, folder)))
        except Exception:  # no profile logged with this run: fall back to the installed reference
            pass
    fallback = project.path(project.config.validation.reference_profile)
    try:
        profile = read_profile(fallback)
    except PipelineError:
        notes.append(f"no training profile logged with run {run_id} nor at {fallback}: pixel drift not checked")
        return {}
    notes.append(f"run {run_id} logged no data profile: compared with {fallback}")
    return profile


def _test_prediction_counts(run_id: str, classes: Sequence[str], notes: list[str]) -> dict[str, int]:
    """How many test images the champion predicted as each class (its evaluation's confusion matrix)."""
    from pipelines.errors import PipelineError
    from pipelines.release.evaluate import load_comparison

    try:
        metrics = load_comparison(run_id).candidate
    except PipelineError as error:
        notes.append(f"no evaluation of run {run_id}: class distribution not checked ({error})")
        return {}
    columns = [sum(row[index] for row in metrics.confusion_matrix) for index in range(len(metrics.class_names))]
    counts = dict(zip(metrics.class_names, columns, strict=True))
    return {name: counts.get(name, 0) for name in classes} if set(classes) <= set(counts) else counts


def _recent_retrain_request(client: Any, experiment_id: str, since: datetime) -> str | None:
    """The id of a monitoring run that requested a retrain after ``since``, if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{RETRAIN_TAG} = 'true' and attributes.start_time >= {int(since.timestamp() * 1000)}",
        max_results=1,
    )
    return str(runs[0].info.run_id) if runs else None


def monitor(project: Project, now: datetime | None = None) -> MonitorReport:
    """Compare the last window of served data with the champion's training and test data; log the report."""
    from mlflow.tracking import MlflowClient

    from pipelines.release.evaluate import champion_version
    from pipelines.release.serving.prediction_log import read_records
    from pipelines.tracking import connect

    settings = project.config.monitor
    now = now or datetime.now(UTC)
    since = now - timedelta(hours=settings.window_hours)
    name = project.config.registry.model_name
    connect(project)
    client = MlflowClient()
    champion = champion_version(name)
    window = read_records(project, since, settings.max_records)
    notes: list[str] = []
    if window.malformed:
        notes.append(f"{window.malformed} unreadable log lines skipped")
    if window.truncated:
        notes.append(f"more than monitor.max_records={settings.max_records} records: the newest were read")
    empty = MonitorReport(name, None, since.isoformat(timespec="seconds"), now.isoformat(timespec="seconds"))
    if champion is None:
        return replace(empty, notes=[*notes, f"{name} has no champion: nothing to monitor"])
    version, run_id = str(champion.version), str(champion.run_id)
    predictions = [record for record in window.records if record.get("kind") == "prediction"]
    feedback = [record for record in window.records if record.get("kind") == "feedback"]
    served = [image for record in predictions for image in record.get("images", [])]
    by_champion = [record for record in predictions if str(record.get("model_version")) == version]
    champion_images = [image for record in by_champion for image in record.get("images", [])]

    height, width = project.config.dataset.image_size
    pixels = check_pixels(
        served,
        _reference_profile(project, client, run_id, notes),
        height * width * project.config.dataset.channels,
        settings.drift_tolerance,
        settings.min_images,
    )
    expected = _test_prediction_counts(run_id, project.config.dataset.classes, notes)
    classes = (
        check_classes(
            [str(image["class"]) for image in champion_images],
            expected,
            settings.class_p_value,
            settings.min_class_distance,
            settings.min_images,
        )
        if expected
        else ClassCheck()
    )
    predicted = {
        (str(record["request_id"]), index): str(image["class"])
        for record in by_champion
        for index, image in enumerate(record.get("images", []))
    }
    accuracy = check_accuracy(predicted, feedback, settings.min_live_accuracy, settings.min_feedback)

    reasons = []
    if pixels.drift:
        reasons.append(
            f"input drift: served pixel mean {pixels.served_mean:.3f} / std {pixels.served_std:.3f} vs training "
            f"{pixels.reference_mean:.3f} / {pixels.reference_std:.3f} "
            f"(monitor.drift_tolerance {settings.drift_tolerance:g})"
        )
    if classes.shifted:
        reasons.append(
            f"class shift: chi-square p={classes.p_value:.3g} < {settings.class_p_value:g}, total variation distance "
            f"{classes.distance:.3f} >= {settings.min_class_distance:g}"
        )
    if accuracy.below:
        reasons.append(
            f"live accuracy {accuracy.accuracy:.3f} on {accuracy.labelled} labelled images < "
            f"monitor.min_live_accuracy {settings.min_live_accuracy:g}"
        )
    if len(served) < settings.min_images:
        notes.append(f"{len(served)} images served in the window, fewer than monitor.min_images={settings.min_images}")
    drift = bool(reasons)
    retrain = drift
    experiment_id = connect(project, settings.experiment)
    if drift:
        previous = _recent_retrain_request(client, experiment_id, now - timedelta(hours=settings.cooldown_hours))
        if previous is not None:
            retrain = False
            notes.append(
                f"run {previous} requested a retrain within monitor.cooldown_hours={settings.cooldown_hours:g}"
            )
    report = replace(
        empty,
        champion_version=version,
        served_images=len(served),
        champion_images=len(champion_images),
        pixels=pixels,
        classes=classes,
        accuracy=accuracy,
        drift_detected=drift,
        retrain=retrain,
        reasons=reasons,
        notes=notes,
    )
    return replace(report, run_id=_log_report(project, client, report, run_id, served))


def _metrics(report: MonitorReport) -> dict[str, float]:
    values: dict[str, float | None] = {
        "served_images": report.served_images,
        "champion_images": report.champion_images,
        "pixel_mean": report.pixels.served_mean,
        "pixel_std": report.pixels.served_std,
        "reference_pixel_mean": report.pixels.reference_mean,
        "reference_pixel_std": report.pixels.reference_std,
        "pixel_mean_difference": report.pixels.mean_difference,
        "pixel_std_difference": report.pixels.std_difference,
        "class_chi_square": report.classes.chi_square,
        "class_p_value": report.classes.p_value,
        "class_distance": report.classes.distance,
        "feedback_labels": report.accuracy.labelled,
        "live_accuracy": report.accuracy.accuracy,
        "drift_detected": float(report.drift_detected),
        "retrain_requested": float(report.retrain),
    }
    return {key: float(value) for key, value in values.items() if value is not None and math.isfinite(float(value))}


def _log_report(
    project: Project, client: Any, report: MonitorReport, champion_run: str, served: Sequence[Mapping[str, Any]]
) -> str:
    """Log ``report`` as an MLflow run linked to the champion version; return the run id."""
    import mlflow

    from pipelines.tracking import airflow_context_tags

    settings = project.config.monitor
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    verdict = "retrain" if report.retrain else ("drift" if report.drift_detected else "ok")
    with mlflow.start_run(run_name=f"monitor-v{report.champion_version}-{stamp}") as run:
        mlflow.set_tags(
            {
                "model_name": report.model,
                "model_version": str(report.champion_version),
                "champion_run_id": champion_run,
                "verdict": verdict,
                RETRAIN_TAG: str(report.retrain).lower(),
                **airflow_context_tags(),
            }
        )
        mlflow.log_params({key: value for key, value in settings.model_dump().items() if key != "experiment"})
        mlflow.log_metrics(_metrics(report))
        mlflow.log_dict(report.as_dict(), REPORT_ARTIFACT)
        mlflow.log_figure(_figure(report, served), FIGURE_ARTIFACT)
    client.set_model_version_tag(report.model, str(report.champion_version), "last_monitor_run", run.info.run_id)
    client.set_model_version_tag(report.model, str(report.champion_version), "last_monitor_verdict", verdict)
    return str(run.info.run_id)


def _figure(report: MonitorReport, served: Sequence[Mapping[str, Any]]) -> Any:
    """Two panels: served class shares against the test predictions', served image means against training."""
    from pipelines.training.reports import headless_pyplot

    plt = headless_pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    classes = list(report.classes.expected_share)
    if classes:
        total = max(sum(report.classes.served.values()), 1)
        positions = range(len(classes))
        left.bar(
            [p - 0.2 for p in positions],
            [report.classes.served.get(c, 0) / total for c in classes],
            0.4,
            label="served",
        )
        left.bar(
            [p + 0.2 for p in positions],
            [report.classes.expected_share[c] for c in classes],
            0.4,
            label="test predictions",
        )
        left.set_xticks(list(positions), classes)
        left.legend()
    p_value = report.classes.p_value
    left.set_title(f"class shares (chi-square p={p_value:.3g})" if p_value is not None else "class shares")
    means = [float(image["mean"]) for image in served]
    if means:
        right.hist(means, bins=30, range=(0.0, 1.0), alpha=0.7, label="served image means")
    if report.pixels.reference_mean is not None and report.pixels.reference_std is not None:
        right.axvline(report.pixels.reference_mean, color="black", label="training mean")
        for side in (-1, 1):
            right.axvline(
                report.pixels.reference_mean + side * report.pixels.reference_std, color="grey", linestyle="--"
            )
    accuracy = report.accuracy.accuracy
    right.set_title(
        f"pixel means (live accuracy {accuracy:.3f} on {report.accuracy.labelled})"
        if accuracy is not None
        else "pixel means"
    )
    right.set_xlabel("pixel value")
    right.legend()
    figure.suptitle(f"{report.model} version {report.champion_version}: {report.window_start} .. {report.window_end}")
    figure.tight_layout()
    return figure
