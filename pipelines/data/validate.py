"""Validate the ingested dataset with a Great Expectations suite before anything trains on it.

The manifest (``data/<name>/manifest.csv``) and the images it lists are turned into three small tables,
each validated by its own expectation suite; one Checkpoint runs all three and renders one Data Docs site
under ``validate.report_dir``. The images are read from the dataset's pack ``images.zip`` (or the loose
files of a dataset versioned before packs: :mod:`pipelines.data.packs`) and measured on every core for a
large dataset (:func:`~pipelines.data.profile.measure_images`); a pack that cannot be read (truncated,
corrupt, a member named with ``..``) fails every image it holds and is named first in the failure.

``images`` (one row per manifest row, indexed by ``path``)
    the table is not empty; every image decodes (Pillow ``load()``, size and pixel limits of ``ingest``);
    the image's sha256 matches the manifest; labels are configured classes and splits are train/val/test;
    the decoded height, width and channels match ``dataset``; sha256 is unique, so no image is duplicated
    and none leaks across splits.
``split_counts`` (one row per configured class x split, indexed by ``label``, ``split``)
    every combination, including missing ones counted as 0, holds at least
    ``validate.min_images_per_class_per_split`` images.
``classes`` (one row per configured class, indexed by ``label``)
    largest class / this class <= ``validate.max_class_imbalance_ratio``; and, when the reference profile
    (``validate.reference_profile``) exists, the class's pixel mean and std each within
    ``validate.drift_tolerance`` of it. Without a reference, drift is not checked and the report says so.

On success the per-class pixel profile is written to ``data/<name>/profile.json`` (so it is versioned
with the data it describes) and a :class:`ValidationReport` is returned; on failure a
:class:`~pipelines.errors.DataValidationError` lists each failed expectation with up to ten offending
files and the path of the Data Docs page. The intermediate tables are kept as Parquet files next to the
Data Docs (``<report_dir>/tables/``); nothing but ``profile.json`` is written under ``data/``.

Great Expectations and pandas are imported inside :func:`validate_dataset` so importing this module stays
cheap (DAG parsing, the CLI's ``--help``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import SPLITS, Config
from pipelines.data.manifest import read_manifest
from pipelines.data.packs import PACK_KINDS, DatasetReader, DatasetReadError
from pipelines.data.profile import (
    ClassProfile,
    ImageStats,
    compute_profile,
    measure_images,
    profile_path,
    read_profile,
    write_profile,
)
from pipelines.errors import DataValidationError, PipelineError
from pipelines.project import Project

MAX_LISTED = 10
"""How many offending files a failure message lists per failed expectation."""

_SITE_NAME = "local_site"
_TABLES_DIR = "tables"
_IMAGES, _SPLIT_COUNTS, _CLASSES = "images", "split_counts", "classes"
_INDEX_COLUMNS: dict[str, tuple[str, ...]] = {
    _IMAGES: ("path",),
    _SPLIT_COUNTS: ("label", "split"),
    _CLASSES: ("label",),
}


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of a passing validation run.

    ``evaluated`` is the number of expectations evaluated, ``images`` the number of manifest rows,
    ``report_path`` the Data Docs ``index.html``, ``profile_path`` the profile written for this dataset,
    ``reference_path`` the configured reference profile, used only when ``drift_checked``.
    """

    success: bool
    evaluated: int
    images: int
    report_path: Path
    profile_path: Path
    reference_path: Path
    drift_checked: bool


