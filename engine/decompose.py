"""One decomposition API for every caller: the :class:`Decomposer` protocol, its input checks and its resizing.

Every implementation (RefLayer in :mod:`reflade.train.pipeline_reflayer`, the weight-free
:class:`~reflade.engine.classical_decomposer.ClassicalDecomposer`) and every caller (eval, serve, the demo, the
benchmarks) meet here::

    layers = decomposer.decompose(images, prompts, kinds, steps=20, guidance=1.0, seeds=0)

- ``images``: a sequence of HxWx3 uint8 RGB arrays, each at its own size.
- ``prompts``: one per image, in the sample format's form (:mod:`reflade.engine.schema`, ``prompts`` struct):
  ``type``, ``granularity``, ``points`` (``[[x, y, label], ...]``), ``box`` (``[x0, y0, x1, y1]`` half-open),
  ``mask`` (PNG bytes, or an HxW array here) and ``text``, every coordinate in that image's pixel frame; missing
  keys default to ``None``.
- ``kinds``: one per image, ``"foreground"`` (the entity's complete layer) or ``"background"`` (the scene with the
  entity removed and filled in; alpha 255 everywhere). The prompt refers to the entity in both cases.
- Returns one HxWx4 uint8 RGBA layer per image, at that image's own size, straight alpha, RGB = 0 where
  alpha = 0.

Everything is checked before any compute (:func:`prepare`): a bad prompt raises :class:`PromptError` naming the
part, a bad kind, image, seed, step count or guidance a ``ValueError`` naming the item. An implementation that
cannot honour a prompt type refuses it there too (the classical decomposer cannot read text).

Resizing in and out lives here only: :func:`resize_image` (area averaging down, bilinear up) takes inputs to a
model's working size, :func:`premultiplied_to_layer` and :func:`resize_layer` take layers back, resampling
premultiplied colour so that the empty pixels' zero colour never bleeds into edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from reflade.engine.schema import GRANULARITIES, KINDS, SchemaError, decode_mask, encode_png, validate_prompt
from reflade.platform.errors import ReportedError

__all__ = [
    "ALPHA_EPS",
    "KINDS",
    "MAX_TEXT_CHARS",
    "Decomposer",
    "DecomposeItem",
    "PromptError",
    "check_kind",
    "normalize_prompt",
    "premultiplied_to_layer",
    "prepare",
    "prompt_mask_array",
    "resize_image",
    "resize_layer",
    "scale_prompt",
    "spatial_parts",
    "validate_prompt_for_image",
]

MAX_TEXT_CHARS = 300
"""Longest prompt text accepted (the sample format's bound)."""
ALPHA_EPS = 0.5 / 255.0
"""Alpha below this is 0 in 8 bits: the colour there is set to 0 (straight alpha, RGB = 0 where alpha = 0)."""

_KEYS = ("type", "granularity", "points", "box", "mask", "text")


class PromptError(ReportedError, ValueError):
    """A prompt cannot be used with an image; the message says which part and why."""


# ---------------------------------------------------------------------------------------------- the protocol
@runtime_checkable
class Decomposer(Protocol):
    """Referring layer decomposition: images and prompts in, one RGBA layer per image out.

    Implementations: :class:`reflade.train.pipeline_reflayer.RefLayerPipeline` (the model, loaded by registry
    reference) and :class:`reflade.engine.classical_decomposer.ClassicalDecomposer` (no weights, CPU).
    """

    name: str
    """What produced the layers, for reports (``reflayer:model/reflayer@3``, ``classical``)."""

    def decompose(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[dict[str, Any]],
        kinds: Sequence[str],
        *,
        steps: int = 20,
        guidance: float = 1.0,
        seeds: int | Sequence[int] = 0,
    ) -> list[np.ndarray]:
        """Decompose the layer each prompt refers to.

        Args:
            images: B arrays HxWx3 uint8 RGB, each at its own size.
            prompts: B prompts in the sample format, in their image's pixel frame.
            kinds: B of ``"foreground"`` / ``"background"``.
            steps: sampling steps (an implementation without sampling ignores it).
            guidance: classifier-free guidance scale, 1 = none (ignored likewise).
            seeds: one seed for every item, or one per item: a seed fixes the item's output.

        Returns:
            B arrays HxWx4 uint8 RGBA, each at its image's size, straight alpha, RGB = 0 where alpha = 0.

        Raises:
            PromptError: a prompt does not fit its image or the implementation (before any compute).
            ValueError: a bad image, kind, seed, steps or guidance (before any compute).
        """
        ...


@dataclass
class DecomposeItem:
    """One checked input of :meth:`Decomposer.decompose`.

    Attributes:
        image: HxWx3 uint8 RGB.
        prompt: the normalized prompt (:func:`normalize_prompt`), a mask as given (PNG bytes or an HxW array).
        kind: ``"foreground"`` or ``"background"``.
        seed: this item's seed.
    """

    image: np.ndarray
    prompt: dict[str, Any]
    kind: str
    seed: int

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


# ---------------------------------------------------------------------------------------------- checks
def check_kind(kind: Any, where: str = "kind") -> str:
    """``kind`` if it is a layer kind of the sample format (:data:`KINDS`), else a ValueError naming it."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"{where} is {kind!r}: a layer kind is one of {', '.join(repr(k) for k in KINDS)}")
    return kind


def _check_image(image: Any, i: int) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"images[{i}] must be an HxWx3 uint8 RGB array, got shape {a.shape} dtype {a.dtype}")
    return a


def _check_sampling(steps: Any, guidance: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or int(steps) < 1:
        raise ValueError(f"steps must be an integer of at least 1, got {steps!r}")
    try:
        g = float(guidance)
    except (TypeError, ValueError):
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}") from None
    if not np.isfinite(g) or g < 0:
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")


def _seed_list(seeds: Any, n: int) -> list[int]:
    def one(s: Any, where: str) -> int:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= int(s) < 2**63:
            raise ValueError(f"{where} must be an integer in [0, 2**63), got {s!r}")
        return int(s)

    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        return [one(seeds, "seeds")] * n
    if not isinstance(seeds, (Sequence, np.ndarray)) or isinstance(seeds, (str, bytes)):
        raise ValueError(f"seeds must be an integer or one integer per image, got {type(seeds).__name__}")
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} images (give one seed, or one per image)")
    return [one(s, f"seeds[{i}]") for i, s in enumerate(seeds)]


def prepare(
    images: Sequence[np.ndarray],
    prompts: Sequence[dict[str, Any]],
    kinds: Sequence[str],
    *,
    steps: int = 20,
    guidance: float = 1.0,
    seeds: int | Sequence[int] = 0,
    refuse_text_only: bool = False,
) -> list[DecomposeItem]:
    """Check every input of a :meth:`Decomposer.decompose` call before any compute.

    Args:
        images, prompts, kinds, steps, guidance, seeds: as :meth:`Decomposer.decompose` takes them.
        refuse_text_only: refuse prompts with no point, box or mask (for an implementation that cannot read text).

    Returns:
        One :class:`DecomposeItem` per image, in order.

    Raises:
        PromptError: a prompt does not fit its image (the message names the item and the part), or is text-only
            with ``refuse_text_only``.
        ValueError: the sequences differ in length, or a bad image, kind, seed, steps or guidance.
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise ValueError(f"images is one {images.shape} array: pass a list of images (one per prompt)")
    for name, seq in (("images", images), ("prompts", prompts), ("kinds", kinds)):
        if isinstance(seq, (str, bytes, dict)) or not isinstance(seq, (Sequence, np.ndarray)):
            raise ValueError(f"{name} must be a list (one entry per image), got {type(seq).__name__}")
    n = len(images)
    if len(prompts) != n or len(kinds) != n:
        raise ValueError(
            f"{n} images, {len(prompts)} prompts and {len(kinds)} kinds: give one of each per image"
        )
    _check_sampling(steps, guidance)
    seed_list = _seed_list(seeds, n)
    items = []
    for i in range(n):
        image = _check_image(images[i], i)
        kind = check_kind(kinds[i], f"kinds[{i}]")
        try:
            p = validate_prompt_for_image(prompts[i], image.shape[0], image.shape[1])
        except PromptError as e:
            raise PromptError(f"prompts[{i}]: {e}") from None
        if refuse_text_only and not spatial_parts(p):
            raise PromptError(
                f"prompts[{i}] is text only ({p['text']!r}): this decomposer reads points, boxes and masks; "
                "give one of them (text may accompany it)"
            )
        items.append(DecomposeItem(image=image, prompt=p, kind=kind, seed=seed_list[i]))
    return items


# ---------------------------------------------------------------------------------------------- prompts
def prompt_mask_array(mask: Any) -> np.ndarray | None:
    """A prompt's mask as HxW bool: PNG bytes (0/255), a bool array, or numbers where non-zero is inside."""
    if mask is None:
        return None
    if isinstance(mask, (bytes, bytearray, memoryview)):
        return decode_mask(bytes(mask))
    a = np.asarray(mask)
    if a.ndim != 2:
        raise PromptError(f"prompt mask must be a 2-D HxW array, got shape {a.shape}")
    return a.astype(bool) if a.dtype == bool else a != 0


def spatial_parts(prompt: dict[str, Any]) -> list[str]:
    """The spatial parts a (normalized) prompt holds: some of ``point``, ``box``, ``mask``."""
    return [
        name
        for name, present in (
            ("point", bool(prompt.get("points"))),
            ("box", prompt.get("box") is not None),
            ("mask", prompt.get("mask") is not None),
        )
        if present
    ]


def normalize_prompt(prompt: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``prompt`` with every key of the sample format present and plain Python values.

    Missing keys become ``None`` (``points`` an empty list, ``granularity`` ``"fine"``); a mask stays as given
    (PNG bytes or an array). A missing ``type`` is inferred from the parts present. An unknown key is an error (it
    is most likely a typo of a known one).

    Raises:
        PromptError: not a dict, unknown keys, points or box not integers.
    """
    if not isinstance(prompt, dict):
        raise PromptError(f"a prompt is a dict with keys {list(_KEYS)}, got {type(prompt).__name__}")
    unknown = sorted(set(prompt) - set(_KEYS))
    if unknown:
        raise PromptError(f"unknown prompt keys {unknown} (known: {list(_KEYS)})")
    p = {k: prompt.get(k) for k in _KEYS}
    p["granularity"] = p["granularity"] or "fine"
    try:
        p["points"] = [[int(v) for v in pt] for pt in (p["points"] if p["points"] is not None else [])]
        p["box"] = None if p["box"] is None else [int(v) for v in p["box"]]
    except (TypeError, ValueError) as e:
        raise PromptError(
            f"points must be [[x, y, label], ...] and box [x0, y0, x1, y1] in pixels: {e}"
        ) from e
    if p["type"] is None:
        # Infer the type from what is there, in the format's canonical order.
        parts = (["text"] if p["text"] else []) + spatial_parts(p)
        p["type"] = "+".join(parts) if parts else None
    return p


def validate_prompt_for_image(prompt: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """Check that a prompt can be used with an image of ``height`` x ``width`` pixels.

    Uses the sample format's own rules (:func:`reflade.engine.schema.validate_prompt`) and adds: an empty prompt
    is refused, and a mask may be an HxW array.

    Returns:
        The normalized prompt (see :func:`normalize_prompt`).

    Raises:
        PromptError: empty prompt, unknown type, a point outside the image, a box not half-open inside it, a mask
            of another size, text longer than 300 characters; the message names the part.
    """
    if height <= 0 or width <= 0:
        raise PromptError(f"image size {width}x{height} is empty")
    p = normalize_prompt(prompt)
    if not p["points"] and p["box"] is None and p["mask"] is None and not p["text"]:
        raise PromptError("empty prompt: give at least one of points, a box, a mask or text")
    if p["type"] is None:
        raise PromptError("prompt has no type")
    if p["granularity"] not in GRANULARITIES:
        raise PromptError(f"prompt granularity {p['granularity']!r} not in {GRANULARITIES}")
    if p["text"] is not None and not isinstance(p["text"], str):
        raise PromptError(f"prompt text must be a string, got {type(p['text']).__name__}")
    if p["text"] is not None and len(p["text"]) > MAX_TEXT_CHARS:
        raise PromptError(f"prompt text of {len(p['text'])} characters (at most {MAX_TEXT_CHARS})")
    mask = p["mask"]
    if mask is not None and not isinstance(mask, (bytes, bytearray, memoryview)):
        m = prompt_mask_array(mask)
        if m.shape != (height, width):
            raise PromptError(
                f"prompt mask is {m.shape[1]}x{m.shape[0]} (width x height), the image is {width}x{height}"
            )
        mask = encode_png(m)  # the format's validator reads PNG bytes
    try:
        validate_prompt({**p, "mask": mask}, width, height)
    except SchemaError as e:
        raise PromptError(str(e).removeprefix("sample ?: ")) from None
    return p


def scale_prompt(prompt: dict[str, Any], src: tuple[int, int], dst: tuple[int, int]) -> dict[str, Any]:
    """A normalized prompt in the frame of an image of size ``src`` (H, W) moved to the frame ``dst`` (H, W).

    Points go to the pixel holding their centre, a box keeps covering at least one pixel, a mask is resized by
    nearest neighbour (as HxW bool). Text is unchanged.
    """
    (sh, sw), (dh, dw) = src, dst
    if (sh, sw) == (dh, dw):
        return dict(prompt)
    fy, fx = dh / sh, dw / sw
    p = dict(prompt)
    p["points"] = [
        [min(dw - 1, int((x + 0.5) * fx)), min(dh - 1, int((y + 0.5) * fy)), label]
        for x, y, label in prompt.get("points") or []
    ]
    if prompt.get("box") is not None:
        x0, y0, x1, y1 = prompt["box"]
        nx0, ny0 = min(dw - 1, int(x0 * fx)), min(dh - 1, int(y0 * fy))
        p["box"] = [nx0, ny0, max(nx0 + 1, min(dw, round(x1 * fx))), max(ny0 + 1, min(dh, round(y1 * fy)))]
    m = prompt_mask_array(prompt.get("mask"))
    if m is not None:
        p["mask"] = cv2.resize(m.astype(np.uint8), (dw, dh), interpolation=cv2.INTER_NEAREST).astype(bool)
    return p


# ---------------------------------------------------------------------------------------------- resizing
def resize_image(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an HxW or HxWxC array (uint8 or float32): area averaging when shrinking, bilinear otherwise."""
    if a.shape[:2] == (height, width):
        return a
    shrink = height <= a.shape[0] and width <= a.shape[1]
    return cv2.resize(a, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def premultiplied_to_layer(premult: np.ndarray, height: int, width: int) -> np.ndarray:
    """A layer as premultiplied float RGBA in [0, 1] at any size -> HxWx4 uint8 straight RGBA at (height, width).

    Resamples premultiplied colour and alpha (resampling straight colour would bleed the empty pixels' 0 into
    the edges), then divides; RGB = 0 where the 8-bit alpha is 0.

    Args:
        premult: hxwx4 float, colour premultiplied by alpha.
        height, width: the output size, pixels.
    """
    p = resize_image(np.ascontiguousarray(premult, dtype=np.float32), height, width)
    alpha = np.clip(p[..., 3], 0.0, 1.0)
    a8 = np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8)
    rgb = np.clip(p[..., :3] / np.maximum(alpha, ALPHA_EPS)[..., None], 0.0, 1.0)
    rgb8 = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    rgb8[a8 == 0] = 0
    return np.dstack([rgb8, a8])


def resize_layer(rgba: np.ndarray, height: int, width: int) -> np.ndarray:
    """HxWx4 uint8 straight RGBA -> (height, width), resampled premultiplied (see :func:`premultiplied_to_layer`)."""
    if rgba.shape[:2] == (height, width):
        return rgba
    f = rgba.astype(np.float32) / 255.0
    f[..., :3] *= f[..., 3:4]
    return premultiplied_to_layer(f, height, width)
