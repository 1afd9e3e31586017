"""Layer stacks as files people open: a ZIP of PNGs, and an OpenRaster (.ora) file that image editors read.

OpenRaster (https://www.openraster.org/, read by GIMP, Krita and MyPaint) is a ZIP holding, in this order:
``mimetype`` (first, stored uncompressed, content ``image/openraster``, so that the type shows at a fixed
offset), ``stack.xml`` (the layers, topmost first), ``data/*.png`` (one per layer), ``mergedimage.png`` (the
composite) and ``Thumbnails/thumbnail.png`` (at most 256 px). Both writers are deterministic: the same layers give
the same bytes.
"""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
from PIL import Image

from reflade.engine.schema import encode_png

__all__ = ["ORA_MIMETYPE", "THUMBNAIL_SIDE", "composite", "openraster", "zip_layers"]

ORA_MIMETYPE = "image/openraster"
THUMBNAIL_SIDE = 256
"""Longest side of an OpenRaster thumbnail, pixels (the format's maximum)."""

_DATE = (1980, 1, 1, 0, 0, 0)  # ZIP's earliest date: fixed, so that the bytes depend on the layers only
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{d}" for p in ("com", "lpt") for d in range(1, 10)}


def zip_layers(layers: list[tuple[str, np.ndarray]]) -> bytes:
    """A ZIP with one RGBA PNG per layer, in the given order.

    Args:
        layers: (name, HxWx4 uint8 RGBA, straight alpha); sizes may differ. Names become file names: characters
            outside ``A-Z a-z 0-9 . _ -`` are replaced, an empty result becomes ``layer``, and repeats (compared
            without case, as macOS and Windows do) get ``-2``, ``-3``, ...

    Returns:
        The ZIP file's bytes.

    Raises:
        ValueError: a layer is not HxWx4 uint8.
    """
    used: set[str] = set()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i, (name, layer) in enumerate(layers):
            _check_rgba(layer, f"layers[{i}]")
            _write(z, f"{_unique_stem(name, used)}.png", encode_png(layer))
    return buf.getvalue()


def openraster(image: np.ndarray, layers: list[tuple[str, np.ndarray]]) -> bytes:
    """An OpenRaster file: the layers, topmost first, above the source image as the bottom layer.

    Args:
        image: HxWx3 uint8 RGB, the source image.
        layers: (name, HxWx4 uint8 RGBA, straight alpha), same size as ``image``, topmost first. Names are kept
            as the layers' names in the editor (control characters removed).

    Returns:
        The .ora file's bytes.

    Raises:
        ValueError: a bad image or layer, or a layer of another size than the image.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    height, width = image.shape[:2]
    for i, (_, layer) in enumerate(layers):
        _check_rgba(layer, f"layers[{i}]")
        if layer.shape[:2] != (height, width):
            raise ValueError(
                f"layers[{i}] is {layer.shape[1]}x{layer.shape[0]}, the image is {width}x{height}"
            )

    root = ET.Element(
        "image", {"version": "0.0.6", "w": str(width), "h": str(height), "xres": "72", "yres": "72"}
    )
    stack = ET.SubElement(root, "stack")
    files: list[tuple[str, bytes]] = []
    for i, (name, layer) in enumerate(layers):
        src = f"data/layer-{i + 1:03d}.png"
        _layer_element(stack, _display_name(name, f"layer {i + 1}"), src)
        files.append((src, encode_png(layer)))
    _layer_element(stack, "image", "data/image.png")
    files.append(("data/image.png", encode_png(image)))
    ET.indent(root)
    stack_xml = ET.tostring(root, encoding="UTF-8", xml_declaration=True)

    merged = composite(image, [layer for _, layer in layers])
    thumbnail = Image.fromarray(merged)
    thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        _write(z, "mimetype", ORA_MIMETYPE.encode("ascii"))  # first and stored, as the format requires
        _write(z, "stack.xml", stack_xml, compress=True)
        for path, data in files:
            _write(z, path, data)
        _write(z, "mergedimage.png", encode_png(merged))
        _write(z, "Thumbnails/thumbnail.png", encode_png(np.asarray(thumbnail)))
    return buf.getvalue()


def composite(image: np.ndarray, layers: list[np.ndarray]) -> np.ndarray:
    """Layers (HxWx4 uint8, straight alpha, topmost first) over an opaque HxWx3 image: HxWx3 uint8.

    Source-over, bottom layer first: ``out = rgb * a + out * (1 - a)`` with ``a = alpha / 255``, rounded.
    """
    out = np.asarray(image, dtype=np.float32).copy()
    for layer in reversed(layers):
        alpha = layer[:, :, 3:4].astype(np.float32) / 255.0
        out = layer[:, :, :3].astype(np.float32) * alpha + out * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _layer_element(stack: ET.Element, name: str, src: str) -> None:
    ET.SubElement(
        stack,
        "layer",
        {
            "name": name,
            "src": src,
            "x": "0",
            "y": "0",
            "opacity": "1.0",
            "visibility": "visible",
            "composite-op": "svg:src-over",
        },
    )


def _check_rgba(layer: np.ndarray, where: str) -> None:
    a = np.asarray(layer)
    if a.ndim != 3 or a.shape[2] != 4 or a.dtype != np.uint8 or 0 in a.shape:
        raise ValueError(f"{where} must be HxWx4 uint8 RGBA, got shape {a.shape} dtype {a.dtype}")


def _unique_stem(name: str, used: set[str]) -> str:
    """A safe file name stem for ``name``, not yet in ``used`` (lower-cased); records it there."""
    name = str(name)
    if name.lower().endswith(".png"):
        name = name[:-4]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-_")[:64] or "layer"
    if stem.lower() in _WINDOWS_RESERVED:
        stem += "-layer"
    candidate, k = stem, 2
    while candidate.lower() in used:
        candidate, k = f"{stem}-{k}", k + 1
    used.add(candidate.lower())
    return candidate


def _display_name(name: str, fallback: str) -> str:
    # XML 1.0 cannot hold most control characters: ElementTree would write a file editors refuse.
    cleaned = " ".join("".join(c if c.isprintable() else " " for c in str(name)).split())
    return cleaned[:200] or fallback


def _write(z: zipfile.ZipFile, path: str, data: bytes, *, compress: bool = False) -> None:
    info = zipfile.ZipInfo(path, date_time=_DATE)
    info.compress_type = (
        zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    )  # PNGs are compressed already
    info.external_attr = 0o644 << 16
    z.writestr(info, data)
