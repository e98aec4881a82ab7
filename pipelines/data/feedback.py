"""Fed-back images: labelled production images the prediction service kept, as extra data for the next ingest.

The service stores an image whose feedback opted in (``POST /feedback`` with ``keep_image``) as
``<feedback uri>/<label>/<sha256>.png``, the normalised PNG: the class-folder layout of a ``folder:`` or
``s3://`` source. With ``monitor.include_feedback`` on, :func:`with_feedback` appends those images to what
ingest reads from its source, so the retrain the monitor requests trains on the old data plus them (same
checks, splits kept stable by hash). Where they are: ``$MLOPS_SERVE_FEEDBACK_URI``, else ``serve.feedback_uri``
(a folder, relative to the project, or ``s3://bucket/prefix``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

from pipelines.data.images import RawImage
from pipelines.errors import IngestError
from pipelines.project import Project

FEEDBACK_URI_ENV = "MLOPS_SERVE_FEEDBACK_URI"
_NO_S3_IMAGES = "no images under this S3 prefix"


def feedback_uri(project: Project) -> str:
    """Where kept feedback images live: ``$MLOPS_SERVE_FEEDBACK_URI``, else ``serve.feedback_uri``."""
    return os.environ.get(FEEDBACK_URI_ENV, "").strip() or project.config.serve.feedback_uri


def feedback_source(project: Project) -> str | None:
    """The ingest source of the kept feedback images, or None when off or when there is none yet."""
    if not project.config.monitor.include_feedback:
        return None
    uri = feedback_uri(project)
    if uri.startswith("s3://"):
        return uri
    folder = project.path(uri)
    return f"folder:{folder}" if folder.is_dir() and any(folder.glob("*/*.png")) else None


def _tolerate_empty_s3(images: Iterator[RawImage]) -> Iterator[RawImage]:
    try:
        yield from images
    except IngestError as error:
        if not str(error).endswith(_NO_S3_IMAGES):
            raise


def with_feedback(
    project: Project, images: Iterator[RawImage], total: int | None
) -> tuple[Iterator[RawImage], int | None]:
    """``images`` of the source followed by the kept feedback images (when on); their count when known."""
    from pipelines.data.sources import read_source

    source = feedback_source(project)
    if source is None:
        return images, total
    extra, count = read_source(source, project.config)
    if source.startswith("s3://"):
        extra = _tolerate_empty_s3(extra)
    return itertools.chain(images, extra), (total + count if total is not None and count is not None else None)
