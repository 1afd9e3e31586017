"""The decomposition routes' request bodies and answers, described for OpenAPI.

The routes read the raw request (JSON or multipart) and :mod:`reflade.serve.requests` checks it: every rule lives
there; these schemas document the shapes for clients and fuzzers (``/openapi.json``).
"""

from typing import Any

__all__ = ["route_doc"]

_PROMPT = {
    "type": "object",
    "description": "Any mix of points, box, mask and text, in the image's pixels.",
    "properties": {
        "points": {
            "type": "array",
            "items": {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3},
            "description": "[[x, y, label], ...]; label 1 positive, 0 negative",
        },
        "box": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
        "mask": {"type": "string", "description": "base64 PNG of the image's size (0/255, or alpha)"},
        "text": {"type": "string"},
        "granularity": {"type": "string", "enum": ["coarse", "fine"]},
    },
}
_JSON_BODY = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "string", "description": "base64 image (PNG, JPEG, WebP, ...)"},
        "prompt": _PROMPT,
        "prompts": {"type": "array", "items": _PROMPT},
        "kind": {"type": "string", "enum": ["foreground", "background"], "default": "foreground"},
        "model": {
            "type": "string",
            "description": "model reference (model/reflayer@production) or classical",
        },
        "steps": {"type": "integer", "minimum": 1},
        "seed": {"type": "integer", "minimum": 0},
        "guidance": {"type": "number", "minimum": 0},
        "response": {"type": "string", "enum": ["png", "json"], "default": "png"},
    },
}
_FORM_BODY = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "string", "format": "binary"},
        "mask": {"type": "string", "format": "binary"},
        "prompt": {"type": "string", "description": "a prompt object as JSON"},
        **{
            k: {"type": "string"}
            for k in ("box", "points", "text", "kind", "model", "steps", "seed", "guidance")
        },
    },
}
_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            "required": ["code", "message"],
        }
    },
}


def route_doc(ok: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` of a decomposition route: both request bodies, ``ok`` as the 200 answer, the errors."""
    errors = {
        str(code): {"description": text, "content": {"application/json": {"schema": _ERROR}}}
        for code, text in (
            (400, "malformed request"),
            (401, "no token"),
            (403, "wrong token"),
            (404, "unknown model"),
            (413, "upload or image too large"),
            (415, "unsupported content or image type"),
            (422, "invalid prompt, kind or option"),
            (503, "queues full: retry after Retry-After seconds"),
        )
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _JSON_BODY},
                "multipart/form-data": {"schema": _FORM_BODY},
            },
        },
        "responses": {"200": ok, **errors},
    }
