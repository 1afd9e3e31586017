"""The decomposition and vote routes' request bodies and answers, described for OpenAPI.

The routes read the raw request (JSON or multipart) and :mod:`reflade.serve.requests` checks it: every rule lives
there; these schemas document the shapes for clients and fuzzers (``/openapi.json``).
"""

from typing import Any

__all__ = ["PAIR_DOC", "VOTE_DOC", "route_doc"]

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


# ---------------------------------------------------------------------------------------------- votes
def _errors(*pairs: tuple[int, str]) -> dict[str, Any]:
    return {
        str(code): {"description": text, "content": {"application/json": {"schema": _ERROR}}}
        for code, text in pairs
    }


_LAYER = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "layer_png": {"type": "string", "description": "base64 RGBA PNG"},
    },
}
PAIR_DOC: dict[str, Any] = {
    "parameters": [
        {
            "name": "dataset",
            "in": "query",
            "required": True,
            "schema": {"type": "string"},
            "description": "dataset/NAME[@VERSION][:SPLIT]; the split defaults to test",
        },
        {
            "name": "a",
            "in": "query",
            "required": True,
            "schema": {"type": "string"},
            "description": "a model",
        },
        {
            "name": "b",
            "in": "query",
            "required": True,
            "schema": {"type": "string"},
            "description": "another",
        },
        {
            "name": "prompt_type",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "only prompts of this type (box, text+box:fine)",
        },
        {
            "name": "seed",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
            "description": "the same seed gives the same pair (item, sides, decomposition seed)",
        },
    ],
    "responses": {
        "200": {
            "description": "the pair; A is shown on the left",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "item": {"type": "string"},
                            "prompt_type": {"type": "string"},
                            "description": {"type": "string"},
                            "image_png": {"type": "string"},
                            "a": _LAYER,
                            "b": _LAYER,
                        },
                    }
                }
            },
        },
        **_errors(
            (401, "no token"),
            (403, "wrong token"),
            (404, "unknown dataset or model, or no item"),
            (422, "invalid parameter, the same model twice, or refused prompts"),
            (503, "queues full: retry after Retry-After seconds"),
        ),
    },
}
"""``openapi_extra`` of ``GET /v1/vote/pair``."""
VOTE_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["name", "item", "prompt", "model_a", "model_b", "winner"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"},
                        "item": {"type": "string", "minLength": 1, "maxLength": 300},
                        "prompt": {"type": "string", "minLength": 1, "maxLength": 300},
                        "model_a": {"type": "string", "minLength": 1, "maxLength": 300},
                        "model_b": {"type": "string", "minLength": 1, "maxLength": 300},
                        "winner": {"type": "string", "enum": ["a", "b", "tie"]},
                    },
                }
            }
        },
    },
    "responses": {
        "201": {
            "description": "recorded: the new version of votes/NAME",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "ref": {"type": "string"},
                            "version": {"type": "integer"},
                            "n_votes": {"type": "integer"},
                        },
                    }
                }
            },
        },
        **_errors(
            (400, "malformed JSON"),
            (401, "no token"),
            (403, "wrong token"),
            (409, "the latest version of votes/NAME is not readable as votes"),
            (413, "body too large"),
            (415, "not JSON"),
            (422, "invalid vote or name"),
        ),
    },
}
"""``openapi_extra`` of ``POST /v1/votes``."""
