"""Real photos: what a model and the ``classical`` baseline make of scikit-image's bundled photographs.

The synthetic scenes the tiny model trains on are shapes over textures and photo crops; these three photographs
(astronaut, coffee, chelsea, bundled with scikit-image, no download) are not scenes of that kind. Each photo gets
one box and one point prompt on its main subject (:data:`PHOTO_PROMPTS`, in the photo's pixels), every decomposer
decomposes each prompt as a foreground, and :func:`photo_sheet` lays the results out as one picture: a row per
photo and prompt, with the photo and its prompt drawn, then each decomposer's layer over a checkerboard.

``reflade eval photos`` writes the sheet (docs/training.md shows it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

PHOTO_PROMPTS: dict[str, dict[str, Any]] = {
    "astronaut": {"box": [17, 8, 367, 512], "point": [222, 110], "what": "the astronaut"},
    "coffee": {"box": [170, 10, 420, 300], "point": [290, 140], "what": "the cup"},
    "chelsea": {"box": [60, 0, 380, 300], "point": [263, 240], "what": "the cat's head"},
}
"""Per photo: a box ``[x0, y0, x1, y1]`` (half-open) and a positive point ``[x, y]`` on its subject."""
TILE_HEIGHT = 192
"""Height in pixels of each picture in the sheet."""


def photo_items() -> list[tuple[str, np.ndarray, dict[str, Any]]]:
    """``(label, image, prompt)`` per photo and prompt type (box, then point), prompts in the sample format."""
    import skimage.data

    items = []
    for name, spec in PHOTO_PROMPTS.items():
        image = np.ascontiguousarray(getattr(skimage.data, name)())
        x, y = spec["point"]
        items.append((f"{name}: box on {spec['what']}", image, {"type": "box", "box": list(spec["box"])}))
        items.append((f"{name}: point on {spec['what']}", image, {"type": "point", "points": [[x, y, 1]]}))
    return items


def decompose_photos(
    decomposers: Mapping[str, Any], *, kind: str = "foreground", steps: int = 20, seed: int = 0
) -> tuple[list[tuple[str, np.ndarray, dict[str, Any]]], dict[str, list[np.ndarray]]]:
    """Every photo prompt through every decomposer (the decomposition API, one call each, at the photo's size).

    Returns:
        The items (:func:`photo_items`) and, per decomposer name, their RGBA layers in the same order.
    """
    items = photo_items()
    layers = {
        name: dec.decompose(
            [im for _, im, _ in items],
            [p for _, _, p in items],
            [kind] * len(items),
            steps=steps,
            seeds=seed,
        )
        for name, dec in decomposers.items()
    }
    return items, layers


def photo_sheet(items: list[tuple[str, np.ndarray, dict[str, Any]]], layers: Mapping[str, list[np.ndarray]]):
    """One RGB picture: a row per item (its label, the photo with the prompt drawn, each decomposer's layer over a
    checkerboard under the decomposer's name)."""
    import cv2
    from PIL import Image, ImageDraw

    from reflade.engine.browse import draw_prompts, over_checkerboard

    label_h, pad = 16, 6
    rows = []
    for i, (label, image, prompt) in enumerate(items):
        scale = TILE_HEIGHT / image.shape[0]
        w = round(image.shape[1] * scale)
        shown = draw_prompts(
            cv2.resize(image, (w, TILE_HEIGHT), interpolation=cv2.INTER_AREA), [_scaled(prompt, scale)]
        )
        tiles = [("photo + prompt", shown)]
        tiles += [(name, over_checkerboard(layer[i])) for name, layer in layers.items()]
        parts = []
        for name, arr in tiles:
            small = cv2.resize(arr, (w, TILE_HEIGHT), interpolation=cv2.INTER_AREA)
            tile = Image.new("RGB", (w + pad, TILE_HEIGHT + label_h), "white")
            tile.paste(Image.fromarray(small), (0, label_h))
            ImageDraw.Draw(tile).text((2, 2), name, fill=(0, 0, 0))
            parts.append(np.asarray(tile))
        row = np.concatenate(parts, axis=1)
        head = Image.new("RGB", (row.shape[1], label_h), "white")
        ImageDraw.Draw(head).text((2, 2), label, fill=(0, 0, 0))
        rows.append(np.concatenate([np.asarray(head), row, np.full((pad, row.shape[1], 3), 255, np.uint8)]))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def _scaled(prompt: dict[str, Any], scale: float) -> dict[str, Any]:
    """A box or point prompt in the coordinates of the photo resized by ``scale`` (for drawing)."""
    out = dict(prompt)
    if prompt.get("box") is not None:
        out["box"] = [round(v * scale) for v in prompt["box"]]
    if prompt.get("points"):
        out["points"] = [[round(x * scale), round(y * scale), label] for x, y, label in prompt["points"]]
    return out
