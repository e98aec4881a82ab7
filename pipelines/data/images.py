"""Decoding and normalising one image: the preprocessing every image gets, at ingest and when served.

:func:`normalise_image` refuses what must not be decoded (too many bytes, too many declared pixels) and
returns PNG bytes of the configured channels and size, so the same pixels always give the same bytes;
:func:`to_model_input` turns such bytes into the float array the model takes. Training reads the PNGs
ingest wrote; a served image goes through the same two functions, so both see identical pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from pipelines.config import Config
from pipelines.errors import IngestError


@dataclass(frozen=True)
class RawImage:
    """One source image before normalisation: where it came from, its class, its bytes."""

    origin: str
    label: str
    data: bytes


def normalise_image(raw: RawImage, config: Config) -> bytes:
    """Decode ``raw``, convert it to the configured channels and size, and return PNG bytes.

    Refuses, with an :class:`IngestError` naming the file: oversized files, undecodable or truncated
    data, and headers declaring more pixels than ``ingest.max_image_pixels`` (decompression bombs).
    """
    limits = config.ingest
    if len(raw.data) > limits.max_file_bytes:
        raise IngestError(f"{raw.origin}: file is {len(raw.data)} bytes, over ingest.max_file_bytes")
    try:
        # The pixel limit is checked from the header, before anything is decoded. (No
        # warnings.catch_warnings() here: images are normalised in threads and it is not thread-safe.)
        image = Image.open(io.BytesIO(raw.data))
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise IngestError(
                f"{raw.origin}: header declares {width}x{height} pixels, more than "
                f"ingest.max_image_pixels={limits.max_image_pixels} (possible decompression bomb)"
            )
        image.seek(0)
        image.load()
    except IngestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise IngestError(f"{raw.origin}: refused as a decompression bomb: {error}") from None
    except Exception as error:  # Pillow raises many types for bad data
        raise IngestError(f"{raw.origin}: not a readable image ({type(error).__name__}: {error})") from None
    pixels = _to_channels(image, config.dataset.channels)
    target_height, target_width = config.dataset.image_size
    if pixels.size != (target_width, target_height):
        pixels = pixels.resize((target_width, target_height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    pixels.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Grayscale, RGB, RGBA, palette or 16-bit images as 8-bit ``L`` (1 channel) or ``RGB`` (3)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I") and array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("P", "PA", "LA", "RGBA", "La") or "transparency" in image.info:
        # Transparent pixels become black, the background of the built-in sample.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def to_model_input(png: bytes) -> NDArray[np.float32]:
    """The (height, width, channels) float32 array in [0, 1] of a normalised image's PNG bytes."""
    with Image.open(io.BytesIO(png)) as image:
        pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[..., np.newaxis] if pixels.ndim == 2 else pixels
