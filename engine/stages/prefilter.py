"""Data engine stage 1, the pre-filter: decode raw bytes safely, normalise them, reject unsuitable images.

Classical rules only (no model weights). For each input file:

1. Refuse without decoding pixels: empty files, files over ``max_file_mb``, unknown formats, headers that declare
   more than ``max_pixels`` (read from the lazily opened header, before ``load()``), a shorter side below
   ``min_side``, a side ratio above ``max_aspect``.
2. Decode (the first frame of an animation), convert to 8-bit RGB, cap the longest side at ``max_side`` (area
   downscale, aspect ratio kept), apply the EXIF orientation.
3. Measure, then reject near-constant, grayscale and blurry images.
4. Hash (64-bit pHash) so that near-duplicates can be found (:func:`find_near_duplicates`).

Steps 1 and 2 are :func:`decode_image_file`, public so that other readers of untrusted bytes (the serving API)
share them without the quality rules; it raises :class:`ImageRejected`. Every rejection is a reason
``"<code>: <human text>"``; :func:`reason_code` extracts the code, one of
:data:`REASON_CODES`. Nothing raised while reading or decoding escapes (``MemoryError`` excepted: with pixel counts
capped, running out of memory means the worker is starved, not that the file is bad, so the task should fail and
be retried rather than quarantine a healthy image).

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

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import cv2
import imagehash
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from reflade.engine.config import EngineConfig

__all__ = [
    "ACCEPTED_FORMATS",
    "REASON_CODES",
    "Decoded",
    "ImageRejected",
    "PreFilter",
    "decode_and_check",
    "decode_image_file",
    "find_near_duplicates",
    "laplacian_sharpness",
    "perceptual_hash",
    "reason_code",
]

REASON_CODES: frozenset[str] = frozenset(
    {
        "empty",  # zero bytes
        "too_large",  # file over max_file_mb, or header over max_pixels: refused before decoding
        "not_an_image",  # no accepted format recognises the bytes
        "truncated",  # the data ends before the pixels do
        "corrupt",  # any other failure to read or decode
        "unsupported",  # decoded, but in a pixel mode that has no RGB conversion
        "too_small",  # shorter side below min_side
        "aspect",  # longest/shortest side above max_aspect
        "near_constant",  # grey-level std below min_std
        "grayscale",  # mean HSV saturation below min_saturation
        "blurry",  # variance of the Laplacian at 512 px below min_sharpness
        "duplicate_of",  # within dup_hamming of an earlier kept image (text: its source_id)
    }
)
"""Every code a reason may start with."""

ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")
"""Pillow formats tried on the bytes (those this Pillow build lacks are skipped)."""

SHARPNESS_SIDE = 512
"""Longest side (pixels) of the grey image the Laplacian variance is measured on, so the score ignores resolution."""

_PNG_COMPRESS_LEVEL = 3  # zlib level: 6 (Pillow's default) is ~3x slower for ~8% smaller files at 1024 px
_U64_MASK = (1 << 64) - 1
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


@dataclass
class Decoded:
    """The pre-filter's verdict on one file.

    Attributes:
        ok: True when the image is kept.
        reason: ``"<code>: <text>"`` when rejected (code in :data:`REASON_CODES`), None when kept.
        image_png: RGB 8-bit PNG, EXIF orientation applied, longest side capped at ``max_side``; also set for
            images rejected after decoding (for audit), None when rejected before.
        width, height: of ``image_png``, pixels (0 when rejected before decoding).
        original_size: (width, height) declared by the file's header, before EXIF orientation; None when no
            header could be read.
        scores: what was measured: ``sharpness`` (Laplacian variance at 512 px), ``saturation`` (0-1), ``std``
            (grey levels 0-255), ``aspect`` (longest/shortest side), ``animated`` (1.0 when the file has frames
            after the first, which are dropped).
        phash: 64-bit perceptual hash of the decoded image, None when not decoded.
    """

    ok: bool
    reason: str | None = None
    image_png: bytes | None = None
    width: int = 0
    height: int = 0
    original_size: tuple[int, int] | None = None
    scores: dict[str, float] = field(default_factory=dict)
    phash: int | None = None


def reason_code(reason: str) -> str:
    """The machine-friendly code of a reason: ``"too_large: ..."`` -> ``"too_large"`` (``""`` for ``""``)."""
    return reason.split(":", 1)[0].strip() if reason else ""


class ImageRejected(ValueError):
    """A file refused by :func:`decode_image_file` (or by the pre-filter's quality rules).

    Attributes:
        reason: ``"<code>: <human text>"``, code in :data:`REASON_CODES`.
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


def decode_and_check(data: bytes, cfg: EngineConfig, name: str = "") -> Decoded:
    """Decode one raw file, normalise it and apply the stage-1 rules. Never raises (``MemoryError`` aside).

    Args:
        data: the file's bytes, any format.
        cfg: thresholds (``max_side``, ``min_side``, ``max_pixels``, ``max_file_mb``, ``max_aspect``,
            ``min_saturation``, ``min_std``, ``min_sharpness``).
        name: the file's name or source id, only used in messages.

    Returns:
        A :class:`Decoded`; ``ok`` False with a reason when the file is rejected. Near-duplicates are not judged
        here (one file at a time): see :func:`find_near_duplicates` and :class:`PreFilter`.
    """
    result = Decoded(ok=False)
    try:
        rgb, info = decode_image_file(
            data,
            max_bytes=cfg.max_file_mb * 1024 * 1024,
            max_pixels=cfg.max_pixels,
            max_side=cfg.max_side,
            min_side=cfg.min_side,
            max_aspect=cfg.max_aspect,
            name=name,
        )
    except ImageRejected as rejection:
        _record(result, rejection.info)
        result.reason = rejection.reason
        return result
    _record(result, info)
    try:
        _measure(rgb, cfg, result)
    except ImageRejected as rejection:
        result.ok = False
        result.reason = rejection.reason
    except MemoryError:
        raise
    except Exception as exc:  # a failure while measuring is the file's fault too: quarantine, never crash
        result.ok = False
        result.reason = _reason_for_exception(exc)
    return result


def _record(result: Decoded, info: dict[str, Any]) -> None:
    result.original_size = info.get("original_size")
    result.scores.update(info.get("scores", {}))


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
    orientation applied (see the module docstring).

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
        raise ImageRejected(_reason_for_exception(exc), info) from exc
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


def _measure(rgb: np.ndarray, cfg: EngineConfig, result: Decoded) -> None:
    """Scores, hash and PNG of a decoded image; the quality rules."""
    height, width = rgb.shape[:2]
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    std = float(grey.std())
    saturation = float(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1].mean() / 255.0)
    sharpness = laplacian_sharpness(grey)
    result.scores.update({"std": std, "saturation": saturation, "sharpness": sharpness})
    result.phash = perceptual_hash(rgb)
    result.width, result.height = width, height
    result.image_png = _encode_png(rgb)

    # Possible after capping only when max_aspect exceeds max_side / min_side.
    if min(width, height) < cfg.min_side:
        raise ImageRejected(f"too_small: {width}x{height} after capping < {cfg.min_side}")
    if std < cfg.min_std:
        raise ImageRejected(f"near_constant: std {std:.1f} < {cfg.min_std:g}")
    if saturation < cfg.min_saturation:
        raise ImageRejected(f"grayscale: saturation {saturation:.3f} < {cfg.min_saturation:g}")
    if sharpness < cfg.min_sharpness:
        raise ImageRejected(f"blurry: laplacian variance {sharpness:.1f} < {cfg.min_sharpness:g}")
    result.ok = True


