"""The web pages of the service, read from the package (``reflade.serve.static``) and served as they are.

The ingress serves ``index.html`` at ``/``, ``vote.html`` at ``/vote`` and every file at ``/static/NAME``:

- ``/``: decompose an uploaded image with points, a box, a painted mask and text; the layers over a checkerboard;
  PNG, ZIP and OpenRaster downloads.
- ``/vote``: pairwise human preference between two models' layers on a dataset's test split (:mod:`.votes`).

The pages hold no data, so they and ``/static/NAME`` are served without a token; the API calls they make send the
token a person typed (kept in the browser's ``localStorage``). A Content-Security-Policy lets them load and call
nothing but the service itself: no CDN, no remote font, no inline script.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi.responses import Response

from reflade.serve.errors import ApiError

__all__ = ["CONTENT_SECURITY_POLICY", "static_files", "static_response"]

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
"""Sent with every page and static file: the service's own origin only (images also from data: and blob: URLs,
which the pages make from the API's answers)."""
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


@functools.cache
def static_files() -> dict[str, bytes]:
    """Every servable file of ``reflade.serve.static`` (name -> content): ``.html``, ``.js`` and ``.css`` only,
    read once per process.

    Raises:
        FileNotFoundError: the package holds none of them (a broken install).
    """
    folder = resources.files("reflade.serve.static")
    files = {
        entry.name: entry.read_bytes()
        for entry in folder.iterdir()
        if entry.is_file() and any(entry.name.endswith(suffix) for suffix in _MEDIA_TYPES)
    }
    if not files:
        raise FileNotFoundError(f"{folder}: no .html, .js or .css files (is the package installed whole?)")
    return files


def static_response(name: str) -> Response:
    """The file ``name`` of the package's static files.

    Raises:
        ApiError: 404 ``not_found`` for any other name (a path, ``..``, a ``.py`` file).
    """
    content = static_files().get(name)
    if content is None:
        raise ApiError(404, "not_found", f"no static file {name[:80]!r}")
    suffix = name[name.rfind(".") :]
    return Response(
        content,
        media_type=_MEDIA_TYPES[suffix],
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )
