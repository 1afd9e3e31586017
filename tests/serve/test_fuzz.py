"""Malformed requests against the running service: a Schemathesis fuzz of its OpenAPI description (positive and
negative cases, at least 200 sent), and a table of hand-made ones. Every answer is a success or a 4xx with the
service's JSON error; never a 5xx; the service stays healthy after each batch."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from typing import Any

import pytest
import requests

from reflade.engine.schema import encode_png
from reflade.engine.synth import make_scene

pytestmark = pytest.mark.usefixtures("ray_cluster", "one_torch_thread")

MIN_CASES = 200
"""At least this many generated requests reach the service (the issue's bound)."""


def _scene_png() -> tuple[bytes, list[int]]:
    scene = make_scene(5, size=(48, 64), n_objects=(2, 2))
    return encode_png(scene.image), [int(v) for v in scene.objects[0].box]


def _is_json_error(r: requests.Response) -> bool:
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and bool(err.get("code")) and bool(err.get("message"))


def _check_answer(r: requests.Response, what: str) -> None:
    assert r.status_code < 500, f"{what}: HTTP {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        assert _is_json_error(r), f"{what}: HTTP {r.status_code} without the JSON error: {r.text[:300]}"


def _healthy(service) -> None:
    assert requests.get(service["url"] + "/healthz", timeout=30).json() == {"status": "ok"}


def test_schemathesis_fuzz_of_the_openapi_description(service):
    """Schemathesis generates bodies, queries and media types from /openapi.json, in both modes (valid by the
    schema, and violating it); half of the decomposition bodies carry a real PNG, so the prompt and option checks
    behind the image decoding are reached too."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    doc = requests.get(service["url"] + "/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(doc)
    png, box = _scene_png()
    auth = {"Authorization": f"Bearer {service['token']}"}
    session = requests.Session()
    sent: list[tuple[str, int]] = []
    empty: list[str] = []

    def with_real_image(case, real: str):
        """``real``: "as-generated", "image" (a real PNG), or "image+box" (and a valid box prompt)."""
        body = case.body
        if real != "as-generated" and isinstance(body, dict) and "image" in body:
            body["image"] = (
                png if case.media_type == "multipart/form-data" else base64.b64encode(png).decode()
            )
            body["model"] = "classical"  # the request checks, not the tiny model's run time, are under test
            if real == "image+box":  # a request that must succeed whatever else was generated beside it
                for key in [k for k in body if k not in ("image", "model", "kind", "response", "guidance")]:
                    body.pop(key)  # generated prompts, out-of-range steps and seeds, extra fields
                if case.path.endswith("/layers"):
                    case.query = {**(case.query or {}), "format": "zip"}
                if case.media_type == "multipart/form-data":
                    body["box"] = ",".join(map(str, box))
                elif case.path.endswith("/layers"):
                    body["prompts"] = [{"box": box}]
                else:
                    body["prompt"] = {"box": box}
        return case

    def fuzz(strategy, label: str, examples: int) -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def run(case):
            r = case.call(base_url=service["url"], session=session, headers=auth, timeout=60)
            sent.append((label, r.status_code))
            _check_answer(r, f"{label} body={str(case.body)[:200]}")

        try:
            run()
        except (
            Unsatisfiable
        ):  # nothing to violate (an operation with no parameters or body, in negative mode)
            empty.append(label)

    per_operation = {"POST": 70, "GET": 4}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"/v1/decompose", "/v1/decompose/layers"} <= {op.path for op in operations}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = st.builds(
                with_real_image,
                op.as_strategy(generation_mode=mode),
                st.sampled_from(["as-generated", "image", "image+box"]),
            )
            label = f"{op.method.upper()} {op.path} ({mode.value})"
            fuzz(strategy, label, per_operation.get(op.method.upper(), 4))
    from collections import Counter

    print("\nfuzz: requests sent by operation and answer:")
    for (label, code), n in sorted(Counter(sent).items()):
        print(f"  {label:55s} HTTP {code}: {n}")
    assert not [label for label in empty if label.startswith("POST")], empty
    assert len(sent) >= MIN_CASES, f"only {len(sent)} generated requests were sent"
    for path in ("/v1/decompose", "/v1/decompose/layers"):  # both refusals and successes reached
        codes = {code for label, code in sent if label.startswith(f"POST {path} ")}
        assert 200 in codes and codes & {400, 413, 415, 422}, (path, sorted(codes))
    _healthy(service)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (RGB, 8 bit) followed by a tiny IDAT: the pixel limit must
    refuse it from the header alone."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def _json_body(image: bytes, **kw: Any) -> bytes:
    return json.dumps({"image": base64.b64encode(image).decode(), **kw}).encode()


def _malformed() -> list[tuple[str, dict[str, Any], int, str | None]]:
    png, box = _scene_png()
    js = {"Content-Type": "application/json"}
    return [
        ("truncated PNG", {"data": _json_body(png[: len(png) // 2], prompt={"box": box}), "headers": js}, 400, None),
        ("60000x60000 header", {"data": _json_body(_png_header(60000, 60000), prompt={"box": box}), "headers": js}, 413, "too_large"),
        ("text as an image", {"data": _json_body(b"hello, not a picture", prompt={"box": box}), "headers": js}, 415, "not_an_image"),
        ("no content type", {"data": b"\x00\x01\x02"}, 415, "unsupported_media_type"),
        ("text/plain", {"data": b"image=1", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
        ("XML", {"data": b"<image/>", "headers": {"Content-Type": "application/xml"}}, 415, "unsupported_media_type"),
        ("JSON array", {"data": b"[1, 2, 3]", "headers": js}, 400, "invalid_json"),
        ("JSON null", {"data": b"null", "headers": js}, 400, "invalid_json"),
        ("deeply nested JSON", {"data": b"[" * 100_000 + b"]" * 100_000, "headers": js}, 400, None),
        ("huge JSON (over the upload limit)", {"data": b'{"image": "' + b"A" * (30 * 2**20) + b'"}', "headers": js}, 413, "too_large"),
        ("JSON, not UTF-8", {"data": b'{"image": "\xff\xfe"}', "headers": js}, 400, None),
        ("image is a number", {"data": json.dumps({"image": 7, "prompt": {"box": box}}).encode(), "headers": js}, 422, "invalid_field"),
        ("box of strings", {"data": _json_body(png, prompt={"box": ["a", "b", "c", "d"]}), "headers": js}, 422, "invalid_prompt"),
        ("NaN in a point", {"data": _json_body(png, prompt={"points": [[float("nan"), 1, 1]]}), "headers": js}, 422, "invalid_prompt"),
        ("mask of another size", {"data": _json_body(png, prompt={"mask": base64.b64encode(encode_png(_ones(8, 8))).decode()}), "headers": js}, 422, "invalid_mask"),
        ("text too long", {"data": _json_body(png, prompt={"text": "x" * 5000}), "headers": js}, 422, "text_too_long"),
        ("too many prompts", {"data": _json_body(png, prompts=[{"box": box}] * 500), "headers": js}, 422, "too_many_prompts"),
        ("unknown field", {"data": _json_body(png, prompt={"box": box}, colour="red"), "headers": js}, 422, "unknown_field"),
        ("steps 10^9", {"data": _json_body(png, prompt={"box": box}, steps=10**9), "headers": js}, 422, "invalid_steps"),
        ("model with ..", {"data": _json_body(png, prompt={"box": box}, model="model/../x@1"), "headers": js}, 422, "bad_model_reference"),
        ("multipart without an image", {"files": {"mask": ("m.png", png, "image/png")}, "data": {"box": "1,2,3,4"}}, 422, "missing_field"),
        ("multipart, JPEG header then junk", {"files": {"image": ("x.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 64, "image/jpeg")}, "data": {"box": "1,2,3,4"}}, 415, "not_an_image"),
        ("multipart box of 3 numbers", {"files": {"image": ("s.png", png, "image/png")}, "data": {"box": "1,2,3"}}, 422, "invalid_prompt"),
    ]  # fmt: skip


def _ones(h: int, w: int):
    import numpy as np

    return np.full((h, w), 255, np.uint8)


@pytest.mark.parametrize("name, kwargs, status, code", _malformed(), ids=[m[0] for m in _malformed()])
def test_hand_made_malformed_requests(service, name, kwargs, status, code):
    headers = {"Authorization": f"Bearer {service['token']}", **kwargs.pop("headers", {})}
    r = requests.post(service["url"] + "/v1/decompose", headers=headers, timeout=120, **kwargs)
    assert r.status_code == status, f"{name}: HTTP {r.status_code} {r.text[:300]}"
    assert _is_json_error(r), f"{name}: {r.text[:300]}"
    assert code is None or r.json()["error"]["code"] == code, r.json()
    _healthy(service)
