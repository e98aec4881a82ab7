"""Ingest: read images from a source, normalise them and write a dataset folder with a manifest.

The sources are :mod:`pipelines.data.sources`; every image is normalised by
:func:`pipelines.data.images.normalise_image` (configured channels and size, re-encoded as PNG). Splits
(train/val/test) are stratified per class and stable: an image keeps the split it had in the dataset being
replaced, new images fill each class's splits towards the configured fractions in order of their sha256,
and identical images are one image, so none can sit in two splits.

The dataset is ``data/<name>/images.zip`` (one stored ZIP whose members are named by the manifest's paths,
``images/<label>/<sha256[:16]>.png``: :mod:`pipelines.data.packs`) and ``manifest.csv``. The same source
gives a byte-identical pack, hence the same data version. A large source is decoded, normalised and
encoded on every core (:mod:`pipelines.data.parallel`), the results taken in source order, so the output is
what one process would write. Everything is written to a staging folder of this run outside ``data/`` and
renamed into place only when complete, under the dataset's lock (:mod:`pipelines.data.staging`): a failure
(a bad image, a full disk) or a kill leaves ``data/`` as it was, and the next run removes what a killed run
left behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from pipelines.config import SPLITS, Config
from pipelines.data import parallel
from pipelines.data.feedback import with_feedback
from pipelines.data.images import RawImage, normalise_image
from pipelines.data.manifest import ManifestRow, read_manifest, write_manifest
from pipelines.data.packs import DatasetReadError, PackWriter, pack_path
from pipelines.data.sources import read_source
from pipelines.data.staging import StagingArea, staging_area
from pipelines.errors import IngestError, PipelineError
from pipelines.files import write_json_atomic
from pipelines.project import MANIFEST_NAME, Project


@dataclass(frozen=True)
class IngestResult:
    """What ingest wrote: the dataset folder, how many images per split, what it dropped."""

    dataset_dir: Path
    source: str
    images: int
    per_split: dict[str, int] = field(default_factory=dict)
    duplicates_dropped: int = 0


def split_sizes(count: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """How many of ``count`` images go to each split: the fractions rounded by largest remainder (sum = count)."""
    exact = {split: count * fractions[split] for split in SPLITS}
    sizes = {split: int(value) for split, value in exact.items()}
    by_remainder = sorted(SPLITS, key=lambda split: (-(exact[split] - sizes[split]), SPLITS.index(split)))
    for split in by_remainder[: count - sum(sizes.values())]:
        sizes[split] += 1
    return sizes


def assign_splits(
    images: Mapping[str, str], previous: Mapping[str, str], fractions: Mapping[str, float]
) -> dict[str, str]:
    """The split of every image (sha256 -> label in ``images``), stratified per class and stable over versions.

    An image that ``previous`` (sha256 -> split, from the dataset being replaced) already placed keeps its
    split, so nothing moves between splits as the dataset grows and no test image ever becomes a train
    image. The new images of each class fill what the class lacks towards the configured fractions, taken
    in order of their hash (a content-defined, order-independent shuffle): a fresh dataset is split exactly
    by :func:`split_sizes` in every class.
    """
    by_class: dict[str, list[str]] = {}
    for digest, label in images.items():
        by_class.setdefault(label, []).append(digest)
    splits: dict[str, str] = {}
    for digests in by_class.values():
        kept = Counter(previous[digest] for digest in digests if previous.get(digest) in SPLITS)
        fresh = sorted(digest for digest in digests if previous.get(digest) not in SPLITS)
        targets = split_sizes(len(digests), fractions)
        lacking = {split: max(targets[split] - kept[split], 0) for split in SPLITS}
        shares = (
            split_sizes(len(fresh), {split: lacking[split] / sum(lacking.values()) for split in SPLITS})
            if sum(lacking.values())
            else split_sizes(len(fresh), fractions)
        )
        position = 0
        for split in SPLITS:
            for digest in fresh[position : position + shares[split]]:
                splits[digest] = split
            position += shares[split]
        splits.update({digest: previous[digest] for digest in digests if digest not in splits})
    return splits


def smallest_class_size(minimum_per_split: int, fractions: Mapping[str, float]) -> int:
    """The fewest images a class needs for :func:`split_sizes` to give every split ``minimum_per_split``."""
    count = minimum_per_split
    while min(split_sizes(count, fractions).values()) < minimum_per_split:
        count += 1
    return count


def _normalise_chunk(config: Config, raws: list[RawImage]) -> list[tuple[str, str, bytes, str]]:
    """(origin, label, normalised PNG bytes, sha256) of each of ``raws``, in order: ingest's per-image work.

    Runs in a worker process for a large source (:mod:`pipelines.data.parallel`), in this one otherwise;
    the first bad image raises its :class:`IngestError`, naming it.
    """
    classes = set(config.dataset.classes)
    normalised: list[tuple[str, str, bytes, str]] = []
    for raw in raws:
        if raw.label not in classes:
            raise IngestError(f"{raw.origin}: label {raw.label!r} is not in dataset.classes")
        data = normalise_image(raw, config)
        normalised.append((raw.origin, raw.label, data, hashlib.sha256(data).hexdigest()))
    return normalised


def _normalised(
    raw_images: Iterator[RawImage], total: int | None, config: Config
) -> Generator[tuple[str, str, bytes, str], None, None]:
    """:func:`_normalise_chunk` over the whole source, in source order; on the machine's cores when it is large."""
    work = functools.partial(_normalise_chunk, config)
    workers = parallel.workers_for(total)
    if workers:
        yield from parallel.ordered_map(work, raw_images, workers=workers)
    else:
        for chunk in parallel.chunks(raw_images):
            yield from work(chunk)