def _tables(
    images: Sequence[ImageStats], config: Config, reference: Mapping[str, ClassProfile] | None
) -> dict[str, Any]:
    """The three pandas tables the suites run on, indexed by the columns of ``_INDEX_COLUMNS``."""
    import pandas as pd

    classes = list(config.dataset.classes)
    image_table = pd.DataFrame(
        {
            "path": pd.Series([image.path for image in images], dtype=str),
            "label": pd.Series([image.label for image in images], dtype=str),
            "split": pd.Series([image.split for image in images], dtype=str),
            "sha256": pd.Series([image.sha256 for image in images], dtype=str),
            "sha256_matches": pd.Series([image.sha256_matches for image in images], dtype=bool),
            "decodes": pd.Series([image.decodes for image in images], dtype=bool),
            "height": pd.array([image.height for image in images], dtype="Int64"),
            "width": pd.array([image.width for image in images], dtype="Int64"),
            "channels": pd.array([image.channels for image in images], dtype="Int64"),
            "mean": pd.array([image.mean for image in images], dtype="Float64"),
            "std": pd.array([image.std for image in images], dtype="Float64"),
        }
    ).set_index("path")

    counts: dict[tuple[str, str], int] = {(label, split): 0 for label in classes for split in SPLITS}
    totals: dict[str, int] = dict.fromkeys(classes, 0)
    for image in images:
        if (image.label, image.split) in counts:
            counts[(image.label, image.split)] += 1
        if image.label in totals:
            totals[image.label] += 1
    split_table = pd.DataFrame(
        [{"label": label, "split": split, "images": count} for (label, split), count in counts.items()]
    ).set_index(["label", "split"])

    largest = max(totals.values())
    profile = compute_profile(images)
    records: list[dict[str, Any]] = []
    for label in classes:
        current = profile.get(label)
        record: dict[str, Any] = {
            "label": label,
            "images": totals[label],
            "imbalance_ratio": largest / totals[label] if totals[label] else math.inf,
            "mean": current.mean if current else None,
            "std": current.std if current else None,
        }
        if reference is not None:
            known = reference.get(label)
            record["reference_mean"] = known.mean if known else None
            record["reference_std"] = known.std if known else None
            record["mean_drift"] = record["std_drift"] = None  # a class on one side only is not compared
            if current is not None and known is not None:
                record["mean_drift"] = abs(current.mean - known.mean)
                record["std_drift"] = abs(current.std - known.std)
        records.append(record)
    class_table = pd.DataFrame(records).set_index("label")
    # None (a class with no decodable image, or absent from the reference) becomes NaN, which GX skips.
    class_table = class_table.astype({column: "float64" for column in class_table.columns if column != "images"})
    return {_IMAGES: image_table, _SPLIT_COUNTS: split_table, _CLASSES: class_table}


def _import_gx() -> Any:
    """Import Great Expectations with its usage analytics switched off (read once, at import)."""
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    import great_expectations as gx

    return gx


def _suites(config: Config, drift: bool) -> dict[str, list[Any]]:
    """The expectations of each table's suite."""
    # Any: GX's package __init__ re-exports the expectation classes implicitly, which mypy --strict refuses.
    expect: Any = _import_gx().expectations
    dataset, limits = config.dataset, config.validation
    height, width = dataset.image_size
    images = [
        expect.ExpectTableRowCountToBeBetween(min_value=1, description="The manifest is not empty."),
        expect.ExpectColumnValuesToBeInSet(
            column="decodes", value_set=[True], description="Every image file exists and decodes."
        ),
        expect.ExpectColumnValuesToBeInSet(
            column="sha256_matches", value_set=[True], description="File bytes match the manifest sha256."
        ),
        expect.ExpectColumnValuesToBeInSet(
            column="label", value_set=list(dataset.classes), description="Labels are configured classes."
        ),
        expect.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        expect.ExpectColumnValuesToBeInSet(column="height", value_set=[height]),
        expect.ExpectColumnValuesToBeInSet(column="width", value_set=[width]),
        expect.ExpectColumnValuesToBeInSet(column="channels", value_set=[dataset.channels]),
        expect.ExpectColumnValuesToBeUnique(
            column="sha256", description="No duplicate images, hence no leakage across splits."
        ),
    ]
    split_counts = [
        expect.ExpectColumnValuesToBeBetween(
            column="images",
            min_value=limits.min_images_per_class_per_split,
            description="Every class has enough images in every split.",
        )
    ]
    classes = [
        expect.ExpectColumnValuesToBeBetween(
            column="imbalance_ratio",
            min_value=1.0,
            max_value=limits.max_class_imbalance_ratio,
            description="Largest class count / this class's count.",
        )
    ]
    if drift:
        for column in ("mean_drift", "std_drift"):
            classes.append(
                expect.ExpectColumnValuesToBeBetween(
                    column=column,
                    min_value=0.0,
                    max_value=limits.drift_tolerance,
                    description="Absolute difference from the reference profile.",
                )
            )
    return {_IMAGES: images, _SPLIT_COUNTS: split_counts, _CLASSES: classes}


