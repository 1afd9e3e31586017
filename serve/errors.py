"""The service's refusals and bounds: :class:`ApiError` (an HTTP status, a short code, a message for a person) and
:class:`Limits` (what one request may ask for). Shared by the request parsers, auth and the ingress."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reflade.engine.decompose import MAX_TEXT_CHARS

__all__ = ["ApiError", "Limits", "short", "type_name"]


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


# ---------------------------------------------------------------------------------------------- wording
def type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
