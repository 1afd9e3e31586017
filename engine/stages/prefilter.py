"""Data engine stage 1, the pre-filter: decode raw bytes safely, normalise them, reject unsuitable images.

Classical rules only (no model weights). For each input file:

1. Refuse without decoding pixels: empty files, files over ``max_file_mb``, unknown formats, headers that declare
   more than ``max_pixels`` (read from the lazily opened header, before ``load()``), a shorter side below
   ``min_side``, a side ratio above ``max_aspect``.
2. Decode (the first frame of an animation), convert to 8-bit RGB, cap the longest side at ``max_side`` (area
   downscale, aspect ratio kept), apply the EXIF orientation.
3. Measure, then reject near-constant, grayscale and blurry images.
4. Hash (64-bit pHash) so that near-duplicates can be found (:func:`find_near_duplicates`).

Steps 1 and 2 are :func:`decode_image_file` (``image_decode.py``, with the conversions it documents), public so
that other readers of untrusted bytes (the serving API) share them without the quality rules; it raises
:class:`ImageRejected`. Every rejection is a reason
``"<code>: <human text>"``; :func:`reason_code` extracts the code, one of
:data:`REASON_CODES`. Nothing raised while reading or decoding escapes (``MemoryError`` excepted: with pixel counts
capped, running out of memory means the worker is starved, not that the file is bad, so the task should fail and
be retried rather than quarantine a healthy image).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import imagehash
import numpy as np
from PIL import Image

from reflade.engine.config import EngineConfig
from reflade.engine.stages.image_decode import (
    ACCEPTED_FORMATS,
    ImageRejected,
    decode_image_file,
    reason_code,
    reason_for_exception,
)

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

SHARPNESS_SIDE = 512
"""Longest side (pixels) of the grey image the Laplacian variance is measured on, so the score ignores resolution."""

_PNG_COMPRESS_LEVEL = 3  # zlib level: 6 (Pillow's default) is ~3x slower for ~8% smaller files at 1024 px
_U64_MASK = (1 << 64) - 1


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
        result.reason = reason_for_exception(exc)
    return result


def _record(result: Decoded, info: dict[str, Any]) -> None:
    result.original_size = info.get("original_size")
    result.scores.update(info.get("scores", {}))


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
