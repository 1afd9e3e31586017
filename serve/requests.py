"""From an HTTP request's parts to a checked :class:`DecomposeRequest`, or an :class:`ApiError` that says why not.

Pure functions, no web framework: the ingress hands over what it received (a parsed JSON body, or multipart
fields and files) and gets back either a request whose every part the decomposition API will accept, or an
error with an HTTP status, a short code and a message for a person. Bad input is never a 500:

======  ==============================================================================================
status  codes
======  ==============================================================================================
400     ``invalid_json`` (the body is not a JSON object), ``invalid_base64``, ``empty_image``,
        ``truncated_image``, ``corrupt_image``
413     ``too_large``: over ``max_bytes``, or a header declaring more than ``max_pixels`` (both refused
        before any pixel is decoded)
415     ``not_an_image``, ``unsupported_image``
422     ``missing_field``, ``unknown_field``, ``invalid_field``, ``unknown_kind``, ``invalid_steps``,
        ``too_many_prompts``, ``empty_prompt``, ``text_too_long``, ``invalid_mask``, ``invalid_prompt``
======  ==============================================================================================

Images are read by :mod:`reflade.serve.uploads` (the data engine pre-filter's header checks and decoding, none of
its quality rules); prompts by :mod:`reflade.serve.prompts` (the decomposition API's own validation). ``ApiError``
and ``Limits`` live in :mod:`reflade.serve.errors` and are re-exported here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from reflade.engine.decompose import KINDS
from reflade.serve.errors import ApiError, Limits, short, type_name
from reflade.serve.prompts import PROMPT_FIELDS, parse_prompt
from reflade.serve.uploads import decode_base64, decode_upload

__all__ = [
    "JSON_FIELDS",
    "FORM_FIELDS",
    "PROMPT_FIELDS",
    "RESPONSES",
    "ApiError",
    "DecomposeRequest",
    "Limits",
    "decode_base64",
    "decode_upload",
    "parse_form_request",
    "parse_json_request",
    "parse_prompt",
]

RESPONSES: tuple[str, ...] = ("png", "json")
"""Answers ``POST /v1/decompose`` can give; the first is the default."""
JSON_FIELDS: tuple[str, ...] = (
    "image",
    "prompt",
    "prompts",
    "kind",
    "model",
    "steps",
    "seed",
    "guidance",
    "response",
)
"""Keys of a JSON request body."""
FORM_FIELDS: tuple[str, ...] = ("prompt", "prompts", "box", "points", "text", *JSON_FIELDS[3:])
"""Text fields of a multipart request (the image and the mask come as files)."""

_MAX_MODEL_CHARS = 200


@dataclass(eq=False)
class DecomposeRequest:
    """A checked decomposition request: every part is accepted by :meth:`reflade.engine.decompose.prepare`.

    Attributes:
        image: HxWx3 uint8 RGB, EXIF orientation applied, alpha composited over white.
        prompts: one or more normalized prompts (:func:`reflade.engine.decompose.normalize_prompt`) in the image's
            pixel frame; a mask is an HxW bool array.
        kind: ``"foreground"`` or ``"background"``, for every prompt.
        model: registry reference, alias or ``classical`` as the client wrote it; None for the service's default.
        steps: sampling steps in ``[1, Limits.max_steps]``; None for the model's default.
        seed: in ``[0, 2**63)``; None to let the service pick one (and report it).
        guidance: classifier-free guidance scale >= 0; None for the model's default.
        response: the answer's form, one of the endpoint's responses (``"png"`` or ``"json"`` by default).
    """

    image: np.ndarray
    prompts: list[dict[str, Any]]
    kind: str = "foreground"
    model: str | None = None
    steps: int | None = None
    seed: int | None = None
    guidance: float | None = None
    response: str = "png"


# ---------------------------------------------------------------------------------------------- requests
def parse_json_request(
    body: Any, limits: Limits, *, responses: tuple[str, ...] = RESPONSES
) -> DecomposeRequest:
    """A JSON request: ``{"image": "<base64>", "prompt": {...} | "prompts": [...], "kind": ..., "model": ...,
    "steps": ..., "seed": ..., "guidance": ..., "response": ...}``.

    Args:
        body: the parsed JSON body (or its raw ``bytes`` / ``str``, parsed here).
        limits: what one request may ask for.
        responses: the answers this endpoint gives; the first is the default.

    Raises:
        ApiError: 400 when the body is not a JSON object or the image not base64; the image's and prompts' errors
            (see :func:`decode_upload`, :func:`parse_prompt`); 422 for unknown or missing fields, too many
            prompts, an unknown kind, steps out of range, or a bad seed, guidance, model or response.
    """
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(
            400,
            "invalid_json",
            f"the request body must be a JSON object with 'image' and 'prompt', got {type_name(body)}",
        )
    _refuse_unknown(body, JSON_FIELDS, "request field")
    options = _options(body, limits, responses, from_form=False)
    prompt_objs = _prompt_objects(body.get("prompt"), body.get("prompts"), limits)
    if body.get("image") is None:
        raise ApiError(422, "missing_field", "no image: give 'image', the image file's bytes in base64")
    image = decode_upload(decode_base64(body["image"], field="image", max_bytes=limits.max_bytes), limits)
    return _request(image, prompt_objs, options, limits)


def parse_form_request(
    fields: dict[str, str],
    image_bytes: bytes | None,
    mask_bytes: bytes | None,
    limits: Limits,
    *,
    responses: tuple[str, ...] = RESPONSES,
) -> DecomposeRequest:
    """A multipart request: the image (and a mask PNG) as files, the rest as text fields.

    The prompt is either the ``prompt`` field (a JSON object, as in :func:`parse_prompt`; or ``prompts``, a JSON
    list) or separate fields: ``box="x0,y0,x1,y1"``, ``points="x,y,label;x,y,label"``, ``text`` and the mask
    file. ``steps``, ``seed`` and ``guidance`` are numbers written as text; an empty field counts as absent.

    Raises:
        ApiError: as :func:`parse_json_request`; 422 also when both forms of the prompt are given.
    """
    fields = {k: v for k, v in dict(fields).items() if not (isinstance(v, str) and not v.strip())}
    _refuse_unknown(fields, FORM_FIELDS, "form field")
    for key, value in fields.items():
        if not isinstance(value, str):
            raise ApiError(422, "invalid_field", f"form field {key!r} must be text, got {type_name(value)}")
    options = _options(fields, limits, responses, from_form=True)
    separate = [k for k in ("box", "points", "text") if k in fields] + (["mask file"] if mask_bytes else [])
    if "prompt" in fields or "prompts" in fields:
        if separate:
            raise ApiError(
                422,
                "invalid_field",
                f"give the prompt either as the JSON field 'prompt' or as box/points/text/mask, not both "
                f"(also got {', '.join(separate)})",
            )
        prompt_objs = _prompt_objects(_json_field(fields, "prompt"), _json_field(fields, "prompts"), limits)
    else:
        prompt: dict[str, Any] = {}
        if "box" in fields:
            prompt["box"] = _numbers(fields["box"], "box", "x0,y0,x1,y1")
        if "points" in fields:
            prompt["points"] = [
                _numbers(part, "points", "x,y,label;x,y,label", count=3)
                for part in fields["points"].split(";")
                if part.strip()
            ]
        if "text" in fields:
            prompt["text"] = fields["text"]
        if mask_bytes:
            prompt["mask"] = bytes(mask_bytes)
        prompt_objs = _prompt_objects(prompt, None, limits)
    if not image_bytes:
        raise ApiError(
            422, "missing_field", "no image: send the image file as the multipart file field 'image'"
        )
    image = decode_upload(image_bytes, limits)
    return _request(image, prompt_objs, options, limits)


def _request(
    image: np.ndarray, prompt_objs: list[tuple[str, Any]], options: dict[str, Any], limits: Limits
) -> DecomposeRequest:
    height, width = image.shape[:2]
    prompts = [parse_prompt(obj, height, width, limits, where=where) for where, obj in prompt_objs]
    return DecomposeRequest(image=image, prompts=prompts, **options)


def _prompt_objects(prompt: Any, prompts: Any, limits: Limits) -> list[tuple[str, Any]]:
    """(name, raw prompt) of a request's prompts, counted and shaped (each checked once the image is known)."""
    if prompt is not None and prompts is not None:
        raise ApiError(
            422, "invalid_field", "give either 'prompt' (one object) or 'prompts' (a list), not both"
        )
    if prompt is None and prompts is None:
        raise ApiError(
            422,
            "missing_field",
            "no prompt: give 'prompt', an object with some of points, box, mask and text",
        )
    if prompt is not None:
        if isinstance(prompt, list):
            raise ApiError(422, "invalid_field", "'prompt' is one object; send a list as 'prompts'")
        return [("prompt", prompt)]
    if not isinstance(prompts, list):
        raise ApiError(
            422, "invalid_field", f"'prompts' must be a list of prompt objects, got {type_name(prompts)}"
        )
    if not prompts:
        raise ApiError(422, "missing_field", "'prompts' is empty: give at least one prompt")
    if len(prompts) > limits.max_prompts:
        raise ApiError(
            422,
            "too_many_prompts",
            f"{len(prompts)} prompts in one request, at most {limits.max_prompts} are allowed",
        )
    return [(f"prompts[{i}]", p) for i, p in enumerate(prompts)]


