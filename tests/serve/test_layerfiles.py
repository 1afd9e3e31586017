"""serve/layerfiles.py: a ZIP of layer PNGs and an OpenRaster file, checked by reading them back."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest
from PIL import Image

from reflade.serve.layerfiles import openraster, zip_layers

H, W = 200, 320


def read_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return np.asarray(img)


def random_layer(rng: np.random.Generator, height: int = H, width: int = W) -> np.ndarray:
    layer = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    layer[: height // 4, :, 3] = 0  # some empty, some opaque, the rest partial
    layer[height // 2 :, : width // 3, 3] = 255
    layer[layer[:, :, 3] == 0, :3] = 0  # straight alpha: no colour where alpha is 0
    return layer


@pytest.fixture(scope="module")
def stack() -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    layers = [
        ('cat <top> & "friends"', random_layer(rng)),
        ("cat", random_layer(rng)),
        ("", random_layer(rng)),
    ]
    return image, layers


def test_openraster_structure(stack):
    image, layers = stack
    ora = openraster(image, layers)
    z = zipfile.ZipFile(io.BytesIO(ora))
    assert z.testzip() is None
    first = z.infolist()[0]
    assert first.filename == "mimetype" and first.compress_type == zipfile.ZIP_STORED
    assert z.read("mimetype") == b"image/openraster"
    # What file(1) and editors check: the name and the type at fixed offsets of the first local header.
    assert ora[30:38] == b"mimetype" and ora[38:54] == b"image/openraster"

    root = ET.fromstring(z.read("stack.xml"))
    assert root.tag == "image" and (root.get("w"), root.get("h")) == (str(W), str(H))
    entries = root.find("stack").findall("layer")
    assert len(entries) == len(layers) + 1
    assert [e.get("name") for e in entries] == ['cat <top> & "friends"', "cat", "layer 3", "image"]
    for entry, (_, layer) in zip(entries, [*layers, (None, None)], strict=True):
        pixels = read_png(z.read(entry.get("src")))
        assert (entry.get("x"), entry.get("y"), entry.get("visibility")) == ("0", "0", "visible")
        if layer is None:  # the bottom entry is the source image
            np.testing.assert_array_equal(pixels, image)
        else:
            np.testing.assert_array_equal(pixels, layer)
    assert len({e.get("src") for e in entries}) == len(entries)
    assert {"mergedimage.png", "Thumbnails/thumbnail.png"} <= set(z.namelist())


def test_openraster_merged_image_is_the_alpha_composite(stack):
    image, layers = stack
    z = zipfile.ZipFile(io.BytesIO(openraster(image, layers)))
    merged = read_png(z.read("mergedimage.png"))
    # Independently: Pillow's alpha_composite, bottom layer first, over the opaque source.
    expected = Image.fromarray(np.dstack([image, np.full((H, W), 255, np.uint8)]))
    for _, layer in reversed(layers):
        expected = Image.alpha_composite(expected, Image.fromarray(layer))
    expected_rgb = np.asarray(expected)[:, :, :3].astype(int)
    assert merged.shape[:2] == (H, W)
    assert np.abs(merged[:, :, :3].astype(int) - expected_rgb).max() <= 1
    # The top layer's opaque pixels show as they are; where every layer is empty, the source does.
    top = layers[0][1]
    opaque = top[:, :, 3] == 255
    np.testing.assert_array_equal(merged[:, :, :3][opaque], top[:, :, :3][opaque])
    np.testing.assert_array_equal(merged[: H // 4, :, :3], image[: H // 4])

    thumb = read_png(z.read("Thumbnails/thumbnail.png"))
    assert max(thumb.shape[:2]) <= 256 and thumb.shape[:2] == (160, 256)  # aspect ratio kept


def test_openraster_small_image_and_no_layers():
    image = np.full((10, 12, 3), 7, np.uint8)
    z = zipfile.ZipFile(io.BytesIO(openraster(image, [])))
    assert len(ET.fromstring(z.read("stack.xml")).find("stack").findall("layer")) == 1
    np.testing.assert_array_equal(read_png(z.read("mergedimage.png"))[:, :, :3], image)
    assert read_png(z.read("Thumbnails/thumbnail.png")).shape[:2] == (10, 12)


def test_openraster_is_deterministic_and_refuses_bad_input(stack):
    image, layers = stack
    assert openraster(image, layers) == openraster(image, layers)
    with pytest.raises(ValueError, match="layers\\[0\\] is 319x200"):
        openraster(image, [("small", np.zeros((H, W - 1, 4), np.uint8))])
    with pytest.raises(ValueError, match="HxWx4"):
        openraster(image, [("rgb", np.zeros((H, W, 3), np.uint8))])
    with pytest.raises(ValueError, match="HxWx3"):
        openraster(np.zeros((H, W, 4), np.uint8), [])


def test_zip_layer_names_are_safe_and_unique():
    rng = np.random.default_rng(1)
    names = [
        "cat",
        "cat",
        "Cat",
        "",
        "../../etc/passwd",
        "a/b\\c",
        "猫",
        "cat.png",
        "CON",
        "  .hidden",
        "cat-2",
    ]
    layers = [(name, random_layer(rng, 8 + i, 6)) for i, name in enumerate(names)]
    z = zipfile.ZipFile(io.BytesIO(zip_layers(layers)))
    files = z.namelist()
    assert len(files) == len(names)
    assert len({f.lower() for f in files}) == len(files)
    for f in files:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.png", f), f
        assert f.lower() not in ("con.png",)
    assert files[:3] == ["cat.png", "cat-2.png", "Cat-3.png"]
    assert files[10] != "cat-2.png"  # taken by the second "cat"
    for f, (_, layer) in zip(files, layers, strict=True):  # in the given order, pixels intact
        np.testing.assert_array_equal(read_png(z.read(f)), layer)
    with pytest.raises(ValueError, match="layers\\[0\\]"):
        zip_layers([("x", np.zeros((4, 4, 3), np.uint8))])