def _collect(
    raw_images: Iterator[RawImage], total: int | None, project: Project, area: StagingArea, staging: Path
) -> tuple[list[ManifestRow], int]:
    """Normalise every image, drop duplicates, write the others to ``staging/images.zip``; their manifest rows.

    Decoding, normalising and encoding run on every core for a large source, results taken in source order,
    so the pack and the rows are the same as one process would write. The pack is complete and checked when
    this returns.
    """
    config = project.config
    seen: dict[str, tuple[str, str]] = {}
    rows: list[ManifestRow] = []
    duplicates = 0
    height, width = config.dataset.image_size
    staging.mkdir(parents=True, exist_ok=True)
    try:
        with (
            contextlib.closing(_normalised(raw_images, total, config)) as normalised,
            PackWriter(pack_path(staging, "images")) as pack,
        ):
            for origin, label, data, digest in tqdm(
                normalised, total=total, desc="ingest", unit="img", file=sys.stderr, disable=None
            ):
                if digest in seen:
                    first_origin, first_label = seen[digest]
                    if first_label != label:
                        raise IngestError(
                            f"{origin}: same image as {first_origin} but labelled {label!r} instead of {first_label!r}"
                        )
                    duplicates += 1
                    continue
                seen[digest] = (origin, label)
                relative = f"images/{label}/{digest[:16]}.png"
                pack.add(relative, data)
                rows.append(ManifestRow(relative, label, "", width, height, config.dataset.channels, len(data), digest))
    except DatasetReadError as error:  # the written pack does not read back
        raise IngestError(f"{error}; data/ is unchanged") from None
    return rows, duplicates


def _previous_splits(project: Project) -> dict[str, str]:
    """sha256 -> split of the dataset about to be replaced (empty when there is none or it is unreadable)."""
    try:
        return {row.sha256: row.split for row in read_manifest(project.manifest_path)}
    except PipelineError:
        return {}


def ingest(project: Project, source: str | None = None) -> IngestResult:
    """Ingest ``source`` (default: ``ingest.source``) into ``data/<dataset>/`` with its manifest.

    Raises :class:`IngestError` naming the problem and the file; on any error ``data/`` is unchanged.
    """
    source = source or project.config.ingest.source
    try:
        with staging_area(project, "ingest") as area:
            staging = area.new / "dataset"
            raw_images, total = read_source(source, project.config)
            raw_images, total = with_feedback(project, raw_images, total)  # monitor.include_feedback
            rows, duplicates = _collect(raw_images, total, project, area, staging)
            if not rows:
                raise IngestError(f"{source}: no images found")
            splits = assign_splits(
                {row.sha256: row.label for row in rows},
                _previous_splits(project),
                project.config.ingest.split_fractions,
            )
            rows = [replace(row, split=splits[row.sha256]) for row in rows]
            write_manifest(staging / MANIFEST_NAME, rows)
            area.publish([("dataset", project.dataset_dir)])
    except OSError as error:
        raise IngestError(
            f"{error.filename or project.staging_dir}: cannot write the staged dataset "
            f"({error.strerror or error}); data/ is unchanged"
        ) from None
    per_split = Counter(row.split for row in rows)
    result = IngestResult(
        dataset_dir=project.dataset_dir,
        source=source,
        images=len(rows),
        per_split={split: per_split.get(split, 0) for split in SPLITS},
        duplicates_dropped=duplicates,
    )
    record = {
        "source": source,
        "images": result.images,
        "per_split": result.per_split,
        "duplicates_dropped": duplicates,
        "ingested_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        write_json_atomic(project.last_ingest_path, record)
    except OSError as error:
        raise IngestError(
            f"{project.last_ingest_path}: images ingested, but the record of this ingest cannot be written "
            f"({error.strerror or error})"
        ) from None
    return result


def last_ingest_source(project: Project) -> str:
    """The source of the most recent ingest in this project, or ``""`` if none is recorded."""
    try:
        return str(json.loads(project.last_ingest_path.read_text(encoding="utf-8")).get("source", ""))
    except (OSError, ValueError):
        return ""
