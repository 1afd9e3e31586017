"""Untrusted image bytes decoded safely: the pre-filter's header checks and decoding, without its quality rules.

:func:`decode_image_file` refuses without decoding pixels what it can tell from the header (empty data, too many
bytes, a format outside :data:`ACCEPTED_FORMATS`, more pixels than allowed, too small, too elongated), then decodes
the first frame to 8-bit RGB, caps the longest side and applies the EXIF orientation. Every refusal is an
:class:`ImageRejected` whose reason is ``"<code>: <human text>"`` (:func:`reason_code` extracts the code). Used by
the pre-filter (``prefilter.py``, which adds the quality rules) and by the serving API.

Conversions (documented choices):
  * Alpha (RGBA, LA, palette or grey with transparency, ...) is composited over white. The downscale runs on
    premultiplied colour, so the colour hidden under fully transparent pixels never bleeds in.
  * 16-bit samples are scaled to 8 bits (``round(v * 255 / 65535)``), never clipped. Pillow reads 16-bit RGB(A)
    PNGs as 8-bit by keeping the high byte (``v >> 8``, within one level of the rounded scale); 16-bit grayscale
    arrives as ``I;16`` and is scaled here (Pillow's own ``I;16 -> L`` conversion clips).
  * CMYK is converted with Pillow's formula (no ICC profile); Pillow undoes Adobe's inverted CMYK JPEGs.
  * Only common raster formats are opened (:data:`ACCEPTED_FORMATS`); Pillow's other plugins (EPS runs
    Ghostscript, for one) are never tried on untrusted bytes.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")
"""Pillow formats tried on the bytes (those this Pillow build lacks are skipped)."""

# EXIF orientation tag (0x0112) value -> the transpose that displays the image upright (as ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def reason_code(reason: str) -> str:
    """The machine-friendly code of a reason: ``"too_large: ..."`` -> ``"too_large"`` (``""`` for ``""``)."""
    return reason.split(":", 1)[0].strip() if reason else ""


class ImageRejected(ValueError):
    """A file refused by :func:`decode_image_file` (or by the pre-filter's quality rules).

    Attributes:
        reason: ``"<code>: <human text>"``, code in ``prefilter.REASON_CODES``.
        info: what was read before the refusal: ``original_size`` ((width, height) from the header, None when
            none could be read) and ``scores`` (``aspect``, ``animated`` when measured); empty when not from
            decoding.
    """

    def __init__(self, reason: str, info: dict[str, Any] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.info: dict[str, Any] = info if info is not None else {}

    @property
    def code(self) -> str:
        """The reason's code (``"too_large"``, ``"truncated"``, ...)."""
        return reason_code(self.reason)


def decode_image_file(
    data: bytes,
    *,
    max_bytes: float,
    max_pixels: int,
    max_side: int,
    min_side: int = 1,
    max_aspect: float = math.inf,
    name: str = "",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode untrusted image bytes safely: the pre-filter's header checks and decoding, no quality rules.

    Refused without decoding pixels: empty data, more than ``max_bytes``, a format outside
    :data:`ACCEPTED_FORMATS`, a header declaring more than ``max_pixels`` (or more than Pillow's own guard), a
    shorter side below ``min_side``, a side ratio above ``max_aspect``. Then the first frame is decoded to 8-bit
    RGB (alpha composited over white, 16-bit scaled), the longest side capped at ``max_side`` and the EXIF
    orientation applied (the conversions are in the module docstring).

    Args:
        data: the file's bytes, any format.
        max_bytes: largest accepted file, bytes.
        max_pixels: largest accepted width x height declared by the header.
        max_side: longest side of the result, pixels (area downscale above it, aspect ratio kept).
        min_side: smallest accepted shorter side, pixels.
        max_aspect: largest accepted longest/shortest side ratio.
        name: the file's name, only used in messages.

    Returns:
        (HxWx3 uint8 RGB, info) with info ``original_size`` ((width, height) declared by the header, before EXIF
        orientation), ``format`` (Pillow's name) and ``scores`` (``aspect``; ``animated`` 1.0 when frames after
        the first were dropped).

    Raises:
        ImageRejected: the reason, ``"<code>: <text>"`` with code ``empty``, ``too_large``, ``not_an_image``,
            ``truncated``, ``corrupt``, ``unsupported``, ``too_small`` or ``aspect``; its ``info`` holds what
            was read before. Nothing else (``MemoryError`` aside).
    """
    info: dict[str, Any] = {"original_size": None, "format": None, "scores": {}}
    try:
        rgb = _decode(
            bytes(data),
            max_bytes=max_bytes,
            max_pixels=max_pixels,
            max_side=max_side,
            min_side=min_side,
            max_aspect=max_aspect,
            name=name,
            info=info,
        )
    except ImageRejected as rejection:
        rejection.info = info
        raise
    except MemoryError:
        raise
    except Exception as exc:  # any decoder failure is the file's fault
        raise ImageRejected(reason_for_exception(exc), info) from exc
    return rgb, info


def _decode(
    data: bytes,
    *,
    max_bytes: float,
    max_pixels: int,
    max_side: int,
    min_side: int,
    max_aspect: float,
    name: str,
    info: dict[str, Any],
) -> np.ndarray:
    """Header checks, then pixels: HxWx3 uint8 RGB, capped and oriented. Fills ``info`` as it reads."""
    if not data:
        raise ImageRejected("empty: zero bytes")
    if len(data) > max_bytes:
        raise ImageRejected(
            f"too_large: file is {len(data):,} bytes > {max_bytes:,.0f} bytes ({max_bytes / 2**20:g} MiB)"
        )

    try:
        img = Image.open(io.BytesIO(data), formats=_accepted_formats())
    except Image.DecompressionBombError as exc:
        # Pillow's own guard (2 x Image.MAX_IMAGE_PIXELS) fired while reading the header: nothing was decoded.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"{int(found.group(1)):.1e} px" if found else "too many pixels"
        raise ImageRejected(
            f"too_large: header declares {declared} > {max_pixels:.1e} (Pillow refused it)"
        ) from None
    except UnidentifiedImageError:
        head = data[:12]
        label = f" {name!r}" if name else ""
        raise ImageRejected(
            f"not_an_image: no accepted format ({', '.join(ACCEPTED_FORMATS)}) recognises{label}"
            f" ({len(data)} bytes, starting {head!r})"
        ) from None

    with img:
        width, height = img.size
        info["original_size"] = (width, height)
        info["format"] = img.format
        # Refuse on the header alone: Image.open is lazy, no pixel has been decoded yet.
        if width <= 0 or height <= 0:
            raise ImageRejected(f"corrupt: header declares {width}x{height}")
        if width * height > max_pixels:
            raise ImageRejected(
                f"too_large: header declares {width}x{height} ({width * height:.1e} px > {max_pixels:.1e})"
            )
        if min(width, height) < min_side:
            raise ImageRejected(f"too_small: {width}x{height} < {min_side}")
        aspect = max(width, height) / min(width, height)
        info["scores"]["aspect"] = float(aspect)
        if aspect > max_aspect:
            raise ImageRejected(f"aspect: {aspect:.2f} > {max_aspect:g}")

        try:
            if getattr(img, "is_animated", False):
                info["scores"]["animated"] = 1.0
                img.seek(0)
        except Exception:  # a broken later frame does not spoil the first one
            img.seek(0)

        scale = min(1.0, max_side / max(width, height))
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        if scale < 1.0 and img.format in ("JPEG", "MPO"):
            img.draft(None, target)  # let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the target
        img.load()
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            # Someone flipped Pillow's global switch, so load() pads truncated data with grey instead of raising.
            _check_complete(data, img.format)
        orientation = _orientation(img)
        pixels = _to_rgb_or_premultiplied(img)

    if pixels.shape[1] != target[0] or pixels.shape[0] != target[1]:
        interpolation = cv2.INTER_AREA if pixels.shape[1] > target[0] else cv2.INTER_CUBIC
        pixels = cv2.resize(pixels, target, interpolation=interpolation)
    rgb = _flatten(pixels)
    if orientation in _ORIENTATION:
        rgb = np.asarray(Image.fromarray(rgb).transpose(_ORIENTATION[orientation]))
    return np.ascontiguousarray(rgb)


def _accepted_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # unreadable EXIF: keep the stored orientation rather than lose the image
        return 1


def _check_complete(data: bytes, fmt: str | None) -> None:
    """Structural end-of-data check, used only when Pillow was told to accept truncated files."""
    if fmt in ("JPEG", "MPO") and not _jpeg_has_eoi(data):
        raise ImageRejected("truncated: JPEG data ends before its end-of-image marker")
    if fmt == "PNG" and b"IEND" not in data:
        raise ImageRejected("truncated: PNG data ends before its IEND chunk")


def _jpeg_has_eoi(data: bytes) -> bool:
    """Walk the marker segments to the first scan (skipping EXIF thumbnails), then look for EOI after it."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return True  # not a marker where one should be: leave the verdict to the decoder
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
        elif marker == 0xDA:  # start of scan: entropy-coded data stuffs 0xFF as FF 00, so FF D9 is the end
            return data.find(b"\xff\xd9", i + 2) >= 0
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return False


def _to_rgb_or_premultiplied(img: Image.Image) -> np.ndarray:
    """Full-resolution uint8 pixels: HxWx3 RGB, HxW grey, or HxWx4 premultiplied RGBa when there is alpha."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _scale_high_depth(np.asarray(img), mode)
    has_alpha = "A" in mode or "a" in mode or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img if mode in ("RGBA", "RGBa") else img.convert("RGBA")
            return np.asarray(rgba if rgba.mode == "RGBa" else rgba.convert("RGBa"))
        if mode == "L":
            return np.asarray(img)
        return np.asarray(img if mode == "RGB" else img.convert("RGB"))
    except ValueError as exc:  # Pillow has no conversion from this mode
        raise ImageRejected(f"unsupported: pixel mode {mode} ({exc})") from None


def _scale_high_depth(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit (or 32-bit int / float) grey to uint8 by scaling, never clipping the range away."""
    if mode == "F":
        v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = 1.0 if v.max(initial=0.0) <= 1.0 else (255.0 if v.max(initial=0.0) <= 255.0 else 65535.0)
        return np.clip(np.rint(v * (255.0 / peak)), 0, 255).astype(np.uint8)
    v = values.astype(np.int64)
    if mode == "I" and v.max(initial=0) <= 255 and v.min(initial=0) >= 0:
        return v.astype(np.uint8)  # an 8-bit image stored in a 32-bit container
    v = np.clip(v, 0, 65535)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _flatten(pixels: np.ndarray) -> np.ndarray:
    """HxWx3 RGB from grey (stacked) or premultiplied RGBa (composited over white)."""
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.shape[2] == 4:
        alpha = pixels[:, :, 3:4].astype(np.int16)
        # Premultiplied colour over white: c * a + 255 * (1 - a) = c_premultiplied + 255 - a.
        return np.clip(pixels[:, :, :3].astype(np.int16) + 255 - alpha, 0, 255).astype(np.uint8)
    return pixels


def reason_for_exception(exc: Exception) -> str:
    """The reason for an exception raised while reading or decoding: ``too_large``, ``truncated`` or ``corrupt``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 200:
        text = text[:200] + "..."
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too_large: {text}"
    if "truncated" in text.lower():
        return f"truncated: {text}"
    return f"corrupt: {type(exc).__name__}: {text}"
