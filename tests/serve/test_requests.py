"""serve/requests.py: HTTP request parts -> a checked DecomposeRequest, or a 4xx ApiError (never anything else)."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

import reflade.serve.uploads as uploads_module
from reflade.engine.decompose import prepare
from reflade.engine.stages.prefilter import ImageRejected
from reflade.serve.requests import (
    ApiError,
    DecomposeRequest,
    Limits,
    decode_base64,
    decode_upload,
    parse_form_request,
    parse_json_request,
    parse_prompt,
)

LIMITS = Limits()
H, W = 48, 64


# ---------------------------------------------------------------- helpers


def png(pixels: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def png_with_header(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A PNG whose IHDR declares width x height RGB pixels, with a tiny IDAT (well-formed unless ``idat`` is given)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64) if idat is None else idat)
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 64x48 RGB image with structure (a gradient and a square)."""
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x * 4, y * 5, (x + y) * 2], axis=2).astype(np.uint8)
    rgb[10:30, 20:40] = (200, 30, 60)
    return rgb


def mask_png(height: int = H, width: int = W) -> bytes:
    m = np.zeros((height, width), np.uint8)
    m[10:30, 20:40] = 255
    return png(m)


def api_error(fn, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert 400 <= err.status < 500
    assert err.to_json() == {"error": {"code": err.code, "message": err.message}}
    assert err.message
    return err


def same_request(a: DecomposeRequest, b: DecomposeRequest) -> None:
    np.testing.assert_array_equal(a.image, b.image)
    assert (a.kind, a.model, a.steps, a.seed, a.guidance, a.response) == (
        b.kind,
        b.model,
        b.steps,
        b.seed,
        b.guidance,
        b.response,
    )
    assert len(a.prompts) == len(b.prompts)
    for pa, pb in zip(a.prompts, b.prompts, strict=True):
        assert pa.keys() == pb.keys()
        for key in pa:
            if key == "mask" and pa[key] is not None:
                np.testing.assert_array_equal(pa[key], pb[key])
            else:
                assert pa[key] == pb[key], key


# ---------------------------------------------------------------- images


def test_decode_upload_reads_png_and_flattens_alpha(photo):
    np.testing.assert_array_equal(decode_upload(png(photo), LIMITS), photo)
    rgba = np.dstack([photo, np.full((H, W), 255, np.uint8)])
    rgba[:, :10, 3] = 0
    rgba[:, :10, :3] = 0  # hidden colour must not show: flattened over white, as the pre-filter does
    out = decode_upload(png(rgba), LIMITS)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert (out[:, :10] == 255).all()
    np.testing.assert_array_equal(out[:, 10:], photo[:, 10:])


def test_decode_upload_applies_exif_orientation(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer turns it 90 degrees clockwise
    out = decode_upload(png(photo, exif=exif.tobytes()), LIMITS)
    np.testing.assert_array_equal(out, np.rot90(photo, k=-1))


def test_decode_upload_does_not_apply_quality_rules():
    """A tiny, grey, flat, extreme-aspect image is fine for serving (the pre-filter would reject all four)."""
    out = decode_upload(png(np.full((2, 40, 3), 128, np.uint8)), LIMITS)
    assert out.shape == (2, 40, 3)


def test_decode_upload_does_not_cap_the_longest_side():
    wide = np.zeros((4, 3000, 3), np.uint8)
    wide[:, ::2] = 255
    assert decode_upload(png(wide), LIMITS).shape == (4, 3000, 3)


def test_truncated_png_is_400(photo):
    data = png(photo)
    err = api_error(decode_upload, data[: len(data) // 2], LIMITS)
    assert (err.status, err.code) == (400, "truncated_image")


def test_corrupt_png_is_400():
    # Valid chunks and CRCs around an IDAT that is not a zlib stream.
    err = api_error(decode_upload, png_with_header(10, 10, b"garbage, not zlib"), LIMITS)
    assert (err.status, err.code) == (400, "corrupt_image"), err.message


def test_empty_upload_is_400():
    err = api_error(decode_upload, b"", LIMITS)
    assert (err.status, err.code) == (400, "empty_image")


def test_text_bytes_are_415():
    err = api_error(decode_upload, b"hello, this is plainly not an image\n" * 10, LIMITS)
    assert (err.status, err.code) == (415, "not_an_image")
    assert "PNG" in err.message  # names the accepted formats


def test_unsupported_pixel_mode_is_415(monkeypatch):
    # No file Pillow can write has a mode without an RGB conversion, so the pre-filter's verdict is stubbed here.
    def refuse(data, **kwargs):
        raise ImageRejected("unsupported: pixel mode XYZ (no conversion)")

    monkeypatch.setattr(uploads_module, "decode_image_file", refuse)
    err = api_error(decode_upload, b"anything", LIMITS)
    assert (err.status, err.code) == (415, "unsupported_image") and "XYZ" in err.message


def test_upload_over_max_bytes_is_413(photo):
    data = png(photo)
    err = api_error(decode_upload, data, Limits(max_bytes=len(data) - 1))
    assert (err.status, err.code) == (413, "too_large")
    assert decode_upload(data, Limits(max_bytes=len(data))).shape == (H, W, 3)


def test_60000_square_header_is_413_without_decoding():
    data = png_with_header(60000, 60000)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        err = api_error(decode_upload, data, LIMITS)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (err.status, err.code) == (413, "too_large"), err.message
    assert elapsed < 1.0
    assert peak < 5 * 2**20, f"peak {peak} bytes"  # decoding would need 10.8 GB


def test_pixel_limit_is_ours_too(monkeypatch):
    """With Pillow's bomb guard off, max_pixels still refuses from the header, before decoding."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    err = api_error(decode_upload, png_with_header(60000, 60000), LIMITS)
    assert (err.status, err.code) == (413, "too_large") and "60000x60000" in err.message
    err = api_error(decode_upload, png_with_header(1001, 1000), Limits(max_pixels=1000 * 1000))
    assert (err.status, err.code) == (413, "too_large") and "1001x1000" in err.message


def test_decode_base64_variants():
    data = bytes(range(256)) * 3
    standard = b64(data)
    assert decode_base64(standard, field="image", max_bytes=10_000) == data
    assert decode_base64(standard.rstrip("="), field="image", max_bytes=10_000) == data  # padding optional
    urlsafe = base64.urlsafe_b64encode(data).decode()
    assert decode_base64(urlsafe, field="image", max_bytes=10_000) == data
    wrapped = "\n".join(standard[i : i + 76] for i in range(0, len(standard), 76))
    assert decode_base64(wrapped, field="image", max_bytes=10_000) == data
    assert decode_base64("data:image/png;base64," + standard, field="image", max_bytes=10_000) == data


@pytest.mark.parametrize("value", ["!!!!", "abcde", "data:image/png,abcd", "ééé=", "YQ==YQ=="])
def test_bad_base64_is_400(value):
    err = api_error(decode_base64, value, field="image", max_bytes=1000)
    assert (err.status, err.code) == (400, "invalid_base64")
    assert "image" in err.message


def test_base64_of_the_wrong_type_is_422():
    err = api_error(decode_base64, 12, field="image", max_bytes=1000)
    assert (err.status, err.code) == (422, "invalid_field")


def test_huge_base64_is_413_before_decoding(monkeypatch):
    huge = "A" * (64 * 2**20)  # 48 MiB once decoded
    calls = []
    monkeypatch.setattr(uploads_module.base64, "b64decode", lambda *a, **k: calls.append(1))
    started = time.perf_counter()
    err = api_error(parse_json_request, {"image": huge, "prompt": {"box": [0, 0, 4, 4]}}, LIMITS)
    assert (err.status, err.code) == (413, "too_large")
    assert time.perf_counter() - started < 1.0 and not calls
    # Just over the limit, judged from the length after whitespace is dropped.
    limit = 3000
    err = api_error(decode_base64, b64(b"x" * (limit + 3)), field="image", max_bytes=limit)
    assert (err.status, err.code) == (413, "too_large") and not calls


# ---------------------------------------------------------------- prompts


def test_parse_prompt_every_part():
    mask = np.zeros((H, W), bool)
    mask[10:30, 20:40] = True
    p = parse_prompt(
        {
            "points": [[30, 20, 1], [2.7, 3.2, 0]],
            "box": [19.5, 9.2, 40.1, 30],
            "mask": b64(mask_png()),
            "text": " cat ",
        },
        H,
        W,
        LIMITS,
    )
    assert p["type"] == "text+point+box+mask"
    assert p["granularity"] == "fine"
    assert p["points"] == [[30, 20, 1], [2, 3, 0]]
    assert p["box"] == [19, 9, 41, 30]  # start floored, end rounded up
    np.testing.assert_array_equal(p["mask"], mask)
    assert p["text"] == "cat"
    assert parse_prompt({"text": "the cat", "box": [0, 0, W, H]}, H, W, LIMITS)["type"] == "text+box"
    assert (
        parse_prompt({"points": [[0, 0, 1]], "granularity": "coarse"}, H, W, LIMITS)["granularity"]
        == "coarse"
    )
    # The decomposition API takes what parse_prompt returns, as it is.
    items = prepare([np.zeros((H, W, 3), np.uint8)], [p], ["foreground"])
    assert items[0].prompt["type"] == "text+point+box+mask"


def test_mask_read_from_alpha_when_painted_on_a_transparent_canvas():
    canvas = np.zeros((H, W, 4), np.uint8)
    canvas[5:15, 5:25] = (255, 0, 0, 255)  # red strokes: grey level below 128, alpha opaque
    p = parse_prompt({"mask": b64(png(canvas))}, H, W, LIMITS)
    assert p["mask"].sum() == 10 * 20 and p["mask"][5:15, 5:25].all()
    assert p["type"] == "mask"


@pytest.mark.parametrize(
    "prompt, fragment",
    [
        ({"points": [[W, 5, 1]]}, "outside"),
        ({"points": [[5, -0.5, 1]]}, "outside"),
        ({"box": [10, 10, W + 1, 20]}, "half-open"),
        ({"box": [30, 10, 20, 20]}, "half-open"),
    ],
)
def test_prompt_outside_the_image_is_422(prompt, fragment):
    err = api_error(parse_prompt, prompt, H, W, LIMITS)
    assert (err.status, err.code) == (422, "invalid_prompt")
    assert fragment in err.message and f"{W}x{H}" in err.message


def test_mask_size_mismatch_is_422():
    err = api_error(parse_prompt, {"mask": b64(mask_png(H, W + 1))}, H, W, LIMITS)
    assert (err.status, err.code) == (422, "invalid_mask")
    assert f"{W + 1}x{H}" in err.message and f"{W}x{H}" in err.message


def test_huge_mask_header_is_refused_before_decoding():
    err = api_error(parse_prompt, {"mask": b64(png_with_header(60000, 60000))}, H, W, LIMITS)
    assert (err.status, err.code) == (422, "invalid_mask")


@pytest.mark.parametrize(
    "mask",
    [b64(b"not a png at all"), b64(mask_png()[:60]), b64(png(np.zeros((H, W), np.uint8))), 17, ["a"]],
)
def test_bad_mask_is_422(mask):
    err = api_error(parse_prompt, {"mask": mask}, H, W, LIMITS)
    assert (err.status, err.code) == (422, "invalid_mask")


def test_mask_that_is_not_base64_is_400():
    err = api_error(parse_prompt, {"mask": "%%%"}, H, W, LIMITS)
    assert (err.status, err.code) == (400, "invalid_base64") and "prompt.mask" in err.message


@pytest.mark.parametrize(
    "prompt", [{}, {"points": []}, {"text": ""}, {"text": "   "}, {"box": None, "mask": None}]
)
def test_empty_prompt_is_422(prompt):
    err = api_error(parse_prompt, prompt, H, W, LIMITS)
    assert (err.status, err.code) == (422, "empty_prompt")


def test_text_too_long_is_422():
    err = api_error(parse_prompt, {"text": "x" * 301}, H, W, LIMITS)
    assert (err.status, err.code) == (422, "text_too_long") and "300" in err.message
    err = api_error(parse_prompt, {"text": "a red cat"}, H, W, Limits(max_text=5))
    assert (err.status, err.code) == (422, "text_too_long")
    assert parse_prompt({"text": "x" * 300}, H, W, LIMITS)["text"] == "x" * 300


@pytest.mark.parametrize(
    "prompt",
    [
        [1, 2, 3],
        "a cat",
        {"points": [[1, 2]]},
        {"points": [[1, 2, 3]]},
        {"points": [[1, 2, True]]},
        {"points": [1, 2, 1]},
        {"points": "1,2,1"},
        {"points": [["a", 2, 1]]},
        {"points": [[float("nan"), 2, 1]]},
        {"box": [1, 2, 3]},
        {"box": {"x0": 1}},
        {"box": [0, 0, float("inf"), 4]},
        {"box": [0, 0, True, 4]},
        {"text": 5},
        {"text": ["a"]},
        {"granularity": "medium", "text": "a"},
        {"pionts": [[1, 2, 1]]},
        {"type": "box", "box": [0, 0, 4, 4]},
        {"points": [[1, 1, 1]] * 65},
    ],
)
def test_bad_prompt_shapes_and_types_are_422(prompt):
    err = api_error(parse_prompt, prompt, H, W, LIMITS)
    assert (err.status, err.code) == (422, "invalid_prompt")


# ---------------------------------------------------------------- whole requests


def test_json_and_form_requests_agree(photo):
    image = png(photo)
    mask = mask_png()
    body = {
        "image": b64(image),
        "prompt": {
            "points": [[30, 20, 1], [5, 5, 0]],
            "box": [20, 10, 40, 30],
            "mask": b64(mask),
            "text": "the square",
        },
        "kind": "background",
        "model": "model/reflayer@candidate",
        "steps": 12,
        "seed": 7,
        "guidance": 2.5,
        "response": "json",
    }
    from_json = parse_json_request(body, LIMITS)
    assert from_json.image.shape == (H, W, 3) and from_json.kind == "background"
    assert from_json.steps == 12 and from_json.seed == 7 and from_json.guidance == 2.5
    assert from_json.prompts[0]["type"] == "text+point+box+mask"
    fields = {
        "box": "20,10,40,30",
        "points": "30,20,1; 5,5,0",
        "text": "the square",
        "kind": "background",
        "model": "model/reflayer@candidate",
        "steps": "12",
        "seed": "7",
        "guidance": "2.5",
        "response": "json",
    }
    same_request(from_json, parse_form_request(fields, image, mask, LIMITS))
    # The prompt as one JSON field instead, the mask inside it.
    as_json_field = {k: v for k, v in fields.items() if k not in ("box", "points", "text")}
    as_json_field["prompt"] = json.dumps(body["prompt"])
    same_request(from_json, parse_form_request(as_json_field, image, None, LIMITS))
    # And the raw body bytes give the same as the parsed body.
    same_request(from_json, parse_json_request(json.dumps(body).encode(), LIMITS))


def test_defaults_and_several_prompts(photo):
    body = {"image": b64(png(photo)), "prompts": [{"box": [0, 0, 10, 10]}, {"text": "sky"}]}
    req = parse_json_request(body, LIMITS)
    assert (req.kind, req.model, req.steps, req.seed, req.guidance, req.response) == (
        "foreground",
        None,
        None,
        None,
        None,
        "png",
    )
    assert [p["type"] for p in req.prompts] == ["box", "text"]
    layers = parse_json_request({**body, "response": "ora"}, LIMITS, responses=("zip", "ora"))
    assert layers.response == "ora"
    assert parse_json_request({**body, "kind": None, "steps": None}, LIMITS).kind == "foreground"


def test_errors_name_the_prompt_in_a_list(photo):
    body = {"image": b64(png(photo)), "prompts": [{"box": [0, 0, 10, 10]}, {"points": [[999, 1, 1]]}]}
    err = api_error(parse_json_request, body, LIMITS)
    assert (err.status, err.code) == (422, "invalid_prompt") and "prompts[1]" in err.message


def test_too_many_prompts_is_422_before_the_image_is_read():
    body = {"image": "this is never decoded", "prompts": [{"text": "a"}] * 5}
    err = api_error(parse_json_request, body, Limits(max_prompts=4))
    assert (err.status, err.code) == (422, "too_many_prompts") and "4" in err.message
    err = api_error(
        parse_form_request, {"prompts": json.dumps([{"text": "a"}] * 5)}, b"x", None, Limits(max_prompts=4)
    )
    assert (err.status, err.code) == (422, "too_many_prompts")


@pytest.mark.parametrize("body", [[], "a string", 3, None, b"{not json", '{"image": ', b"[1, 2]"])
def test_body_that_is_not_a_json_object_is_400(body):
    err = api_error(parse_json_request, body, LIMITS)
    assert (err.status, err.code) == (400, "invalid_json")


@pytest.mark.parametrize(
    "change, status, code, fragment",
    [
        ({"kind": "fg"}, 422, "unknown_kind", "'foreground', 'background'"),
        ({"kind": 3}, 422, "unknown_kind", "foreground"),
        ({"steps": 0}, 422, "invalid_steps", "1 to 100"),
        ({"steps": 101}, 422, "invalid_steps", "1 to 100"),
        ({"steps": 2.5}, 422, "invalid_steps", "integer"),
        ({"steps": "20"}, 422, "invalid_steps", "integer"),
        ({"steps": True}, 422, "invalid_steps", "integer"),
        ({"seed": -1}, 422, "invalid_field", "seed"),
        ({"seed": 2**63}, 422, "invalid_field", "seed"),
        ({"guidance": float("nan")}, 422, "invalid_field", "guidance"),
        ({"guidance": -1}, 422, "invalid_field", "guidance"),
        ({"guidance": "2"}, 422, "invalid_field", "guidance"),
        ({"response": "gif"}, 422, "invalid_field", "'png', 'json'"),
        ({"model": ""}, 422, "invalid_field", "model"),
        ({"model": 5}, 422, "invalid_field", "model"),
        ({"model": "x" * 201}, 422, "invalid_field", "model"),
        ({"promt": {}}, 422, "unknown_field", "promt"),
        ({"prompt": None}, 422, "missing_field", "prompt"),
        ({"prompt": [{"text": "a"}]}, 422, "invalid_field", "prompts"),
        ({"prompts": [{"text": "a"}]}, 422, "invalid_field", "not both"),
        ({"prompt": None, "prompts": []}, 422, "missing_field", "empty"),
        ({"prompt": None, "prompts": {"text": "a"}}, 422, "invalid_field", "list"),
        ({"image": None}, 422, "missing_field", "image"),
        ({"image": 5}, 422, "invalid_field", "image"),
        ({"image": "@@@@"}, 400, "invalid_base64", "image"),
        ({"image": b64(png_with_header(10, 10, b"not zlib"))}, 400, "corrupt_image", "image"),
        ({"image": b64(b"plain text, no image")}, 415, "not_an_image", "PNG"),
        ({"image": b64(png_with_header(60000, 60000))}, 413, "too_large", "header"),
    ],
)
def test_json_request_errors(photo, change, status, code, fragment):
    body = {"image": b64(png(photo)), "prompt": {"box": [0, 0, 10, 10]}, **change}
    err = api_error(parse_json_request, body, LIMITS)
    assert (err.status, err.code) == (status, code), err.message
    assert fragment in err.message, err.message


@pytest.mark.parametrize(
    "fields, image, mask, status, code",
    [
        ({"box": "1,2,3"}, True, None, 422, "invalid_prompt"),
        ({"box": "a,b,c,d"}, True, None, 422, "invalid_prompt"),
        ({"points": "1,2"}, True, None, 422, "invalid_prompt"),
        ({"points": "1,2,5"}, True, None, 422, "invalid_prompt"),
        ({"points": "1,2,1;nan,2,1"}, True, None, 422, "invalid_prompt"),
        ({"box": "0,0,10,10", "prompt": '{"text": "a"}'}, True, None, 422, "invalid_field"),
        ({"prompt": '{"text": "a"}'}, True, b"mask", 422, "invalid_field"),
        ({"prompt": "{not json"}, True, None, 422, "invalid_prompt"),
        ({"text": "   "}, True, None, 422, "empty_prompt"),
        ({"text": "a", "steps": "many"}, True, None, 422, "invalid_steps"),
        ({"text": "a", "seed": "1.5"}, True, None, 422, "invalid_field"),
        ({"text": "a", "guidance": "strong"}, True, None, 422, "invalid_field"),
        ({"text": "a", "kind": "middle"}, True, None, 422, "unknown_kind"),
        ({"text": "a", "colour": "red"}, True, None, 422, "unknown_field"),
        ({"text": "a"}, False, None, 422, "missing_field"),
        ({"box": "0,0,10,10"}, True, b"\x89PNG\r\n\x1a\nbroken", 422, "invalid_mask"),
        ({"text": "x" * 301}, True, None, 422, "text_too_long"),
    ],
)
def test_form_request_errors(photo, fields, image, mask, status, code):
    err = api_error(parse_form_request, fields, png(photo) if image else None, mask, LIMITS)
    assert (err.status, err.code) == (status, code), err.message


def test_form_mask_file_alone_is_a_prompt(photo):
    req = parse_form_request({}, png(photo), mask_png(), LIMITS)
    assert req.prompts[0]["type"] == "mask" and req.prompts[0]["mask"].sum() == 20 * 20


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_text"):
        Limits(max_text=301)
    with pytest.raises(ValueError, match="max_prompts"):
        Limits(max_prompts=0)


def test_random_bodies_only_ever_raise_api_errors(photo):
    """A small fuzz: every field replaced by odd values; the answer is a request or a 4xx ApiError."""
    rng = np.random.default_rng(5)
    odd = [
        None,
        0,
        -1,
        1.5,
        True,
        "",
        "x",
        [],
        {},
        [[]],
        [0, 0, 0, 0],
        {"text": 1},
        "A" * 5,
        float("inf"),
        2**70,
    ]
    base = {
        "image": b64(png(photo)),
        "prompt": {"points": [[1, 1, 1]], "box": [0, 0, 5, 5], "text": "a"},
        "kind": "foreground",
        "steps": 4,
        "seed": 1,
    }
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        body = json.loads(json.dumps(base))
        for _ in range(int(rng.integers(1, 3))):
            target = body if rng.random() < 0.5 else body["prompt"]
            if not isinstance(target, dict):
                target = body
            keys = list(target) + ["mask", "guidance", "response", "model"]
            target[keys[int(rng.integers(len(keys)))]] = odd[int(rng.integers(len(odd)))]
        try:
            parse_json_request(body, LIMITS)
            outcomes["ok"] += 1
        except ApiError as err:
            assert 400 <= err.status < 500 and err.code and err.message
            outcomes["error"] += 1
    assert outcomes["ok"] > 10 and outcomes["error"] > 100, outcomes
