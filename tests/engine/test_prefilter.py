"""Stage 1, the pre-filter: hostile files, the bundled photos, the quality rules, hashing and the Ray batch callable."""

from __future__ import annotations

import io
import json
import struct
import time
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile
from skimage import data as skdata

from reflade.engine.config import EngineConfig
from reflade.engine.stages.prefilter import (
    REASON_CODES,
    Decoded,
    PreFilter,
    decode_and_check,
    find_near_duplicates,
    reason_code,
)

CFG = EngineConfig()
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """The bundled scikit-image colour photos, HxWx3 uint8 RGB."""
    return {name: getattr(skdata, name)() for name in PHOTOS}


def encode(pixels: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def encode_mode(pixels: np.ndarray, mode: str, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def decoded_pixels(result: Decoded) -> np.ndarray:
    assert result.image_png is not None
    img = Image.open(io.BytesIO(result.image_png))
    assert img.format == "PNG" and img.mode == "RGB"
    pixels = np.asarray(img)
    assert pixels.shape == (result.height, result.width, 3)
    return pixels


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def png_with_header(width: int, height: int) -> bytes:
    """A well-formed PNG whose IHDR declares width x height RGB pixels, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def code_of(result: Decoded) -> str:
    return reason_code(result.reason or "")


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


# ---------------------------------------------------------------- the hostile folder


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, photos) -> dict[str, bytes]:
    """Files that try to crash, exhaust or fool the decoder, written to a folder and read back."""
    folder = tmp_path_factory.mktemp("hostile")
    astronaut_jpeg = encode(photos["astronaut"], "JPEG", quality=90)
    # 16-bit samples with noise in the low byte: scaling keeps the photo, clipping would turn it white.
    noise = np.random.default_rng(0).integers(-64, 64, photos["coffee"].shape)
    rgb16 = np.clip(photos["coffee"].astype(np.int64) * 257 + noise, 0, 65535).astype(np.uint16)
    files = {
        "truncated.jpg": astronaut_jpeg[: len(astronaut_jpeg) // 2],
        "huge_header.png": png_with_header(60000, 60000),
        "text.jpg": b"This is not a JPEG at all, just some text.\n" * 20,
        "empty.jpg": b"",
        "one_pixel.png": encode(np.zeros((1, 1, 3), np.uint8)),
        "cmyk.jpg": encode_mode(photos["coffee"], "CMYK", "JPEG", quality=95),
        "rgb16.png": cv2.imencode(".png", np.ascontiguousarray(rgb16[:, :, ::-1]))[1].tobytes(),
        "gray16.png": cv2.imencode(".png", skdata.camera().astype(np.uint16) * 257)[1].tobytes(),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


EXPECTED_HOSTILE = {
    "truncated.jpg": "truncated",
    "huge_header.png": "too_large",
    "text.jpg": "not_an_image",
    "empty.jpg": "empty",
    "one_pixel.png": "too_small",
    "cmyk.jpg": None,  # accepted
    "rgb16.png": None,  # accepted
    "gray16.png": "grayscale",  # decoded (scaled, not clipped), then rejected for having no colour
}


@pytest.mark.parametrize("name", sorted(EXPECTED_HOSTILE))
def test_hostile_file_gets_expected_outcome(hostile, name):
    result = decode_and_check(hostile[name], CFG, name=name)  # must not raise
    expected = EXPECTED_HOSTILE[name]
    if expected is None:
        assert result.ok, result.reason
        assert result.reason is None
    else:
        assert not result.ok
        assert code_of(result) == expected, result.reason
        assert code_of(result) in REASON_CODES


def test_hostile_files_rejected_before_decoding_have_no_pixels(hostile):
    for name in ("truncated.jpg", "huge_header.png", "text.jpg", "empty.jpg", "one_pixel.png"):
        result = decode_and_check(hostile[name], CFG, name=name)
        assert result.image_png is None and result.phash is None
        assert (result.width, result.height) == (0, 0)
    # Pillow's own guard refused the 60000x60000 header, so no size was recorded.
    assert decode_and_check(hostile["huge_header.png"], CFG).original_size is None
    assert decode_and_check(hostile["one_pixel.png"], CFG).original_size == (1, 1)
    assert "text.jpg" in decode_and_check(hostile["text.jpg"], CFG, name="text.jpg").reason


def test_huge_header_is_refused_fast_without_allocating(hostile):
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = decode_and_check(hostile["huge_header.png"], CFG)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code_of(result) == "too_large", result.reason
    assert peak < 5 * 2**20, f"peak {peak} bytes"  # decoding would need 10.8 GB
    assert elapsed < 5.0  # decoding 3.6e9 pixels would take minutes


def test_our_header_check_works_without_pillows_guard(hostile, monkeypatch):
    """With Pillow's decompression-bomb guard off, the pre-filter's own max_pixels check still refuses."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    result = decode_and_check(hostile["huge_header.png"], CFG)
    assert code_of(result) == "too_large"
    assert "60000x60000" in result.reason
    assert result.original_size == (60000, 60000)


def test_max_pixels_from_config_is_enforced_below_pillows_limit():
    # 85 M px: above the default max_pixels (80 M), below Pillow's own warning (89 M).
    result = decode_and_check(png_with_header(10000, 8500), CFG)
    assert code_of(result) == "too_large" and "10000x8500" in result.reason
    small_limit = EngineConfig(max_pixels=100 * 100)
    result = decode_and_check(png_with_header(200, 200), small_limit)
    assert code_of(result) == "too_large"


def test_file_size_limit_checked_first():
    cfg = EngineConfig(max_file_mb=0.001)  # ~1 KiB
    result = decode_and_check(b"\x00" * 4096, cfg)
    assert code_of(result) == "too_large" and "MiB" in result.reason


def test_truncated_images_are_rejected_not_padded(photos, monkeypatch):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # importing the pre-filter must not flip it
    jpeg = encode(photos["coffee"], "JPEG", quality=90)
    png = encode(photos["coffee"], "PNG")
    for cut in (len(jpeg) // 3, len(jpeg) - 2):
        assert code_of(decode_and_check(jpeg[:cut], CFG)) == "truncated"
    assert code_of(decode_and_check(png[: len(png) // 2], CFG)) == "truncated"
    # Even when something else in the process flips Pillow's global switch, nothing grey-padded gets through.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert code_of(decode_and_check(jpeg[: len(jpeg) // 2], CFG)) == "truncated"
    assert code_of(decode_and_check(png[: len(png) // 2], CFG)) == "truncated"
    assert decode_and_check(jpeg, CFG).ok


def test_cmyk_jpeg_is_converted_to_rgb(hostile, photos):
    result = decode_and_check(hostile["cmyk.jpg"], CFG)
    assert result.ok, result.reason
    pixels = decoded_pixels(result)
    assert pixels.shape == photos["coffee"].shape
    assert np.abs(pixels.astype(int) - photos["coffee"]).mean() < 3.0


def test_16bit_rgb_png_is_scaled_not_clipped(hostile, photos):
    result = decode_and_check(hostile["rgb16.png"], CFG)
    assert result.ok, result.reason
    diff = np.abs(decoded_pixels(result).astype(int) - photos["coffee"])
    assert diff.max() <= 1 and diff.mean() < 0.5  # clipping to 255 would make nearly everything white


def test_16bit_grayscale_png_is_scaled_then_rejected_as_grayscale(hostile):
    camera = skdata.camera()
    result = decode_and_check(hostile["gray16.png"], CFG)
    assert code_of(result) == "grayscale", result.reason
    pixels = decoded_pixels(result)
    assert np.abs(pixels[:, :, 0].astype(int) - camera).max() <= 1
    assert (pixels[:, :, 0] == pixels[:, :, 2]).all()
    assert result.scores["std"] == pytest.approx(camera.std(), abs=0.5)


def test_fuzzed_files_never_raise(photos):
    rng = np.random.default_rng(7)
    small = cv2.resize(photos["chelsea"], (96, 64), interpolation=cv2.INTER_AREA)
    seeds = [
        encode(small, "JPEG", quality=80),
        encode(small, "PNG"),
        encode(small, "GIF"),
        encode(small, "WEBP"),
    ]
    for k in range(160):
        blob = bytearray(seeds[k % len(seeds)])
        for pos in rng.integers(0, len(blob), size=int(rng.integers(1, 12))):
            blob[pos] = int(rng.integers(0, 256))
        if k % 5 == 0:
            blob = blob[: int(rng.integers(1, len(blob)))]
        result = decode_and_check(bytes(blob), CFG)
        assert result.ok or code_of(result) in REASON_CODES, result.reason


# ---------------------------------------------------------------- the bundled photos and the quality rules


def variants(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The photo, a 256x256 centre crop and a resize to 256 px on the longest side."""
    h, w = pixels.shape[:2]
    crop = pixels[(h - 256) // 2 : (h - 256) // 2 + 256, (w - 256) // 2 : (w - 256) // 2 + 256]
    scale = 256 / max(h, w)
    resized = cv2.resize(pixels, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    return {"full": pixels, "crop256": crop, "resize256": resized}


@pytest.mark.parametrize("name", PHOTOS)
def test_bundled_photos_pass_with_sensible_scores(photos, name):
    for label, pixels in variants(photos[name]).items():
        result = decode_and_check(encode(pixels), CFG, name=f"{name}-{label}")
        assert result.ok, f"{name}-{label}: {result.reason}"
        assert (result.width, result.height) == (pixels.shape[1], pixels.shape[0])
        assert result.scores["sharpness"] > 2 * CFG.min_sharpness
        assert result.scores["saturation"] > 2 * CFG.min_saturation
        assert result.scores["std"] > 2 * CFG.min_std
        assert 0 <= result.phash < 2**64
        # Lossless PNG round trip; no photo exceeds max_side.
        np.testing.assert_array_equal(decoded_pixels(result), pixels)


@pytest.mark.parametrize("name", PHOTOS)
def test_blurred_photos_are_rejected_as_blurry(photos, name):
    for label, pixels in variants(photos[name]).items():
        sigma = 4.0 * max(pixels.shape[:2]) / 512  # 4 px at the 512 px measuring scale
        blurred = cv2.GaussianBlur(pixels, (0, 0), sigma)
        result = decode_and_check(encode(blurred), CFG, name=f"{name}-{label}-blurred")
        assert code_of(result) == "blurry", f"{name}-{label}: {result.reason}"
        assert result.scores["sharpness"] < CFG.min_sharpness / 2


def test_sharpness_does_not_depend_on_resolution(photos):
    """The same scene stored at 2048, 1024 or 768 px scores about the same (measured at 512 px)."""
    scene = cv2.resize(photos["astronaut"], (2048, 2048), interpolation=cv2.INTER_CUBIC)
    at_2048 = decode_and_check(encode(scene), EngineConfig(max_side=2048)).scores["sharpness"]
    at_1024 = decode_and_check(encode(scene), CFG).scores["sharpness"]
    at_768 = decode_and_check(
        encode(cv2.resize(scene, (768, 768), interpolation=cv2.INTER_AREA)), CFG
    ).scores["sharpness"]
    assert at_1024 == pytest.approx(at_2048, rel=0.15)
    assert at_768 == pytest.approx(at_2048, rel=0.3)  # a non-integer area downscale smooths a little more
    grey = cv2.cvtColor(scene, cv2.COLOR_RGB2GRAY).astype(np.float32)
    assert cv2.Laplacian(grey, cv2.CV_32F).var() < at_2048 / 4  # unnormalised, resolution would dominate


def test_grayscale_photos_are_rejected():
    camera = skdata.camera()
    as_rgb = decode_and_check(encode(np.repeat(camera[:, :, None], 3, axis=2), "JPEG", quality=90), CFG)
    as_l = decode_and_check(encode(camera), CFG)
    for result in (as_rgb, as_l):
        assert code_of(result) == "grayscale", result.reason
        assert result.scores["saturation"] < 0.01


def test_near_constant_images_are_rejected():
    rng = np.random.default_rng(1)
    flat = np.full((300, 400, 3), (180, 40, 60), np.float64) + rng.normal(0, 2.0, (300, 400, 1))
    result = decode_and_check(encode(np.clip(flat, 0, 255).astype(np.uint8)), CFG)
    assert code_of(result) == "near_constant", result.reason
    result = decode_and_check(encode(np.zeros((100, 100, 3), np.uint8)), CFG)
    assert code_of(result) == "near_constant", result.reason


def test_extreme_aspect_and_too_small_are_rejected(photos):
    strip = cv2.resize(photos["coffee"], (1000, 200), interpolation=cv2.INTER_AREA)
    result = decode_and_check(encode(strip), CFG)
    assert code_of(result) == "aspect" and result.scores["aspect"] == pytest.approx(5.0)
    assert (result.width, result.height) == (0, 0)  # refused from the header
    tall = np.ascontiguousarray(strip.transpose(1, 0, 2))
    assert code_of(decode_and_check(encode(tall), CFG)) == "aspect"
    tiny = photos["coffee"][100:150, 200:300]
    result = decode_and_check(encode(tiny), CFG)
    assert code_of(result) == "too_small" and "100x50" in result.reason


def test_max_side_cap_keeps_the_aspect_ratio(photos):
    cfg = EngineConfig(max_side=256)
    result = decode_and_check(encode(photos["coffee"]), cfg)  # 600x400
    assert result.ok, result.reason
    assert (result.width, result.height) == (256, 171)
    assert result.original_size == (600, 400)
    expected = cv2.resize(photos["coffee"], (256, 171), interpolation=cv2.INTER_AREA)
    assert np.abs(decoded_pixels(result).astype(int) - expected).mean() < 1.0
    # A large JPEG goes through libjpeg's reduced-scale decoding, then the area downscale.
    big = cv2.resize(photos["rocket"], (3000, 2002), interpolation=cv2.INTER_CUBIC)
    result = decode_and_check(encode(big, "JPEG", quality=92), CFG)
    assert result.ok, result.reason
    assert (result.width, result.height) == (1024, 683)
    assert result.original_size == (3000, 2002)


def test_exif_orientation_is_applied(photos):
    upright = photos["astronaut"][96:416, 0:480]  # 480 wide, 320 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer turns it 90 degrees clockwise
    jpeg = encode(upright, "JPEG", quality=95, exif=exif.tobytes())
    result = decode_and_check(jpeg, CFG)
    assert result.ok, result.reason
    assert result.original_size == (480, 320)
    assert (result.width, result.height) == (320, 480)
    pixels = decoded_pixels(result).astype(int)
    clockwise = np.rot90(upright, k=-1).astype(int)
    assert np.abs(pixels - clockwise).mean() < 4.0
    assert np.abs(pixels - np.rot90(upright, k=1)).mean() > 20.0


def test_alpha_is_composited_over_white(photos):
    rgba = np.dstack([photos["coffee"], np.full(photos["coffee"].shape[:2], 255, np.uint8)])
    rgba[:, :300, :3] = 0  # colour hidden under transparent pixels must not show
    rgba[:, :300, 3] = 0
    result = decode_and_check(encode(rgba), CFG)
    assert result.ok, result.reason
    pixels = decoded_pixels(result)
    assert (pixels[:, :300] == 255).all()
    np.testing.assert_array_equal(pixels[:, 300:], photos["coffee"][:, 300:])
    # The same with a cap, so the downscale mixes transparent and opaque pixels: no dark seam.
    capped = decoded_pixels(decode_and_check(encode(rgba), EngineConfig(max_side=300)))
    assert capped[:, :149].min() == 255


def test_palette_la_and_animated_gif(photos):
    buf = io.BytesIO()
    Image.fromarray(photos["chelsea"]).quantize(256).save(buf, format="PNG")
    result = decode_and_check(buf.getvalue(), CFG)
    assert result.ok, result.reason
    assert np.abs(decoded_pixels(result).astype(int) - photos["chelsea"]).mean() < 8.0

    grey_alpha = encode_mode(photos["chelsea"], "LA", "PNG")
    assert code_of(decode_and_check(grey_alpha, CFG)) == "grayscale"

    first = photos["coffee"]
    second = cv2.resize(photos["rocket"], (first.shape[1], first.shape[0]), interpolation=cv2.INTER_AREA)
    buf = io.BytesIO()
    frames = [Image.fromarray(first), Image.fromarray(second)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    result = decode_and_check(buf.getvalue(), CFG)
    assert result.ok, result.reason
    assert result.scores.get("animated") == 1.0
    pixels = decoded_pixels(result).astype(int)
    assert np.abs(pixels - first).mean() < np.abs(pixels - second).mean() / 3


# ---------------------------------------------------------------- perceptual hashes and near-duplicates


def test_near_duplicates_of_the_bundled_photos(photos):
    def phash_of(pixels: np.ndarray, fmt: str = "PNG", **kwargs) -> int:
        result = decode_and_check(encode(pixels, fmt, **kwargs), CFG)
        assert result.ok, result.reason
        return result.phash

    originals = {name: phash_of(pixels) for name, pixels in photos.items()}
    for name, pixels in photos.items():
        h, w = pixels.shape[:2]
        requantised = phash_of(pixels, "JPEG", quality=70)
        resized = phash_of(cv2.resize(pixels, (round(w * 0.9), round(h * 0.9)), interpolation=cv2.INTER_AREA))
        assert hamming(originals[name], requantised) <= CFG.dup_hamming, name
        assert hamming(originals[name], resized) <= CFG.dup_hamming, name
    for a in PHOTOS:
        for b in PHOTOS:
            if a < b:
                assert hamming(originals[a], originals[b]) > 2 * CFG.dup_hamming, (a, b)

    coffee_small = cv2.resize(photos["coffee"], (540, 360), interpolation=cv2.INTER_AREA)
    items = [
        ("astronaut", originals["astronaut"]),
        ("coffee", originals["coffee"]),
        ("astronaut-q70", phash_of(photos["astronaut"], "JPEG", quality=70)),
        ("chelsea", originals["chelsea"]),
        ("coffee-small", phash_of(coffee_small)),
        ("rocket", originals["rocket"]),
    ]
    assert find_near_duplicates(items, CFG.dup_hamming) == {
        "astronaut-q70": "astronaut",
        "coffee-small": "coffee",
    }


def brute_force_duplicates(items: list[tuple[str, int]], max_hamming: int) -> dict[str, str]:
    kept: list[tuple[str, int]] = []
    duplicates = {}
    for source_id, h in items:
        match = next((k for k, kh in kept if hamming(h, kh) <= max_hamming), None)
        if match is None:
            kept.append((source_id, h))
        else:
            duplicates[source_id] = match
    return duplicates


def test_find_near_duplicates_keeps_first_and_compares_with_kept_only():
    a = 0
    b = 0b1111  # 4 bits from a
    c = 0b11111111  # 8 bits from a, 4 from b
    d = (1 << 64) - 1  # far from everything, top bit set (unsigned)
    e = d ^ 0b111  # 3 bits from d
    items = [("a", a), ("b", b), ("c", c), ("d", d), ("e", e)]
    # b is a duplicate of a; c is near b only, and b was not kept, so c stays.
    assert find_near_duplicates(items, 6) == {"b": "a", "e": "d"}
    assert find_near_duplicates(items, 3) == {"e": "d"}
    assert find_near_duplicates(items, 0) == {}
    assert find_near_duplicates([], 6) == {} and find_near_duplicates([("x", 5)], 6) == {}
    assert find_near_duplicates([("x", 5), ("y", 5), ("x", 5)], 6) == {"y": "x"}


def test_find_near_duplicates_matches_brute_force_on_clusters():
    rng = np.random.default_rng(3)
    centres = [int(x) for x in rng.integers(0, 2**63, size=40, dtype=np.int64)]
    items = []
    for k in range(400):
        h = centres[int(rng.integers(0, len(centres)))]
        for bit in rng.integers(0, 64, size=int(rng.integers(0, 9))):
            h ^= 1 << int(bit)
        items.append((f"s{k}", h))
    for max_hamming in (0, 3, 6, 10):
        assert find_near_duplicates(items, max_hamming) == brute_force_duplicates(items, max_hamming)


def test_find_near_duplicates_on_5000_hashes():
    rng = np.random.default_rng(11)
    hashes = [int(x) for x in rng.integers(0, 2**64, size=5000, dtype=np.uint64)]
    planted = {}
    for k in range(100, 5000, 100):  # every 100th hash becomes a near copy (5 bits flipped) of one 37 before
        h = hashes[k - 37]
        for bit in rng.choice(64, size=5, replace=False):
            h ^= 1 << int(bit)
        hashes[k] = h
        planted[f"s{k}"] = f"s{k - 37}"
    items = [(f"s{k}", h) for k, h in enumerate(hashes)]
    found = find_near_duplicates(items, CFG.dup_hamming)
    for dup, kept in planted.items():
        assert found.get(dup) == kept, dup
    index = {source_id: k for k, (source_id, _) in enumerate(items)}
    for dup, kept in found.items():
        assert index[kept] < index[dup]
        assert hamming(hashes[index[dup]], hashes[index[kept]]) <= CFG.dup_hamming
        assert kept not in found  # duplicates map to kept items


# ---------------------------------------------------------------- the Ray Data batch callable


def test_reason_code():
    assert reason_code("too_large: header declares 60000x60000") == "too_large"
    assert reason_code("duplicate_of: photo-7") == "duplicate_of"
    assert reason_code("") == ""


def test_prefilter_batch(photos, hostile):
    coffee = encode(photos["coffee"])
    payloads = [
        ("coffee", coffee),
        ("empty", b""),
        ("astronaut", encode(photos["astronaut"], "JPEG", quality=90)),
        ("coffee-again", encode(photos["coffee"], "JPEG", quality=70)),
        ("huge", hostile["huge_header.png"]),
        ("camera", encode(skdata.camera())),
    ]
    data = np.empty(len(payloads), dtype=object)
    data[:] = [p for _, p in payloads]
    batch = {
        "source_id": np.array([s for s, _ in payloads]),
        "data": data,
        "origin": np.array(["bundled"] * len(payloads), dtype=object),
    }
    out = PreFilter()(batch)
    n = len(payloads)
    assert "data" not in out
    for column in ("source_id", "origin", "ok", "reason", "image", "width", "height", "scores", "phash"):
        assert len(out[column]) == n, column
    assert out["ok"].dtype == bool and out["phash"].dtype == np.uint64
    assert out["ok"].tolist() == [True, False, True, False, False, False]
    assert [reason_code(r) for r in out["reason"]] == [
        "",
        "empty",
        "",
        "duplicate_of",
        "too_large",
        "grayscale",
    ]
    assert out["reason"][3] == "duplicate_of: coffee"
    assert out["image"][1] == b"" and out["image"][0][:8] == b"\x89PNG\r\n\x1a\n"
    assert (out["width"][0], out["height"][0]) == (600, 400) and out["width"][4] == 0
    assert out["phash"][1] == 0 and out["phash"][0] != 0
    scores = json.loads(out["scores"][0])
    assert scores["sharpness"] > CFG.min_sharpness and scores["saturation"] > CFG.min_saturation
    assert json.loads(out["scores"][1]) == {}
    assert len(out["source_sha256"][0]) == 64
    empty = PreFilter(CFG)({"source_id": np.array([], dtype=object), "data": np.array([], dtype=object)})
    assert len(empty["ok"]) == 0 and "data" not in empty
