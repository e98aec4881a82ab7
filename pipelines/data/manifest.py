"""The dataset manifest: one CSV row per image, the contract between ingest, validate, augment and train.

Columns: ``path`` (relative to the dataset folder, POSIX separators), ``label``, ``split``
(train/val/test), ``width``, ``height``, ``channels``, ``bytes``, ``sha256`` (of the file's bytes),
and, in the augmented manifest only, ``parent_sha256``. Rows are sorted by path so the file is
byte-for-byte reproducible.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

from pipelines.errors import PipelineError
from pipelines.files import write_atomic


@dataclass(frozen=True)
class ManifestRow:
    """One image of the dataset."""

    path: str
    label: str
    split: str
    width: int
    height: int
    channels: int
    bytes: int
    sha256: str
    parent_sha256: str = ""


COLUMNS = tuple(field.name for field in fields(ManifestRow) if field.name != "parent_sha256")
AUGMENTED_COLUMNS = (*COLUMNS, "parent_sha256")
_INT_COLUMNS = ("width", "height", "channels", "bytes")


def write_manifest(path: Path, rows: Iterable[ManifestRow], augmented: bool = False) -> None:
    """Write ``rows`` sorted by path to ``path`` atomically (temporary file, then rename)."""
    columns = AUGMENTED_COLUMNS if augmented else COLUMNS
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda item: item.path):
        writer.writerow({column: getattr(row, column) for column in columns})
    write_atomic(path, buffer.getvalue())


def read_manifest(path: Path) -> list[ManifestRow]:
    """Read a manifest; a missing file or a malformed row raises :class:`PipelineError` naming it."""
    if not path.is_file():
        raise PipelineError(f"{path}: manifest not found (run `mlops ingest` first)")
    rows: list[ManifestRow] = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise PipelineError(f"{path}: manifest lacks columns {sorted(missing)}")
        for line_number, record in enumerate(reader, start=2):
            try:
                values: dict[str, object] = {key: record[key] for key in COLUMNS}
                for column in _INT_COLUMNS:
                    values[column] = int(record[column])
                values["parent_sha256"] = record.get("parent_sha256") or ""
                rows.append(ManifestRow(**values))  # type: ignore[arg-type]
            except (TypeError, ValueError) as error:
                raise PipelineError(f"{path}:{line_number}: malformed manifest row: {error}") from None
    return rows
