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

Images are read by the data engine's pre-filter (:func:`reflade.engine.stages.prefilter.decode_image_file`), with
its header checks and decoding but none of its quality rules; prompts are checked by the decomposition API's own
validation (:func:`reflade.engine.decompose.validate_prompt_for_image`).

The JSON form of a prompt: ``{"points": [[x, y, label], ...], "box": [x0, y0, x1, y1], "mask": "<base64 PNG>",
"text": "..."}``, any mix, pixels of the uploaded image (as displayed: EXIF orientation applied), label 1 positive
and 0 negative, the box half-open. Fractional coordinates are allowed: points and the box's start are floored,
the box's end is rounded up.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from reflade.engine.decompose import KINDS, MAX_TEXT_CHARS, PromptError, validate_prompt_for_image
from reflade.engine.schema import GRANULARITIES
from reflade.engine.stages.prefilter import ImageRejected, decode_image_file, reason_code

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
PROMPT_FIELDS: tuple[str, ...] = ("points", "box", "mask", "text", "granularity")
"""Keys of a prompt object (``granularity``, ``"fine"`` or ``"coarse"``, defaults to ``"fine"``)."""
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
# An image reason code -> (HTTP status, API error code).
_IMAGE_ERRORS = {
    "too_large": (413, "too_large"),
    "not_an_image": (415, "not_an_image"),
    "unsupported": (415, "unsupported_image"),
    "empty": (400, "empty_image"),
    "truncated": (400, "truncated_image"),
    "corrupt": (400, "corrupt_image"),
}


class ApiError(Exception):
    """An answer other than success: HTTP ``status``, a short snake_case ``code`` and a ``message`` for a person.

    Attributes:
        status: the HTTP status (4xx for anything the caller can fix).
        code: stable, machine-readable (``too_large``, ``invalid_prompt``, ...).
        message: what is wrong and, where it helps, what to send instead.
        headers: extra response headers (``WWW-Authenticate``, ``Retry-After``), often empty.
    """

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = int(status)
        self.code = code
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})

    def to_json(self) -> dict[str, Any]:
        """The response body: ``{"error": {"code": ..., "message": ...}}``."""
        return {"error": {"code": self.code, "message": self.message}}


@dataclass(kw_only=True, frozen=True)
class Limits:
    """What one request may ask for; anything over is refused with a 4xx before the work starts."""

    max_bytes: int = 20 * 2**20
    """Largest image file (and mask file), bytes; a base64 field is refused by its length alone when over."""
    max_pixels: int = 40_000_000
    """Largest image area (width x height, pixels), read from the file's header before decoding."""
    max_prompts: int = 16
    """Most prompts (layers) in one request."""
    max_text: int = MAX_TEXT_CHARS
    """Longest prompt text, characters (at most the sample format's bound, 300)."""
    max_steps: int = 100
    """Most sampling steps a request may ask for."""
    max_points: int = 64
    """Most points in one prompt."""

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_prompts", "max_text", "max_steps", "max_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")
        if self.max_text > MAX_TEXT_CHARS:
            raise ValueError(
                f"Limits.max_text is {self.max_text}: the sample format allows at most {MAX_TEXT_CHARS}"
            )


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


# ---------------------------------------------------------------------------------------------- images
def decode_base64(value: Any, *, field: str, max_bytes: int) -> bytes:
    """Bytes from a base64 string field (standard or URL-safe alphabet, padding optional, ``data:`` URL allowed).

    Raises:
        ApiError: 422 ``invalid_field`` when not a string, 413 ``too_large`` when the decoded size would exceed
            ``max_bytes`` (judged from the length, before decoding), 400 ``invalid_base64`` when it does not decode.
    """
    if not isinstance(value, str):
        raise ApiError(422, "invalid_field", f"{field} must be a base64 string, got {_type_name(value)}")
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
            422, "missing_field", f"no image: expected the image file's bytes, got {_type_name(data)}"
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


# ---------------------------------------------------------------------------------------------- prompts
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
            f"{where} must be an object with some of {', '.join(PROMPT_FIELDS[:4])}, got {_type_name(obj)}",
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
            raise ApiError(422, "invalid_prompt", f"{where}.text must be a string, got {_type_name(text)}")
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
        prompt["mask"] = _mask(obj["mask"], height, width, limits, where)
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
        raise ApiError(422, "invalid_prompt", f"{shape}, got {_type_name(value)}")
    if len(value) > max_points:
        raise ApiError(
            422, "invalid_prompt", f"{where} has {len(value)} points, at most {max_points} are allowed"
        )
    points = []
    for i, point in enumerate(value):
        if not isinstance(point, (list, tuple)) or len(point) != 3:
            raise ApiError(422, "invalid_prompt", f"{shape}; point {i} is {_short(point)}")
        x, y, label = point
        if isinstance(label, bool) or label not in (0, 1):
            raise ApiError(422, "invalid_prompt", f"{shape}; point {i} has label {_short(label)}")
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
            f"{where}.box must be [x0, y0, x1, y1] in pixels (half-open), got {_short(value)}",
        )
    x0, y0, x1, y1 = (_number(v, f"{where}.box[{i}]") for i, v in enumerate(value))
    return [math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)]


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(
            422, "invalid_prompt", f"{name} must be a finite number of pixels, got {_short(value)}"
        )
    return value


def _mask(value: Any, height: int, width: int, limits: Limits, where: str) -> np.ndarray:
    """A mask PNG (base64 string or bytes) as HxW bool, its size checked from the header before decoding."""
    name = f"{where}.mask"
    if isinstance(value, str):
        data = decode_base64(value, field=name, max_bytes=limits.max_bytes)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if len(data) > limits.max_bytes:
            raise ApiError(413, "too_large", f"{name} is {len(data):,} bytes, more than {limits.max_bytes:,}")
    else:
        raise ApiError(422, "invalid_mask", f"{name} must be a base64 PNG string, got {_type_name(value)}")
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
            f"the request body must be a JSON object with 'image' and 'prompt', got {_type_name(body)}",
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
            raise ApiError(422, "invalid_field", f"form field {key!r} must be text, got {_type_name(value)}")
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
            422, "invalid_field", f"'prompts' must be a list of prompt objects, got {_type_name(prompts)}"
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
            f"kind {_short(kind)} is not a layer kind: one of {', '.join(repr(k) for k in KINDS)}",
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
                f"got {_short(model)}",
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
                422, "invalid_field", f"guidance must be a finite number >= 0, got {_short(guidance)}"
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
            f"response {_short(response)} is not one of {', '.join(repr(r) for r in responses)}",
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
        raise ApiError(422, code, f"{name} must be an integer, got {_short(value)}")
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
            422, "invalid_prompt", f"form field {name!r} must be {form!r} in pixels, got {_short(text)}"
        )
    # Whole numbers stay ints, so a label reads as 0 or 1.
    return [int(v) if v.is_integer() else v for v in values]


def _refuse_unknown(values: dict[str, Any], known: tuple[str, ...], what: str) -> None:
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown {what}s {unknown} (known: {', '.join(known)})")


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
