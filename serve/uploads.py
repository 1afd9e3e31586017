"""Uploaded bytes to pixels: base64 fields, image files (through the data engine pre-filter's header checks and
decoding, none of its quality rules) and mask PNGs, every size checked before any pixel is decoded.

Errors are :class:`reflade.serve.errors.ApiError`: 413 ``too_large``; 415 ``not_an_image`` / ``unsupported_image``;
400 ``invalid_base64``, ``empty_image``, ``truncated_image``, ``corrupt_image``; 422 ``invalid_mask``.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
from PIL import Image

from reflade.engine.stages.prefilter import ImageRejected, decode_image_file, reason_code
from reflade.serve.errors import ApiError, Limits, type_name

__all__ = ["decode_base64", "decode_mask", "decode_upload"]

# An image reason code -> (HTTP status, API error code).
_IMAGE_ERRORS = {
    "too_large": (413, "too_large"),
    "not_an_image": (415, "not_an_image"),
    "unsupported": (415, "unsupported_image"),
    "empty": (400, "empty_image"),
    "truncated": (400, "truncated_image"),
    "corrupt": (400, "corrupt_image"),
}


def decode_base64(value: Any, *, field: str, max_bytes: int) -> bytes:
    """Bytes from a base64 string field (standard or URL-safe alphabet, padding optional, ``data:`` URL allowed).

    Raises:
        ApiError: 422 ``invalid_field`` when not a string, 413 ``too_large`` when the decoded size would exceed
            ``max_bytes`` (judged from the length, before decoding), 400 ``invalid_base64`` when it does not decode.
    """
    if not isinstance(value, str):
        raise ApiError(422, "invalid_field", f"{field} must be a base64 string, got {type_name(value)}")
    # Judge the length before copying anything: whitespace cannot plausibly double a base64 text.
    if len(value) > 2 * (max_bytes * 4 // 3 + 4) + 1024:
        raise _base64_too_large(field, len(value) * 3 // 4, max_bytes)
    if value.startswith("data:"):
        header, comma, value = value.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(
                400, "invalid_base64", f"{field} is a data: URL without ';base64,' before the data"
            )
    text = "".join(value.split())
    decoded_size = len(text) * 3 // 4 - len(text) + len(text.rstrip("="))
    if decoded_size > max_bytes:
        raise _base64_too_large(field, decoded_size, max_bytes)
    if "-" in text or "_" in text:
        text = text.translate(str.maketrans("-_", "+/"))
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "invalid_base64", f"{field} is not valid base64: {exc}") from None


def _base64_too_large(field: str, size: int, max_bytes: int) -> ApiError:
    return ApiError(
        413, "too_large", f"{field} holds about {size:,} bytes, more than the limit of {max_bytes:,} bytes"
    )


def decode_upload(data: bytes, limits: Limits) -> np.ndarray:
    """An uploaded image file as HxWx3 uint8 RGB (EXIF orientation applied, alpha composited over white).

    Uses the data engine pre-filter's header checks and decoding (none of its quality rules): the byte and pixel
    limits are enforced before any pixel is decoded. The longest side is not capped (the decomposition API
    resizes to the model's working size).

    Raises:
        ApiError: 413 ``too_large``; 415 ``not_an_image`` / ``unsupported_image``; 400 ``empty_image``,
            ``truncated_image``, ``corrupt_image``; 422 ``missing_field`` when ``data`` is not bytes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ApiError(
            422, "missing_field", f"no image: expected the image file's bytes, got {type_name(data)}"
        )
    try:
        rgb, _ = decode_image_file(
            data,
            max_bytes=limits.max_bytes,
            max_pixels=limits.max_pixels,
            max_side=limits.max_pixels,  # no cap: a side cannot exceed the pixel limit anyway
            name="the upload",
        )
    except ImageRejected as rejection:
        status, code = _IMAGE_ERRORS.get(reason_code(rejection.reason), (400, "corrupt_image"))
        text = rejection.reason.split(":", 1)[-1].strip()
        raise ApiError(status, code, f"image refused: {text}") from None
    return rgb


def decode_mask(value: Any, height: int, width: int, limits: Limits, where: str) -> np.ndarray:
    """A mask PNG (base64 string or bytes) as HxW bool, its size checked from the header before decoding."""
    name = f"{where}.mask"
    if isinstance(value, str):
        data = decode_base64(value, field=name, max_bytes=limits.max_bytes)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if len(data) > limits.max_bytes:
            raise ApiError(413, "too_large", f"{name} is {len(data):,} bytes, more than {limits.max_bytes:,}")
    else:
        raise ApiError(422, "invalid_mask", f"{name} must be a base64 PNG string, got {type_name(value)}")
    try:
        img = Image.open(io.BytesIO(data), formats=("PNG",))
    except MemoryError:
        raise
    except Exception:  # not a PNG, or Pillow's bomb guard on the header: nothing decoded either way
        raise ApiError(
            422, "invalid_mask", f"{name} is not a PNG image ({len(data)} bytes, starting {data[:8]!r})"
        ) from None
    with img:
        if img.size != (width, height):
            raise ApiError(
                422,
                "invalid_mask",
                f"{name} is {img.size[0]}x{img.size[1]} (width x height), the image is {width}x{height}: "
                "draw the mask on the image's own pixel grid",
            )
        try:
            img.load()
            has_alpha = "A" in img.mode or "transparency" in img.info
            rgba = np.asarray(img.convert("RGBA")) if has_alpha else None
            grey = np.asarray(img.convert("L"))
        except MemoryError:
            raise
        except Exception as exc:
            raise ApiError(422, "invalid_mask", f"{name} could not be decoded: {exc}") from None
    if rgba is not None and rgba[:, :, 3].min() != rgba[:, :, 3].max():
        mask = rgba[:, :, 3] >= 128
    else:
        mask = grey >= 128
    if not mask.any():
        raise ApiError(
            422, "invalid_mask", f"{name} selects no pixel (inside is >= 128, or opaque when it has alpha)"
        )
    return mask
