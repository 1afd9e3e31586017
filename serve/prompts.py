"""One prompt of a request, JSON form, checked against the image it points into: points with labels, a box, a
mask PNG, text, any mix; the result is the decomposition API's normalized prompt, or a 422 that says what is wrong.

The JSON form: ``{"points": [[x, y, label], ...], "box": [x0, y0, x1, y1], "mask": "<base64 PNG>", "text": "..."}``,
pixels of the uploaded image (as displayed: EXIF orientation applied), label 1 positive and 0 negative, the box
half-open. Fractional coordinates are allowed: points and the box's start are floored, the box's end is rounded up.
"""

from __future__ import annotations

import math
from typing import Any

from reflade.engine.decompose import PromptError, validate_prompt_for_image
from reflade.engine.schema import GRANULARITIES
from reflade.serve.errors import ApiError, Limits, short, type_name
from reflade.serve.uploads import decode_mask

__all__ = ["PROMPT_FIELDS", "parse_prompt"]

PROMPT_FIELDS: tuple[str, ...] = ("points", "box", "mask", "text", "granularity")
"""Keys of a prompt object (``granularity``, ``"fine"`` or ``"coarse"``, defaults to ``"fine"``)."""


def parse_prompt(
    obj: Any, height: int, width: int, limits: Limits, *, where: str = "prompt"
) -> dict[str, Any]:
    """One prompt, JSON form, checked against an image of ``height`` x ``width`` pixels.

    Args:
        obj: ``{"points": [[x, y, label], ...], "box": [x0, y0, x1, y1], "mask": ..., "text": "..."}``, any mix
            (plus ``granularity``); the mask is a base64 PNG string, or the PNG's bytes (a multipart file). A
            mask PNG with a varying alpha channel is read from its alpha, otherwise from its grey level, >= 128
            inside.
        height, width: the image's size, pixels.
        limits: ``max_text``, ``max_points`` and ``max_bytes`` (for the mask).
        where: how messages name this prompt (``prompts[2]``).

    Returns:
        The normalized prompt in the sample format: ``type`` derived from the parts given (``text+box``),
        ``granularity``, ``points``, ``box``, ``mask`` (HxW bool array or None), ``text``.

    Raises:
        ApiError: 422 with code ``invalid_prompt`` (shapes, types, a point or box outside the image),
            ``empty_prompt``, ``text_too_long`` or ``invalid_mask`` (undecodable, of another size, or empty); 413 /
            400 for a mask string over the byte limit or not base64.
    """
    if not isinstance(obj, dict):
        raise ApiError(
            422,
            "invalid_prompt",
            f"{where} must be an object with some of {', '.join(PROMPT_FIELDS[:4])}, got {type_name(obj)}",
        )
    unknown = sorted(str(k) for k in obj if k not in PROMPT_FIELDS)
    if unknown:
        raise ApiError(
            422, "invalid_prompt", f"{where} has unknown fields {unknown} (known: {', '.join(PROMPT_FIELDS)})"
        )
    prompt: dict[str, Any] = {}
    if obj.get("points") not in (None, []):
        prompt["points"] = _points(obj["points"], where, limits.max_points)
    if obj.get("box") is not None:
        prompt["box"] = _box(obj["box"], where)
    text = obj.get("text")
    if text is not None:
        if not isinstance(text, str):
            raise ApiError(422, "invalid_prompt", f"{where}.text must be a string, got {type_name(text)}")
        text = text.strip()
        if len(text) > limits.max_text:
            raise ApiError(
                422,
                "text_too_long",
                f"{where}.text has {len(text)} characters, at most {limits.max_text} are allowed",
            )
        if text:
            prompt["text"] = text
    if obj.get("mask") is not None:
        prompt["mask"] = decode_mask(obj["mask"], height, width, limits, where)
    granularity = obj.get("granularity")
    if granularity is not None:
        if granularity not in GRANULARITIES:
            raise ApiError(
                422,
                "invalid_prompt",
                f"{where}.granularity is {granularity!r}: one of {', '.join(repr(g) for g in GRANULARITIES)}",
            )
        prompt["granularity"] = granularity
    if not any(k in prompt for k in ("points", "box", "mask", "text")):
        raise ApiError(
            422, "empty_prompt", f"{where} is empty: give at least one of points, a box, a mask or text"
        )
    try:
        return validate_prompt_for_image(prompt, height, width)
    except PromptError as exc:
        raise ApiError(422, "invalid_prompt", f"{where}: {exc}") from None


def _points(value: Any, where: str, max_points: int) -> list[list[int]]:
    shape = f"{where}.points must be [[x, y, label], ...] with label 1 (positive) or 0 (negative)"
    if not isinstance(value, list):
        raise ApiError(422, "invalid_prompt", f"{shape}, got {type_name(value)}")
    if len(value) > max_points:
        raise ApiError(
            422, "invalid_prompt", f"{where} has {len(value)} points, at most {max_points} are allowed"
        )
    points = []
    for i, point in enumerate(value):
        if not isinstance(point, (list, tuple)) or len(point) != 3:
            raise ApiError(422, "invalid_prompt", f"{shape}; point {i} is {short(point)}")
        x, y, label = point
        if isinstance(label, bool) or label not in (0, 1):
            raise ApiError(422, "invalid_prompt", f"{shape}; point {i} has label {short(label)}")
        points.append(
            [
                math.floor(_number(x, f"{where}.points[{i}] x")),
                math.floor(_number(y, f"{where}.points[{i}] y")),
                int(label),
            ]
        )
    return points


def _box(value: Any, where: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ApiError(
            422,
            "invalid_prompt",
            f"{where}.box must be [x0, y0, x1, y1] in pixels (half-open), got {short(value)}",
        )
    x0, y0, x1, y1 = (_number(v, f"{where}.box[{i}]") for i, v in enumerate(value))
    return [math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)]


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(422, "invalid_prompt", f"{name} must be a finite number of pixels, got {short(value)}")
    return value
