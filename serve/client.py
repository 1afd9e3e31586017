"""A Python client of the decomposition service.

    from reflade.serve.client import Client
    layer = Client("http://127.0.0.1:8000", token).decompose(image, {"box": [10, 20, 200, 220]}, kind="foreground")

``layer`` is an HxWx4 uint8 array (straight alpha) at the image's size.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np

from reflade.platform.errors import ReportedError

__all__ = ["Client", "ServeError"]


class ServeError(ReportedError):
    """The service answered with an error; ``status`` and ``code`` are the service's."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code = status, code


def _image_bytes(image: Any) -> bytes:
    """PNG bytes of an HxWx3 uint8 array; bytes and file paths pass through as they are."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, str | Path):
        return Path(image).read_bytes()
    from reflade.engine.schema import encode_png

    return encode_png(np.asarray(image))


class Client:
    """Calls ``/v1`` of a RefLade service.

    Args:
        url: the service's base URL (``http://127.0.0.1:8000``).
        token: a bearer API token (``reflade serve token create``); None for a service without auth.
        timeout: seconds per request.
    """

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 300.0):
        import requests

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _post(self, path: str, body: dict[str, Any], params: dict[str, str] | None = None):
        import requests

        try:
            r = self.session.post(self.url + path, json=body, params=params, timeout=self.timeout)
        except requests.ConnectionError as e:
            raise ServeError(
                0,
                "unreachable",
                f"{self.url}: {e.__class__.__name__}; is the service up (`reflade serve status`)?",
            ) from None
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                raise ServeError(r.status_code, err["code"], err["message"])
            except (ValueError, KeyError, TypeError):
                raise ServeError(r.status_code, "http_error", r.text[:300]) from None
        return r

    def decompose(
        self,
        image: Any,
        prompt: dict[str, Any],
        kind: str = "foreground",
        *,
        model: str | None = None,
        steps: int | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        """The layer ``prompt`` refers to: HxWx4 uint8 RGBA at the image's size.

        Args:
            image: HxWx3 uint8 array, encoded image bytes, or a file path.
            prompt: ``{"points": [[x, y, label], ...], "box": [x0, y0, x1, y1], "mask": base64 PNG, "text": str}``,
                any mix, in the image's pixels.
            kind: ``foreground`` or ``background``.
            model: a model reference, ``classical``, or None for the service's default.

        Raises:
            ServeError: the service refused the request (4xx) or could not be reached.
        """
        return self.decompose_json(image, prompt, kind, model=model, steps=steps, seed=seed)["layer"]

    def decompose_json(
        self, image: Any, prompt: dict[str, Any], kind: str = "foreground", **kw: Any
    ) -> dict[str, Any]:
        """As :meth:`decompose`, with the service's metadata (``model`` exact version, ``seed``, ``timings``)."""
        from reflade.engine.schema import decode_image

        body = {
            "image": base64.b64encode(_image_bytes(image)).decode(),
            "prompt": prompt,
            "kind": kind,
            "response": "json",
            **{k: v for k, v in kw.items() if v is not None},
        }
        doc = self._post("/v1/decompose", body).json()
        doc["layer"] = decode_image(base64.b64decode(doc.pop("layer_png")), "RGBA")
        return doc

    def layers(
        self,
        image: Any,
        prompts: list[dict[str, Any]],
        kind: str = "foreground",
        *,
        format: str = "zip",
        **kw: Any,
    ) -> bytes:
        """Several prompts of one image in one batched call: a ZIP of PNGs, or OpenRaster (``format="ora"``)."""
        body = {
            "image": base64.b64encode(_image_bytes(image)).decode(),
            "prompts": prompts,
            "kind": kind,
            **kw,
        }
        return self._post("/v1/decompose/layers", body, params={"format": format}).content

    def models(self) -> dict[str, Any]:
        """The default model (reference and exact version) and what the service has resolved."""
        r = self.session.get(self.url + "/v1/models", timeout=self.timeout)
        if r.status_code >= 400:
            err = r.json().get("error", {})
            raise ServeError(r.status_code, err.get("code", "http_error"), err.get("message", r.text[:300]))
        return r.json()
