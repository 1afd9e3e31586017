"""Synthetic scenes with exact ground truth for Referring Layer Decomposition.

A scene is a background plus a few procedural RGBA objects stacked back to front. Every object's complete layer
(hidden parts included), its visible and amodal masks, and the scene with any one object removed are known exactly,
because the image *is* the composite of those layers (``composite``, integer arithmetic, bit-exact).

Everything is drawn from one ``numpy.random.Generator`` seeded with the scene's seed: the same seed gives identical
arrays, on any run. Sizes are ``(height, width)`` in pixels, like the arrays.

This module holds the scene's contract (``make_scene``, the dataclasses, ``composite``); the pixels (colour words,
backgrounds, object fills) come from ``synth_textures.py``, the shapes and their placement with controlled occlusion
from ``synth_objects.py``.

Example::

    scene = make_scene(3)
    obj = scene.objects[0]                      # the farthest object
    obj.layer                                   # HxWx4 uint8, straight alpha, the complete layer
    scene.without(obj.entity_id)                # HxWx3 uint8, the ground-truth background layer
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from reflade.engine.synth_objects import CATEGORIES, Placement, place_object
from reflade.engine.synth_textures import COLOR_NAMES, photo_background, texture_background


@dataclass
class SynthObject:
    """One object of a synthetic scene, with its exact ground truth.

    Attributes:
        entity_id: position in back-to-front order (0 = farthest).
        category: shape name, one of ``CATEGORIES``.
        color_name: basic colour word of its dominant colour, one of ``COLOR_NAMES``.
        layer: HxWx4 uint8, the complete layer (hidden parts included), straight alpha, RGB = 0 where alpha = 0;
            the cast shadow, when shadows are on, is part of it (dark, semi-transparent, beneath the body).
        visible_mask: HxW bool, body alpha >= 0.5 and the combined body alpha of all objects in front < 0.5.
        amodal_mask: HxW bool, body alpha >= 0.5, ignoring occlusion (the shadow is never part of a mask).
        box: (x0, y0, x1, y1) half-open bounding box of ``visible_mask``, pixels.
        occluded_fraction: 1 - visible area / amodal area.
    """

    entity_id: int
    category: str
    color_name: str
    layer: np.ndarray
    visible_mask: np.ndarray
    amodal_mask: np.ndarray
    box: tuple[int, int, int, int]
    occluded_fraction: float


@dataclass
class SynthScene:
    """A synthetic scene: ``image == composite(background, [o.layer for o in objects])`` exactly.

    Attributes:
        seed: the seed that reproduces it (``make_scene(seed, ...)`` with the same arguments).
        image: HxWx3 uint8, the composite of the background and all layers, back to front.
        background: HxWx3 uint8, the empty background.
        objects: the objects, back to front (``objects[i].entity_id == i``).
        background_source: what the background is, e.g. ``"texture:clouds"`` or ``"photo:coffee"``.
    """

    seed: int
    image: np.ndarray
    background: np.ndarray
    objects: list[SynthObject]
    background_source: str = ""

    def without(self, entity_id: int) -> np.ndarray:
        """The scene with one object removed: the ground-truth background layer for that entity.

        Args:
            entity_id: the object's ``entity_id``.

        Returns:
            HxWx3 uint8: the background with every other layer composited over it, back to front.

        Raises:
            ValueError: the scene has no such entity.
        """
        ids = [o.entity_id for o in self.objects]
        if entity_id not in ids:
            raise ValueError(f"scene {self.seed} has no entity {entity_id} (entities: {ids})")
        return composite(self.background, [o.layer for o in self.objects if o.entity_id != entity_id])


def composite(background: np.ndarray, layers: list[np.ndarray]) -> np.ndarray:
    """Straight-alpha "over", back to front, in integers: ``out = round((rgb*a + out*(255-a)) / 255)`` per layer.

    This is the function that makes ``SynthScene.image``, so re-compositing the same inputs reproduces it
    bit-exactly.

    Args:
        background: HxWx3 uint8.
        layers: HxWx4 uint8 each, straight (not premultiplied) alpha, the first is the farthest.

    Returns:
        HxWx3 uint8.

    Raises:
        ValueError: a shape or dtype does not match.
    """
    background = np.asarray(background)
    if background.ndim != 3 or background.shape[2] != 3 or background.dtype != np.uint8:
        raise ValueError(f"background must be HxWx3 uint8, got {background.shape} {background.dtype}")
    height, width = background.shape[:2]
    out = background.astype(np.uint16)
    for i, layer in enumerate(layers):
        layer = np.asarray(layer)
        if layer.shape != (height, width, 4) or layer.dtype != np.uint8:
            raise ValueError(
                f"layer {i} must be {height}x{width}x4 uint8 like the background, got {layer.shape} {layer.dtype}"
            )
        alpha = layer[:, :, 3:4].astype(np.uint16)
        # at most 255*255 + 127 < 2**16: uint16 never overflows
        out = (layer[:, :, :3].astype(np.uint16) * alpha + out * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def make_scene(
    seed: int,
    size: tuple[int, int] = (256, 256),
    n_objects: tuple[int, int] = (2, 4),
    background: str = "auto",
    shadows: bool = True,
    min_visible: float = 0.3,
) -> SynthScene:
    """Make one synthetic scene with exact ground truth, entirely determined by its arguments.

    Objects overlap on purpose (amodal completion matters), yet each keeps at least ``min_visible`` of its amodal
    area visible; an object that cannot be placed so within a bounded number of tries is dropped, so a scene may
    hold fewer than ``n_objects[0]`` objects (at least one). Objects in one scene have different colour words.

    Args:
        seed: non-negative integer; the only source of randomness.
        size: (height, width) in pixels, each at least 32.
        n_objects: (fewest, most) objects to attempt, inclusive, at most 12 (one per colour word).
        background: "texture" (procedural), "photo" (a scikit-image sample photograph), or "auto" (either, by seed).
        shadows: give each object a soft cast shadow inside its own layer.
        min_visible: fraction of its amodal area every object keeps visible, in [0, 1].

    Returns:
        The scene; ``scene.image`` is ``composite(scene.background, [o.layer for o in scene.objects])``.

    Raises:
        ValueError: an argument is out of range.
    """
    height, width = _check_args(seed, size, n_objects, background, min_visible)
    rng = np.random.default_rng(seed)

    kind = background if background != "auto" else ("photo" if rng.random() < 0.5 else "texture")
    if kind == "photo":
        bg, source = photo_background(rng, height, width)
    else:
        bg, source = texture_background(rng, height, width)

    count = int(rng.integers(n_objects[0], n_objects[1] + 1))
    colors = [COLOR_NAMES[i] for i in rng.permutation(len(COLOR_NAMES))[:count]]
    light = rng.uniform(0.0, 2.0 * math.pi)  # one light direction per scene: shadows fall the same way
    shadow_opacity = float(rng.uniform(0.3, 0.45))

    placed = Placement(height, width, min_visible)
    for color in colors:
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        place_object(rng, placed, category, color, light, shadow_opacity if shadows else 0.0)

    objects = []
    for i, obj in enumerate(placed.objects):
        visible = placed.visible[i]
        amodal_area = placed.amodal_area[i]
        visible_area = int(np.count_nonzero(visible))
        objects.append(
            SynthObject(
                entity_id=i,
                category=obj.category,
                color_name=obj.color,
                layer=obj.layer,
                visible_mask=visible,
                amodal_mask=placed.amodal[i],
                box=_mask_box(visible),
                occluded_fraction=1.0 - visible_area / amodal_area if amodal_area else 0.0,
            )
        )
    image = composite(bg, [o.layer for o in objects])
    return SynthScene(seed=seed, image=image, background=bg, objects=objects, background_source=source)


def make_scenes(n: int, seed: int = 0, size: tuple[int, int] = (256, 256), **kw) -> Iterator[SynthScene]:
    """Yield ``n`` scenes; scene ``i`` uses a seed derived from ``(seed, i)`` (stored in ``scene.seed``).

    Args:
        n: number of scenes.
        seed: non-negative base seed.
        size: (height, width) in pixels.
        **kw: passed to ``make_scene`` (``n_objects``, ``background``, ``shadows``, ``min_visible``).
    """
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    for i in range(n):
        derived = int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0] >> np.uint64(1))
        yield make_scene(derived, size=size, **kw)


def scene_to_png_bytes(scene: SynthScene) -> bytes:
    """The scene's RGB image encoded as PNG (8-bit, 3 channels)."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(scene.image[:, :, ::-1]))
    if not ok:
        raise RuntimeError(f"PNG encoding of scene {scene.seed} failed")
    return buf.tobytes()


# ---------------------------------------------------------------------------------------------------- internals


def _check_args(seed, size, n_objects, background, min_visible) -> tuple[int, int]:
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"size must be (height, width), each at least 32 pixels, got {size!r}")
    lo, hi = n_objects
    if not 1 <= lo <= hi <= len(COLOR_NAMES):
        raise ValueError(
            f"n_objects must be (fewest, most) with 1 <= fewest <= most <= 12, got {n_objects!r}"
        )
    if background not in ("auto", "texture", "photo"):
        raise ValueError(f"background must be one of 'auto', 'texture', 'photo', got {background!r}")
    if not 0.0 <= min_visible <= 1.0:
        raise ValueError(f"min_visible must be in [0, 1], got {min_visible!r}")
    return int(size[0]), int(size[1])


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return (0, 0, 0, 0)
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
