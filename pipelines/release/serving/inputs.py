"""What a request may carry, and how each image becomes model input: through the preprocessing of training.

Every image, whatever it arrived as (a multipart file, a raw image body, or a JSON array of 8-bit pixel
values, which is encoded as a PNG first), goes through :func:`pipelines.data.images.normalise_image` (the
decoders of ``ingest.image_formats`` only, ``ingest.max_file_bytes``, ``ingest.max_image_pixels`` checked
from the header before decoding, the configured channels and size) and :func:`pipelines.data.images.to_model_input`,
exactly as ingest and training do: there is no second copy of the preprocessing. Anything else is refused
with :class:`BadInputError`, which carries the HTTP status and a message naming the problem.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from pipelines.config import Config
from pipelines.data.images import RawImage, normalise_image, to_model_input
from pipelines.errors import IngestError

JSON_SHAPE = '{"images": [image, ...]} where each image is an HxW or HxWxC (C = 1, 3 or 4) array of 0-255 pixel values'
_CHANNELS = (1, 3, 4)


class BadInputError(Exception):
    """A request the service refuses: its HTTP status, a short kind (for metrics) and what is wrong."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class PreparedImage:
    """One image as the model gets it, with what the prediction log records of it."""

    png: bytes
    """The normalised PNG (what ingest would have written): kept for feedback."""
    sha256: str
    pixels: NDArray[np.float32]
    """(height, width, channels) float32 in [0, 1]."""
    mean: float
    std: float


def check_count(count: int, config: Config) -> None:
    """Refuse a request with no image, or with more than ``serve.max_images_per_request``."""
    if count == 0:
        raise BadInputError(422, "no_image", "the request holds no image")
    limit = config.serve.max_images_per_request
    if count > limit:
        raise BadInputError(
            413, "too_many_images", f"{count} images in one request: at most {limit} (serve.max_images_per_request)"
        )


def prepare(raw: RawImage, config: Config) -> PreparedImage:
    """Normalise one image as ingest does and turn it into model input; :class:`BadInputError` names what is wrong."""
    limit = config.ingest.max_file_bytes
    if len(raw.data) > limit:
        raise BadInputError(
            413, "too_many_bytes", f"{raw.origin}: {len(raw.data)} bytes, over ingest.max_file_bytes={limit}"
        )
    if not raw.data:
        raise BadInputError(422, "not_an_image", f"{raw.origin}: empty (0 bytes)")
    try:
        png = normalise_image(raw, config)
    except IngestError as error:
        raise _refusal(str(error)) from None
    pixels = to_model_input(png)
    return PreparedImage(
        png=png,
        sha256=hashlib.sha256(png).hexdigest(),
        pixels=pixels,
        mean=float(pixels.mean()),
        std=float(pixels.std()),
    )


def _refusal(message: str) -> BadInputError:
    """The status and kind of an image that :func:`normalise_image` refused, from what it said."""
    if "pixels" in message and ("declares" in message or "bomb" in message):
        return BadInputError(413, "too_many_pixels", message)
    if "bomb" in message:
        return BadInputError(413, "too_many_pixels", message)
    if "a format not in" in message:
        return BadInputError(415, "format_not_allowed", message)
    if "colour mode" in message:
        return BadInputError(422, "unsupported_mode", message)
    return BadInputError(422, "not_an_image", message)


def prepare_files(files: Sequence[tuple[str, bytes]], config: Config) -> list[PreparedImage]:
    """Model input of multipart files, given as (file name, bytes)."""
    check_count(len(files), config)
    return [
        prepare(RawImage(origin=_origin(index, name), label="", data=data), config)
        for index, (name, data) in enumerate(files)
    ]


def _origin(index: int, name: str) -> str:
    shown = "".join(character for character in name[:80] if character.isprintable())
    return f"image {index} ({shown})" if shown else f"image {index}"


def prepare_json(body: bytes, config: Config) -> list[PreparedImage]:
    """Model input of a JSON body ``{"images": [...]}`` of 8-bit pixel arrays (see :data:`JSON_SHAPE`)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise BadInputError(400, "bad_json", f"the body is not valid JSON ({type(error).__name__}: {error})") from None
    if not isinstance(document, dict) or set(document) != {"images"} or not isinstance(document["images"], list):
        raise BadInputError(422, "wrong_shape", f"expected {JSON_SHAPE}")
    images = document["images"]
    check_count(len(images), config)
    return [
        prepare(RawImage(f"image {index}", "", _png_of(index, value, config)), config)
        for index, value in enumerate(images)
    ]


def _png_of(index: int, value: object, config: Config) -> bytes:
    """PNG bytes of one JSON image (nested lists of 0-255 values), or :class:`BadInputError` naming what is wrong."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError, RecursionError):
        raise BadInputError(
            422, "wrong_shape", f"image {index}: not a rectangular array of numbers; expected {JSON_SHAPE}"
        ) from None
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in _CHANNELS):
        raise BadInputError(
            422, "wrong_shape", f"image {index}: shape {list(array.shape)}; expected HxW or HxWxC with C = 1, 3 or 4"
        )
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise BadInputError(422, "wrong_shape", f"image {index}: shape {list(array.shape)} holds no pixel")
    limit = config.ingest.max_image_pixels
    if height * width > limit:
        raise BadInputError(
            413, "too_many_pixels", f"image {index}: {width}x{height} pixels, more than ingest.max_image_pixels={limit}"
        )
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise BadInputError(422, "bad_values", f"image {index}: pixel values must be finite numbers from 0 to 255")
    if not np.array_equal(array, np.round(array)):
        raise BadInputError(
            422,
            "bad_values",
            f"image {index}: pixel values must be whole numbers 0-255 (8-bit pixels); multiply [0, 1] values by 255",
        )
    pixels = array.astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)  # L, RGB or RGBA from the shape
    return buffer.getvalue()


def prepare_raw(body: bytes, config: Config) -> list[PreparedImage]:
    """Model input of a request whose whole body is one image (``Content-Type: image/...``)."""
    return [prepare(RawImage("image 0", "", body), config)]


INLINE_BYTES = 64 * 1024
"""Requests this small (all their images) may be prepared on the event loop."""
INLINE_PIXELS = 256 * 256
"""... when no image declares more pixels than this (its decode then takes well under a millisecond)."""


def cheap_to_prepare(images: Sequence[bytes], config: Config) -> bool:
    """Whether ``images`` are cheap enough to prepare on the event loop, with no thread hop.

    Cheap: at most :data:`INLINE_BYTES` in all, each header declaring at most :data:`INLINE_PIXELS` pixels.
    Only the headers are read; anything unreadable goes to a worker thread, which refuses it with the reason.
    """
    if sum(len(data) for data in images) > INLINE_BYTES:
        return False
    for data in images:
        try:
            with Image.open(io.BytesIO(data), formats=list(config.ingest.image_formats)) as image:
                width, height = image.size
        except Exception:  # not an image: prepare() refuses it, with the reason, on a worker thread
            return False
        if width * height > INLINE_PIXELS:
            return False
    return True


def model_batch(images: Sequence[PreparedImage]) -> NDArray[np.float32]:
    """The (N, H, W, C) float32 batch of prepared images."""
    return np.stack([image.pixels for image in images]).astype(np.float32, copy=False)