def _run_checkpoint(tables: Mapping[str, Any], suites: Mapping[str, list[Any]], report_dir: Path, dataset: str) -> Any:
    """Run one Checkpoint over all tables in an ephemeral context whose Data Docs site is ``report_dir``.

    Each table is written to Parquet under ``report_dir/tables`` and read back by a Parquet asset: a
    Checkpoint passes the same batch parameters to all its validation definitions, so several in-memory
    dataframe assets could not be validated by one Checkpoint run.
    """
    gx = _import_gx()
    from great_expectations.checkpoint.actions import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    site: Any = {  # show_how_to_buttons is missing from GX's TypedDict but honoured by SiteBuilder
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(report_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    context.update_data_docs_site(_SITE_NAME, site)
    source = context.data_sources.add_pandas(f"{dataset}_validation")
    tables_dir = report_dir / _TABLES_DIR
    tables_dir.mkdir(parents=True, exist_ok=True)
    definitions = []
    for name, table in tables.items():
        path = tables_dir / f"{name}.parquet"
        table.to_parquet(path)
        asset: Any = source.add_parquet_asset(name, path=path)
        batch = asset.add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=f"{dataset}.{name}", expectations=suites[name]))
        definitions.append(
            context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"{dataset}_dataset",
            validation_definitions=definitions,
            actions=[UpdateDataDocsAction(name="data_docs", site_names=[_SITE_NAME])],
            # Named table indexes make GX report the index columns (path; label, split) of each
            # unexpected row, the equivalent of unexpected_index_column_names per table.
            result_format={"result_format": "COMPLETE"},
        )
    )
    return checkpoint.run()