def laplacian_sharpness(grey: np.ndarray) -> float:
    """Variance of the Laplacian of a grey image resized so that its longest side is 512 px.

    Args:
        grey: HxW uint8. Downscaled with area averaging, upscaled with bicubic interpolation.

    Returns:
        The variance (grey levels squared); sharp photos score in the hundreds, heavy blur below ~5.
    """
    h, w = grey.shape[:2]
    scale = SHARPNESS_SIDE / max(h, w)
    if scale != 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC)
    return float(cv2.Laplacian(grey.astype(np.float32), cv2.CV_32F).var())


def perceptual_hash(rgb: np.ndarray) -> int:
    """64-bit DCT perceptual hash (``imagehash.phash``) of an HxWx3 uint8 image, as an unsigned int."""
    bits = imagehash.phash(Image.fromarray(rgb)).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def _encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _reason_for_exception(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 200:
        text = text[:200] + "..."
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too_large: {text}"
    if "truncated" in text.lower():
        return f"truncated: {text}"
    return f"corrupt: {type(exc).__name__}: {text}"


def _popcount(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(values)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[values.view(np.uint8).reshape(*values.shape, 8)].sum(axis=-1, dtype=np.uint8)


def find_near_duplicates(items: list[tuple[str, int]], max_hamming: int) -> dict[str, str]:
    """Near-duplicate images by perceptual hash; the first occurrence is kept.

    Greedy in input order: an item is a duplicate when its hash is within ``max_hamming`` bits of an earlier
    item that was kept (it then maps to the earliest such one); otherwise it is kept. The kept hashes are thus
    pairwise more than ``max_hamming`` bits apart. Exact: every pair is compared, by XOR + popcount over uint64
    arrays in blocks, so a few thousand items take a fraction of a second (the cost grows as n^2 / 2 vectorised
    pair tests; beyond ~100 k items, band the hashes first).

    Args:
        items: (source_id, phash) in input order; phash an unsigned 64-bit int. Repeated source_ids are
            compared like any others but never reported as duplicates of themselves (pass positions as ids
            to tell them apart).
        max_hamming: largest Hamming distance (bits) that still counts as a duplicate.

    Returns:
        {duplicate source_id: kept source_id}.
    """
    n = len(items)
    if n < 2 or max_hamming < 0:
        return {}
    hashes = np.fromiter((int(h) & _U64_MASK for _, h in items), dtype=np.uint64, count=n)
    dup_of = np.full(n, -1, dtype=np.int64)  # index of the kept item each duplicate maps to
    # Rows in blocks against the columns from the block on (~4 M cells per block). Row i is handled only after
    # every earlier row, so its own verdict is final; a kept row claims its unclaimed later neighbours, which
    # thus map to their earliest kept neighbour. Only rows with a neighbour reach the Python loop.
    block = max(1, 4_000_000 // n)
    for start in range(0, n, block):
        stop = min(n, start + block)
        close = _popcount(hashes[start:stop, None] ^ hashes[None, start:]) <= max_hamming
        close &= np.arange(start, n)[None, :] > np.arange(start, stop)[:, None]
        for r in np.flatnonzero(close.any(axis=1)).tolist():
            i = start + r
            if dup_of[i] >= 0:
                continue
            later = np.flatnonzero(close[r]) + start
            dup_of[later[dup_of[later] < 0]] = i

    duplicates: dict[str, str] = {}
    for j in np.flatnonzero(dup_of >= 0).tolist():
        dup_id, kept_id = items[j][0], items[int(dup_of[j])][0]
        if dup_id != kept_id:
            duplicates[dup_id] = kept_id
    return duplicates


def _as_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value.tobytes()
    raise TypeError(f"expected bytes, got {type(value).__name__}")


class PreFilter:
    """Stage 1 as a Ray Data ``map_batches`` callable (one instance per actor or task).

    Input batch: a dict of columns (numpy arrays or lists) with ``source_id`` (str) and ``data`` (bytes; pass an
    object array or a list, since a fixed-width ``S`` array drops trailing NUL bytes). Output: the same batch
    without ``data``, plus ``ok`` (bool), ``reason`` (str, ``""`` when kept), ``image`` (PNG bytes, ``b""`` when not
    decoded), ``width``, ``height`` (int64), ``scores`` (JSON object string), ``phash`` (uint64, 0 when not
    decoded) and, unless already present, ``source_sha256`` (hex sha256 of ``data``; it cannot be computed once
    ``data`` is dropped).

    Near-duplicates are judged within the batch (first kept, later ones rejected as ``duplicate_of: <id>``);
    duplicates across batches need one pass over all hashes with :func:`find_near_duplicates`.
    """

    def __init__(self, cfg: EngineConfig | None = None):
        self.cfg = cfg if cfg is not None else EngineConfig()

    def __call__(self, batch: dict) -> dict:
        data = list(batch["data"])
        n = len(data)
        ids = [str(s) for s in batch["source_id"]] if "source_id" in batch else [str(i) for i in range(n)]
        results: list[Decoded] = []
        digests: list[str] = []
        for source_id, value in zip(ids, data, strict=True):
            try:
                raw = _as_bytes(value)
            except TypeError as exc:
                raw = None
                results.append(Decoded(ok=False, reason=f"corrupt: {exc}"))
            else:
                results.append(decode_and_check(raw, self.cfg, name=source_id))
            digests.append(hashlib.sha256(raw or b"").hexdigest())

        # Positions, not source ids, as keys: a batch may repeat an id.
        kept = [(str(k), r.phash) for k, r in enumerate(results) if r.ok and r.phash is not None]
        for dup_pos, kept_pos in find_near_duplicates(kept, self.cfg.dup_hamming).items():
            dup = results[int(dup_pos)]
            dup.ok = False
            dup.reason = f"duplicate_of: {ids[int(kept_pos)]}"

        out = {key: value for key, value in batch.items() if key != "data"}
        out["ok"] = np.array([r.ok for r in results], dtype=bool)
        out["reason"] = _object_array([r.reason or "" for r in results])
        out["image"] = _object_array([r.image_png or b"" for r in results])
        out["width"] = np.array([r.width for r in results], dtype=np.int64)
        out["height"] = np.array([r.height for r in results], dtype=np.int64)
        out["scores"] = _object_array([json.dumps(_finite(r.scores), sort_keys=True) for r in results])
        out["phash"] = np.array([r.phash or 0 for r in results], dtype=np.uint64)
        if "source_sha256" not in out:
            out["source_sha256"] = _object_array(digests)
        return out


def _object_array(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _finite(scores: dict[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if math.isfinite(v) else None) for k, v in scores.items()}
