"""Reading the service's request bodies: bounded in size, then images, a feedback label or a version to deploy.

Every refusal is a :class:`~pipelines.release.serving.inputs.BadInputError` naming the problem; what turns
the images into model input is :mod:`~pipelines.release.serving.inputs`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from pipelines.config import Config
from pipelines.release.serving.inputs import (
    INLINE_BYTES,
    BadInputError,
    PreparedImage,
    cheap_to_prepare,
    check_count,
    prepare_files,
    prepare_json,
    prepare_raw,
)

SMALL_BODY_BYTES = 64 * 1024
"""Bound of the bodies of ``/feedback`` and ``/admin/deploy``."""

FEEDBACK_SHAPE = '{"request_id": str, "image_index": int, "label": str, "keep_image": bool (optional)}'


@dataclass(frozen=True)
class FeedbackRequest:
    """A well-formed ``/feedback`` body: which served image, its true label, whether to keep the image."""

    request_id: str
    image_index: int
    label: str
    keep_image: bool


async def read_body(request: Request, limit: int, setting: str) -> bytes:
    """The request body, refused (413) beyond ``limit`` bytes: from Content-Length, then while reading."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadInputError(400, "bad_request", f"Content-Length {declared[:40]!r} is not a number")
        if int(declared) > limit:
            raise BadInputError(413, "too_many_bytes", f"request body of {declared} bytes, over {setting}={limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise BadInputError(413, "too_many_bytes", f"request body over {setting}={limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def images_of(request: Request, body: bytes, config: Config) -> tuple[str, list[PreparedImage]]:
    """The kind of body and its images as model input.

    Small images are decoded right here (a thread hop costs more than they do); anything larger, or a
    JSON body beyond :data:`~pipelines.release.serving.inputs.INLINE_BYTES`, on a worker thread, so one
    big request never stalls the others.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        files = await _multipart_files(request, body, config)
        if cheap_to_prepare([data for _, data in files], config):
            return "multipart", prepare_files(files, config)
        return "multipart", await asyncio.to_thread(prepare_files, files, config)
    if content_type == "application/json":
        if len(body) <= INLINE_BYTES:
            return "json", prepare_json(body, config)
        return "json", await asyncio.to_thread(prepare_json, body, config)
    if content_type.startswith("image/"):
        if cheap_to_prepare([body], config):
            return "image", prepare_raw(body, config)
        return "image", await asyncio.to_thread(prepare_raw, body, config)
    raise BadInputError(
        415,
        "unsupported_content_type",
        f"Content-Type {content_type or '(none)'!r} is not accepted: send multipart/form-data image files, "
        "one image as image/..., or application/json",
    )


async def _multipart_files(request: Request, body: bytes, config: Config) -> list[tuple[str, bytes]]:
    limit = config.serve.max_images_per_request

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=limit + 1, max_fields=16)
    except HTTPException as error:
        if "Too many files" in str(error.detail):
            raise BadInputError(
                413, "too_many_images", f"more than {limit} images in one request (serve.max_images_per_request)"
            ) from None
        raise BadInputError(400, "bad_multipart", f"malformed multipart body: {error.detail}") from None
    try:
        uploads = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        check_count(len(uploads), config)
        return [(upload.filename or "", await upload.read()) for upload in uploads]
    finally:
        await form.close()


def feedback_request(body: bytes, classes: Sequence[str]) -> FeedbackRequest:
    """A ``/feedback`` body checked for shape and types, its label one of ``classes``."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise BadInputError(400, "bad_json", f"the body is not valid JSON; expected {FEEDBACK_SHAPE}") from None
    if not isinstance(document, dict) or not {"request_id", "image_index", "label"} <= set(document):
        raise BadInputError(422, "wrong_shape", f"expected {FEEDBACK_SHAPE}")
    unknown = sorted(set(document) - {"request_id", "image_index", "label", "keep_image"})
    request_id, index, label = document["request_id"], document["image_index"], document["label"]
    keep = document.get("keep_image", False)
    if unknown or not isinstance(request_id, str) or not isinstance(label, str) or not isinstance(keep, bool):
        raise BadInputError(
            422, "wrong_shape", f"expected {FEEDBACK_SHAPE}{'; unknown keys ' + str(unknown) if unknown else ''}"
        )
    if not isinstance(index, int) or isinstance(index, bool):
        raise BadInputError(422, "wrong_shape", f"image_index must be an integer, got {type(index).__name__}")
    if label not in classes:
        raise BadInputError(422, "unknown_label", f"label {label[:80]!r} is not one of the classes {list(classes)}")
    return FeedbackRequest(request_id, index, label, keep)


def deploy_version(body: bytes) -> str | None:
    """The version an ``/admin/deploy`` body asks for (``{"version": "N"}``), or None for an empty body."""
    if not body.strip():
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise BadInputError(400, "bad_json", 'the body is not valid JSON; expected {"version": "N"}') from None
    if not isinstance(document, dict) or set(document) - {"version"}:
        raise BadInputError(422, "wrong_shape", 'expected {"version": "N"} or an empty body')
    version = document.get("version")
    if version is not None and not (isinstance(version, str | int) and str(version).isdigit()):
        raise BadInputError(422, "wrong_shape", f"version must be a version number, got {version!r}")
    return None if version is None else str(version)