def _value(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{float(value):.4g}"
    return str(value)


def _failure_lines(result: Any, reasons: Mapping[str, str]) -> list[str]:
    """One line per failed expectation, each followed by up to MAX_LISTED offending items."""
    lines: list[str] = []
    for validation in result.run_results.values():
        table = str(validation.suite_name).rsplit(".", 1)[-1]
        index_columns = _INDEX_COLUMNS.get(table, ())
        for outcome in validation.results:
            if outcome.success:
                continue
            config = outcome.expectation_config
            column = config.kwargs.get("column")
            name = f"{table}: {config.type}" + (f" (column {column})" if column else "")
            details: dict[str, Any] = outcome.result or {}
            info = outcome.exception_info or {}
            if info.get("raised_exception"):
                lines.append(f"  {name}: raised {info.get('exception_message')}")
                continue
            if "unexpected_count" in details:
                lines.append(f"  {name}: {details['unexpected_count']} of {details.get('element_count')} rows failed")
            else:
                bounds = ", ".join(
                    f"{key}={_value(config.kwargs[key])}"
                    for key in ("min_value", "max_value")
                    if config.kwargs.get(key) is not None
                )
                observed = _value(details.get("observed_value"))
                lines.append(f"  {name}: observed {observed}" + (f", expected {bounds}" if bounds else ""))
            offending = details.get("unexpected_index_list") or []
            for item in offending[:MAX_LISTED]:
                key = " ".join(
                    str(item.get(part)) if len(index_columns) == 1 else f"{part}={item.get(part)}"
                    for part in index_columns
                )
                why = reasons.get(key, "") if column == "decodes" else ""
                lines.append(f"      {key} ({why or f'{column}={_value(item.get(column))}'})")
            if len(offending) > MAX_LISTED:
                lines.append(f"      ... and {len(offending) - MAX_LISTED} more")
    return lines


def validate_dataset(project: Project) -> ValidationReport:
    """Run the dataset's Great Expectations suite; return a report or raise :class:`DataValidationError`.

    Reads ``project.manifest_path`` (a missing manifest raises :class:`PipelineError` naming it), decodes
    every listed image, validates the tables described in the module docstring with one Checkpoint and
    writes Data Docs under ``validate.report_dir``. Only when every expectation passes is the per-class
    profile written to ``data/<name>/profile.json``.
    """
    config = project.config
    rows = read_manifest(project.manifest_path)
    report_dir = project.path(config.validation.report_dir).resolve()
    if report_dir.is_relative_to(project.data_dir.resolve()):
        raise PipelineError(
            f"validate.report_dir={config.validation.report_dir!r} is inside {project.data_dir}, "
            "which DVC versions as data only; choose a folder outside it"
        )
    reference_path = project.path(config.validation.reference_profile)
    reference = read_profile(reference_path) if reference_path.is_file() else None

    limits = config.ingest
    images = measure_images(project.dataset_dir, rows, limits.max_image_pixels, limits.max_file_bytes)
    tables = _tables(images, config, reference)
    result = _run_checkpoint(tables, _suites(config, drift=reference is not None), report_dir, config.dataset.name)
    evaluated = sum(int(validation.statistics["evaluated_expectations"]) for validation in result.run_results.values())
    report_path = report_dir / "index.html"
    if not result.success:
        reasons = {image.path: image.error for image in images if image.error}
        pack_problems = _pack_problems(project.dataset_dir)  # an unusable pack is named once, first
        lines = [*(f"  {problem}" for problem in pack_problems), *_failure_lines(result, reasons)]
        failed = sum(
            int(validation.statistics["unsuccessful_expectations"]) for validation in result.run_results.values()
        )
        header = f"{project.manifest_path}: dataset failed validation ({failed} of {evaluated} expectations failed)"
        if any(f"{_SPLIT_COUNTS}:" in line for line in lines):
            lines.append(_class_size_hint(config))
        raise DataValidationError("\n".join([header, *lines, f"Data Docs: {report_path}"]))

    written = profile_path(project)
    write_profile(written, compute_profile(images))
    return ValidationReport(
        success=True,
        evaluated=evaluated,
        images=len(rows),
        report_path=report_path,
        profile_path=written,
        reference_path=reference_path,
        drift_checked=reference is not None,
    )


def _pack_problems(dataset_dir: Path) -> list[str]:
    """Why each of the dataset's packs cannot be read (unreadable, truncated, refused), naming it; [] if none."""
    problems = []
    with DatasetReader(dataset_dir) as reader:
        for kind in PACK_KINDS:
            try:
                reader.check(kind)
            except DatasetReadError as error:
                problems.append(str(error))
    return problems


def _class_size_hint(config: Config) -> str:
    """What a class needs for its splits to reach the per-split minimum with the configured fractions."""
    from pipelines.data.ingest import smallest_class_size

    minimum = config.validation.min_images_per_class_per_split
    needed = smallest_class_size(minimum, config.ingest.split_fractions)
    return (
        f"  each class needs at least {needed} images for every split to get "
        f"validate.min_images_per_class_per_split={minimum} with ingest.split_fractions "
        f"{dict(config.ingest.split_fractions)}"
    )


def validate_or_restore(project: Project) -> ValidationReport:
    """Validate the dataset; on failure put ``data/`` back to the last versioned data, then re-raise.

    Rejected data must not linger in the workspace where the next step (or a user) could pick it up: the
    error says which data version ``data/`` holds now (none before the first version, then ``data/`` is
    left as ingested, to be inspected).
    """
    try:
        return validate_dataset(project)
    except DataValidationError as error:
        from pipelines.data.versioning import restore_workspace

        restored = restore_workspace(project)
        note = (
            f"data/ restored to data version {restored}"
            if restored
            else "no data version yet: data/ is left as ingested for inspection"
        )
        raise DataValidationError(f"{error}\n{note}") from None


def format_report(report: ValidationReport) -> str:
    """A short human-readable summary of ``report`` for the command line."""
    status = "passed" if report.success else "FAILED"
    drift = (
        f"drift: checked against {report.reference_path}"
        if report.drift_checked
        else f"drift: not checked (no reference profile at {report.reference_path})"
    )
    return "\n".join(
        [
            f"validation {status}: {report.evaluated} expectations over {report.images} images",
            drift,
            f"profile: {report.profile_path}",
            f"Data Docs: {report.report_path}",
        ]
    )
