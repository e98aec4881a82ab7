"""Decoding and normalising one image: the preprocessing every image gets, at ingest and when served.

:func:`normalise_image` refuses what must not be decoded (too many bytes, too many declared pixels, a
format outside ``ingest.image_formats``) and returns PNG bytes of the configured channels and size, so the
same pixels always give the same bytes; :func:`to_model_input` turns such bytes into the float array the
model takes. Training reads the PNGs ingest wrote; a served image goes through the same two functions, so
both see identical pixels.

Only the decoders of the allowlist are ever reached: Pillow is given the list (``Image.open(...,
formats=...)``), so a TIFF, EPS (which would start Ghostscript), PSD... file is refused whatever its name.
Files ingest wrote are decoded as PNG only (:data:`DATASET_FORMATS`). Every colour mode Pillow can hand
back is converted to ``L`` or ``RGB`` (:func:`to_channels`) or refused with the mode named.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from pipelines.config import Config
from pipelines.errors import IngestError

FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg"),
    "BMP": (".bmp",),
    "GIF": (".gif",),
    "WEBP": (".webp",),
    "TIFF": (".tif", ".tiff"),
}
"""File extensions (lower case) of each format ``ingest.image_formats`` may name."""

DATASET_FORMATS: tuple[str, ...] = ("PNG",)
"""What the files under ``data/`` are: ingest writes PNG only, so nothing else is decoded there."""

_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_ALPHA_MODES = ("P", "PA", "LA", "La", "RGBA", "RGBa")
_COLOUR_MODES = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")
_PLAIN_MODES = ("1", "L", "RGB")


@dataclass(frozen=True)
class RawImage:
    """One source image before normalisation: where it came from, its class, its bytes."""

    origin: str
    label: str
    data: bytes


def image_extensions(formats: Iterable[str]) -> frozenset[str]:
    """The file extensions (lower case, with the dot) of ``formats``: what a source lists as images."""
    return frozenset(extension for name in formats for extension in FORMAT_EXTENSIONS.get(name, ()))


def sniff_format(data: bytes) -> str | None:
    """The format Pillow would take ``data`` for, from its first bytes only (no decoder is run), or None."""
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # an accept function may choke on a short prefix: it is only a guess
            continue
    return None


def open_image(data: bytes, origin: str, formats: Sequence[str], max_pixels: int) -> Image.Image:
    """Decode ``data`` with the decoders of ``formats`` only, refusing more than ``max_pixels`` pixels.

    Raises :class:`IngestError` naming ``origin`` for another format (named when recognised), a header
    declaring too many pixels (decompression bomb), and undecodable or truncated data.
    """
    allowed = list(formats)
    try:
        # The pixel limit is checked from the header, before anything is decoded. (No
        # warnings.catch_warnings() here: images are normalised in threads and it is not thread-safe.)
        image = Image.open(io.BytesIO(data), formats=allowed)
        width, height = image.size
        if width * height > max_pixels:
            raise IngestError(
                f"{origin}: header declares {width}x{height} pixels, more than "
                f"ingest.max_image_pixels={max_pixels} (possible decompression bomb)"
            )
        image.seek(0)
        image.load()
    except IngestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise IngestError(f"{origin}: refused as a decompression bomb: {error}") from None
    except UnidentifiedImageError:
        detected = sniff_format(data)
        if detected is not None and detected not in allowed:
            raise IngestError(
                f"{origin}: the file is {detected} (by its first bytes), a format not in ingest.image_formats "
                f"({', '.join(allowed)})"
            ) from None
        raise IngestError(f"{origin}: not a readable image (not {', '.join(allowed)}: ingest.image_formats)") from None
    except Exception as error:  # Pillow raises many types for bad data
        raise IngestError(f"{origin}: not a readable image ({type(error).__name__}: {error})") from None
    return image


def normalise_image(raw: RawImage, config: Config) -> bytes:
    """Decode ``raw``, convert it to the configured channels and size, and return PNG bytes.

    Refuses, with an :class:`IngestError` naming the file: oversized files, formats outside
    ``ingest.image_formats``, undecodable or truncated data, headers declaring more pixels than
    ``ingest.max_image_pixels`` (decompression bombs), and colour modes that cannot be converted.
    """
    limits = config.ingest
    if len(raw.data) > limits.max_file_bytes:
        raise IngestError(f"{raw.origin}: file is {len(raw.data)} bytes, over ingest.max_file_bytes")
    image = open_image(raw.data, raw.origin, limits.image_formats, limits.max_image_pixels)
    pixels = to_channels(image, config.dataset.channels, raw.origin)
    target_height, target_width = config.dataset.image_size
    if pixels.size != (target_width, target_height):
        pixels = pixels.resize((target_width, target_height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    pixels.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def to_channels(image: Image.Image, channels: int, origin: str = "image") -> Image.Image:
    """``image`` as 8-bit ``L`` (``channels`` 1) or ``RGB`` (3), whatever its colour mode.

    16-bit and float images are scaled to 8 bits; transparent pixels (palette transparency, alpha)
    become black, the background of the built-in sample; CMYK, YCbCr, LAB, HSV go through RGB. Any other
    mode raises :class:`IngestError` naming ``origin`` and the mode.
    """
    mode = image.mode
    try:
        if mode in _HIGH_DEPTH_MODES:
            array = np.asarray(image, dtype=np.float64)
            finite = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
            peak = 65535.0 if mode.startswith("I") and finite.max(initial=0) > 255 else 255.0
            image = Image.fromarray(np.clip(finite / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        elif mode in _ALPHA_MODES or "transparency" in image.info:
            rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, rgba)
        elif mode in _COLOUR_MODES:
            image = image.convert("RGB")
        elif mode not in _PLAIN_MODES:
            raise IngestError(f"{origin}: colour mode {mode!r} is not supported (convert the image to RGB or L)")
        return image.convert("L" if channels == 1 else "RGB")
    except IngestError:
        raise
    except (ValueError, OSError) as error:
        raise IngestError(f"{origin}: cannot convert colour mode {mode!r}: {error}") from None


def to_model_input(png: bytes) -> NDArray[np.float32]:
    """The (height, width, channels) float32 array in [0, 1] of a normalised image's PNG bytes."""
    with Image.open(io.BytesIO(png), formats=list(DATASET_FORMATS)) as image:
        pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[..., np.newaxis] if pixels.ndim == 2 else pixels