def _options(
    values: dict[str, Any], limits: Limits, responses: tuple[str, ...], *, from_form: bool
) -> dict[str, Any]:
    """kind, model, steps, seed, guidance and response, checked (form fields arrive as text)."""
    kind = values.get("kind")
    kind = "foreground" if kind is None else kind
    if kind not in KINDS:
        raise ApiError(
            422,
            "unknown_kind",
            f"kind {short(kind)} is not a layer kind: one of {', '.join(repr(k) for k in KINDS)}",
        )
    model = values.get("model")
    if model is not None:
        if (
            not isinstance(model, str)
            or not model.strip()
            or len(model) > _MAX_MODEL_CHARS
            or not model.isprintable()
        ):
            raise ApiError(
                422,
                "invalid_field",
                f"model must be a registry reference (model/reflayer@production), a version or 'classical', "
                f"got {short(model)}",
            )
        model = model.strip()
    steps = _integer(values.get("steps"), "steps", from_form)
    if steps is not None and not 1 <= steps <= limits.max_steps:
        raise ApiError(422, "invalid_steps", f"steps must be from 1 to {limits.max_steps}, got {steps}")
    seed = _integer(values.get("seed"), "seed", from_form)
    if seed is not None and not 0 <= seed < 2**63:
        raise ApiError(422, "invalid_field", f"seed must be an integer in [0, 2**63), got {seed}")
    guidance = values.get("guidance")
    if guidance is not None:
        if from_form:
            try:
                guidance = float(guidance)
            except ValueError:
                pass
        if (
            isinstance(guidance, bool)
            or not isinstance(guidance, (int, float))
            or not math.isfinite(guidance)
        ):
            raise ApiError(
                422, "invalid_field", f"guidance must be a finite number >= 0, got {short(guidance)}"
            )
        if guidance < 0:
            raise ApiError(422, "invalid_field", f"guidance must be >= 0, got {guidance}")
        guidance = float(guidance)
    response = values.get("response")
    response = responses[0] if response is None else response
    if response not in responses:
        raise ApiError(
            422,
            "invalid_field",
            f"response {short(response)} is not one of {', '.join(repr(r) for r in responses)}",
        )
    return {
        "kind": kind,
        "model": model,
        "steps": steps,
        "seed": seed,
        "guidance": guidance,
        "response": response,
    }


def _integer(value: Any, name: str, from_form: bool) -> int | None:
    if value is None:
        return None
    if from_form and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        code = "invalid_steps" if name == "steps" else "invalid_field"
        raise ApiError(422, code, f"{name} must be an integer, got {short(value)}")
    return value


def _json_field(fields: dict[str, str], name: str) -> Any:
    if name not in fields:
        return None
    try:
        return json.loads(fields[name])
    except (ValueError, RecursionError) as exc:
        raise ApiError(422, "invalid_prompt", f"form field {name!r} is not valid JSON: {exc}") from None


def _numbers(text: str, name: str, form: str, count: int = 4) -> list[float]:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise ApiError(
            422, "invalid_prompt", f"form field {name!r} must be {form!r} in pixels, got {short(text)}"
        )
    # Whole numbers stay ints, so a label reads as 0 or 1.
    return [int(v) if v.is_integer() else v for v in values]


def _refuse_unknown(values: dict[str, Any], known: tuple[str, ...], what: str) -> None:
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown {what}s {unknown} (known: {', '.join(known)})")
