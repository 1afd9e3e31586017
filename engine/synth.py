"""Synthetic scenes with exact ground truth for Referring Layer Decomposition.

A scene is a background plus a few procedural RGBA objects stacked back to front. Every object's complete layer
(hidden parts included), its visible and amodal masks, and the scene with any one object removed are known exactly,
because the image *is* the composite of those layers (``composite``, integer arithmetic, bit-exact).

Everything is drawn from one ``numpy.random.Generator`` seeded with the scene's seed: the same seed gives identical
arrays, on any run. Sizes are ``(height, width)`` in pixels, like the arrays.

Example::

    scene = make_scene(3)
    obj = scene.objects[0]                      # the farthest object
    obj.layer                                   # HxWx4 uint8, straight alpha, the complete layer
    scene.without(obj.entity_id)                # HxWx3 uint8, the ground-truth background layer
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

CATEGORIES: tuple[str, ...] = ("disc", "square", "triangle", "star", "ring", "blob", "capsule")
"""Shape names, used as the objects' category labels."""

# Basic colour words -> the HSV ranges objects of that colour are drawn from: hue in degrees (a range may wrap
# through 0), saturation and value in [0, 1]. Hues sit well inside each word's band so that the word stays honest
# after texture, shading and anti-aliasing; orange and brown share hues and differ by value.
_PALETTE: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "red": ((-7.0, 6.0), (0.75, 0.95), (0.72, 0.92)),
    "orange": ((25.0, 33.0), (0.82, 1.0), (0.9, 1.0)),
    "yellow": ((50.0, 57.0), (0.75, 0.95), (0.88, 1.0)),
    "green": ((105.0, 135.0), (0.6, 0.9), (0.55, 0.8)),
    "cyan": ((180.0, 192.0), (0.6, 0.85), (0.78, 0.95)),
    "blue": ((215.0, 232.0), (0.7, 0.95), (0.65, 0.9)),
    "purple": ((268.0, 284.0), (0.55, 0.8), (0.55, 0.8)),
    "pink": ((320.0, 334.0), (0.35, 0.5), (0.92, 1.0)),
    "brown": ((22.0, 30.0), (0.62, 0.8), (0.36, 0.48)),
    "white": ((0.0, 360.0), (0.0, 0.05), (0.92, 1.0)),
    "gray": ((0.0, 360.0), (0.0, 0.05), (0.48, 0.6)),
    "black": ((0.0, 360.0), (0.0, 0.25), (0.07, 0.15)),
}
COLOR_NAMES: tuple[str, ...] = tuple(_PALETTE)
"""The colour words objects are named by."""

_ACHROMATIC = frozenset({"white", "gray", "black"})

# Real photographs bundled with scikit-image (no download). Grey ones are tinted when used.
_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "brick",
    "grass",
    "gravel",
)
_TEXTURES: tuple[str, ...] = ("gradient", "stripes", "tiles", "clouds")

_SUPERSAMPLE = 4  # shapes are drawn at 4x and area-averaged: soft, anti-aliased alpha edges
_MIN_AREA, _MAX_AREA = 0.035, 0.22  # target amodal area, fraction of the image (drawn log-uniformly)
_PLACEMENT_TRIES = 40  # positions tried per object before it is dropped (the last half at a smaller size)
_OVERLAP_PROBABILITY = 0.7  # chance that a placement aims at overlapping an object already placed


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
        bg, source = _photo_background(rng, height, width)
    else:
        bg, source = _texture_background(rng, height, width)

    count = int(rng.integers(n_objects[0], n_objects[1] + 1))
    colors = [COLOR_NAMES[i] for i in rng.permutation(len(COLOR_NAMES))[:count]]
    light = rng.uniform(0.0, 2.0 * math.pi)  # one light direction per scene: shadows fall the same way
    shadow_opacity = float(rng.uniform(0.3, 0.45))

    placed = _Placement(height, width, min_visible)
    for color in colors:
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        _place_object(rng, placed, category, color, light, shadow_opacity if shadows else 0.0)

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


# ---- backgrounds


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Float HSV (hue in degrees, s and v in [0, 1]) -> float32 RGB in [0, 255], arrays of one shape."""
    hsv = np.stack([np.mod(h, 360.0), np.clip(s, 0, 1), np.clip(v, 0, 1)], axis=-1).astype(np.float32)
    image = hsv if hsv.ndim == 3 else hsv.reshape(-1, 1, 3)  # OpenCV wants an image
    return cv2.cvtColor(image, cv2.COLOR_HSV2RGB).reshape(hsv.shape) * np.float32(255.0)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency value noise in about [-1, 1]: a coarse random grid upsampled bicubically."""
    gh = max(2, round(cells * height / max(height, width)) + 2)
    gw = max(2, round(cells * width / max(height, width)) + 2)
    grid = rng.uniform(-1.0, 1.0, (gh, gw)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _muted_color(rng: np.random.Generator) -> tuple[float, float, float]:
    return float(rng.uniform(0, 360)), float(rng.uniform(0.05, 0.4)), float(rng.uniform(0.3, 0.9))


def _texture_background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, str]:
    kind = _TEXTURES[int(rng.integers(len(_TEXTURES)))]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c1 = _hsv_to_rgb(*(np.float32([c]) for c in _muted_color(rng))).reshape(3)
    c2 = _hsv_to_rgb(*(np.float32([c]) for c in _muted_color(rng))).reshape(3)
    angle = rng.uniform(0, math.pi)
    along = (xx * math.cos(angle) + yy * math.sin(angle)) / max(height, width)
    if kind == "gradient":
        t = np.clip(along - along.min(), 0, None) / max(float(np.ptp(along)), 1e-6)
    elif kind == "stripes":
        period = rng.uniform(0.06, 0.2)
        t = 0.5 + 0.5 * np.tanh(4.0 * np.sin(2 * math.pi * along / period))
    elif kind == "tiles":
        tile = int(rng.integers(max(8, min(height, width) // 12), max(9, min(height, width) // 4)))
        t = ((yy // tile + xx // tile) % 2).astype(np.float32)
        grout = ((yy % tile) < 2) | ((xx % tile) < 2)
        t = np.where(grout, 0.5, t)
    else:  # clouds: a few octaves of value noise
        t = sum(_smooth_noise(rng, height, width, 3 * 2**k) / 2**k for k in range(3))
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    rgb = c1 * (1 - t[..., None]) + c2 * t[..., None]
    rgb += 0.5 * float(rng.uniform(4, 14)) * _smooth_noise(rng, height, width, 40)[..., None]
    rgb += rng.normal(0.0, 2.0, (height, width, 1)).astype(np.float32)  # a little grain
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), f"texture:{kind}"


@functools.lru_cache(maxsize=len(_PHOTOS))
def _load_photo(name: str) -> np.ndarray:
    import skimage.data  # imported here: loading scikit-image's data module costs time, only photos need it

    img = getattr(skimage.data, name)()
    img.setflags(write=False)
    return img


def _photo_background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, str]:
    name = _PHOTOS[int(rng.integers(len(_PHOTOS)))]
    photo = _load_photo(name)
    ph, pw = photo.shape[:2]
    # crop a window of the output's aspect, between the largest that fits and half of it
    scale = min(ph / height, pw / width) * float(rng.uniform(0.5, 1.0))
    ch, cw = max(1, round(height * scale)), max(1, round(width * scale))
    y0 = int(rng.integers(0, ph - ch + 1))
    x0 = int(rng.integers(0, pw - cw + 1))
    crop = photo[y0 : y0 + ch, x0 : x0 + cw]
    interp = cv2.INTER_AREA if ch >= height else cv2.INTER_CUBIC
    crop = cv2.resize(np.ascontiguousarray(crop), (width, height), interpolation=interp)
    if crop.ndim == 2:  # grey photograph (brick, grass, gravel): tint it
        tint = _hsv_to_rgb(*(np.float32([c]) for c in _muted_color(rng))).reshape(3) / 255.0
        crop = crop[..., None].astype(np.float32) * (0.4 + 0.6 * tint)
        crop = np.clip(np.rint(crop), 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop), f"photo:{name}"


# ---- objects


def _shape_contours(rng: np.random.Generator, category: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """An outline (Nx2, about unit radius, centred on 0, randomly rotated) and its holes."""
    t = np.linspace(0.0, 2.0 * math.pi, 120, endpoint=False)
    holes: list[np.ndarray] = []
    if category == "disc":
        aspect = rng.uniform(0.85, 1.0)
        pts = np.stack([np.cos(t), aspect * np.sin(t)], axis=1)
    elif category == "square":
        aspect = rng.uniform(0.85, 1.0)
        pts = np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]], dtype=np.float64)
    elif category == "triangle":
        a = np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.2, 0.2, 3)
        pts = np.stack([np.cos(a), np.sin(a)], axis=1)
    elif category == "star":
        spikes = int(rng.integers(5, 7))
        inner = rng.uniform(0.45, 0.55)
        a = np.arange(2 * spikes) * math.pi / spikes
        r = np.where(np.arange(2 * spikes) % 2 == 0, 1.0, inner)
        pts = np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
    elif category == "ring":
        inner = rng.uniform(0.45, 0.6)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1)
        holes.append(inner * pts)
    elif category == "blob":
        r = np.ones_like(t)
        for k in (2, 3, 4):
            r += rng.uniform(0.04, 0.16) / (k - 1) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
        pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    elif category == "capsule":
        half = rng.uniform(0.9, 1.6)  # half-length of the straight part, in radii
        cap = np.linspace(-math.pi / 2, math.pi / 2, 40)
        right = np.stack([half + np.cos(cap), np.sin(cap)], axis=1)
        pts = np.concatenate([right, -right]) / (half + 1)
    else:  # pragma: no cover - categories come from CATEGORIES
        raise ValueError(f"unknown category {category!r} (known: {', '.join(CATEGORIES)})")
    angle = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return pts @ rot.T, [h @ rot.T for h in holes]


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _render_alpha(outline: np.ndarray, holes: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Float32 alpha in [0, 1] of a polygon in patch pixel coordinates, supersampled and area-averaged."""
    ss, shift = _SUPERSAMPLE, 4
    big = np.zeros((height * ss, width * ss), np.uint8)
    to_fixed = float(ss * (1 << shift))

    def fixed(p: np.ndarray) -> list[np.ndarray]:
        # (p + 0.5) maps pixel centres to the supersampled grid's cell corners correctly
        return [np.rint((p + 0.5) * to_fixed - (1 << shift) * 0.5).astype(np.int32)]

    cv2.fillPoly(big, fixed(outline), 255, lineType=cv2.LINE_AA, shift=shift)
    for hole in holes:
        cv2.fillPoly(big, fixed(hole), 0, lineType=cv2.LINE_AA, shift=shift)
    small = cv2.resize(big.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
    return small * np.float32(1.0 / 255.0)


def _texture_rgb(rng: np.random.Generator, color: str, height: int, width: int) -> np.ndarray:
    """Float32 HxWx3 RGB in [0, 255]: the colour word's hue with shading and a pattern in value/saturation."""
    (h_lo, h_hi), (s_lo, s_hi), (v_lo, v_hi) = _PALETTE[color]
    hue = rng.uniform(h_lo, h_hi)
    sat = rng.uniform(s_lo, s_hi)
    val = rng.uniform(v_lo, v_hi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= max(height, width)
    xx /= max(height, width)
    # shading: brightest towards one side, as if lit
    angle = rng.uniform(0, 2 * math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    along = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    shade = 1.0 - float(rng.uniform(0.08, 0.2)) * along
    pattern = int(rng.integers(3))
    if pattern == 0:  # stripes of a darker shade
        period = rng.uniform(0.12, 0.3)
        a2 = rng.uniform(0, math.pi)
        s = np.sin(2 * math.pi * (xx * math.cos(a2) + yy * math.sin(a2)) / period)
        mod = 1.0 - float(rng.uniform(0.1, 0.2)) * (0.5 + 0.5 * np.tanh(3.0 * s))
    elif pattern == 1:  # mottled noise
        mod = 1.0 + float(rng.uniform(0.06, 0.12)) * _smooth_noise(rng, height, width, 6)
    else:  # spots
        spots = _smooth_noise(rng, height, width, 10)
        mod = 1.0 - float(rng.uniform(0.1, 0.2)) * (spots > 0.5)
    v = val * shade * mod
    s = sat * (1.0 + 0.06 * _smooth_noise(rng, height, width, 5))
    h = hue + 3.0 * _smooth_noise(rng, height, width, 4)
    rgb = _hsv_to_rgb(h, s, v)
    rgb += rng.normal(0.0, 1.5, (height, width, 1)).astype(np.float32)  # grain
    return rgb


@dataclass
class _Object:
    category: str
    color: str
    body8: np.ndarray  # ph x pw uint8: the body's alpha in its own patch
    layer_patch: np.ndarray  # lh x lw x 4 uint8: body over shadow, straight alpha
    margin: int  # the body patch sits at (margin, margin) in the layer patch
    layer: np.ndarray | None = None  # HxWx4 uint8 once placed
    y: int = 0  # top-left of the body patch in the image
    x: int = 0


def _make_object(
    rng: np.random.Generator,
    category: str,
    color: str,
    area_px: float,
    max_h: int,
    max_w: int,
    light: float,
    shadow_opacity: float,
) -> _Object:
    outline, holes = _shape_contours(rng, category)
    area_unit = _polygon_area(outline) - sum(_polygon_area(h) for h in holes)
    scale = math.sqrt(area_px / area_unit)
    extent = outline.max(axis=0) - outline.min(axis=0)
    # The body fits in the image: its patch is the scaled extent + 1 px margin + a sub-pixel shift (< 1 px),
    # rounded up, + 1 px, so at most extent * scale + 4 px (with - 2 a thin image could get a patch 1 px
    # wider than itself).
    scale = min(scale, (max_w - 4) / extent[0], (max_h - 4) / extent[1])
    pts = outline * scale
    lo = pts.min(axis=0)
    origin = -lo + 1.0 + rng.uniform(0, 1, 2)  # sub-pixel position, 1 px clear of the patch edge
    pw, ph = (np.ceil(pts.max(axis=0) + origin) + 1).astype(int)
    body = _render_alpha(pts + origin, [h * scale + origin for h in holes], ph, pw)
    rgb = _texture_rgb(rng, color, ph, pw)

    size = max(ph, pw)
    if shadow_opacity > 0:
        dist = max(2.0, size * float(rng.uniform(0.04, 0.08)))
        dx, dy = round(dist * math.cos(light)), round(dist * math.sin(light))
        sigma = 1.0 + size * float(rng.uniform(0.015, 0.035))
        margin = int(max(abs(dx), abs(dy)) + math.ceil(3 * sigma) + 1)
    else:
        dx = dy = 0
        sigma = 0.0
        margin = 0
    lh, lw = ph + 2 * margin, pw + 2 * margin
    a_body = np.zeros((lh, lw), np.float32)
    a_body[margin : margin + ph, margin : margin + pw] = body
    c_body = np.zeros((lh, lw, 3), np.float32)
    c_body[margin : margin + ph, margin : margin + pw] = rgb
    if shadow_opacity > 0:
        a_shadow = np.zeros((lh, lw), np.float32)
        a_shadow[margin + dy : margin + dy + ph, margin + dx : margin + dx + pw] = body
        a_shadow = cv2.GaussianBlur(a_shadow, (0, 0), sigma) * np.float32(shadow_opacity)
    else:
        a_shadow = np.zeros((lh, lw), np.float32)
    shadow_rgb = np.float32([14.0, 13.0, 18.0])
    # the body over its shadow, straight alpha
    under = a_shadow * (1.0 - a_body)
    alpha = a_body + under
    color_sum = c_body * a_body[..., None] + shadow_rgb * under[..., None]
    rgb_out = color_sum / np.maximum(alpha, 1e-6)[..., None]
    alpha8 = np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8)
    rgb8 = np.clip(np.rint(rgb_out), 0, 255).astype(np.uint8)
    rgb8[alpha8 == 0] = 0
    layer_patch = np.concatenate([rgb8, alpha8[..., None]], axis=2)
    body8 = np.clip(np.rint(body * 255.0), 0, 255).astype(np.uint8)
    return _Object(category, color, body8, layer_patch, margin)


class _Placement:
    """Objects placed so far, with each one's running occlusion state (transmittance of the bodies in front)."""

    def __init__(self, height: int, width: int, min_visible: float):
        self.height, self.width, self.min_visible = height, width, min_visible
        self.objects: list[_Object] = []
        self.amodal: list[np.ndarray] = []
        self.visible: list[np.ndarray] = []
        # HxW float64: product of (1 - body alpha / 255) over the bodies in front, in the order they were added
        # (the exact product is never 0.5 and lies >= 0.5/255**k from it with k soft edges at a pixel: float64
        # decides "> 0.5" correctly for up to 6 of them, far more than ever meet)
        self.transmittance: list[np.ndarray] = []
        self.visible_area: list[int] = []
        self.amodal_area: list[int] = []

    def accepts(self, obj: _Object, y: int, x: int) -> bool:
        """Whether every object already placed keeps ``min_visible`` of itself visible with ``obj`` in front."""
        ph, pw = obj.body8.shape
        region = (slice(y, y + ph), slice(x, x + pw))
        clear = self._clear(obj)
        for j in range(len(self.objects)):
            hidden = np.count_nonzero(
                self.visible[j][region] & ~(self.transmittance[j][region] * clear > 0.5)
            )
            left = self.visible_area[j] - hidden
            if left <= 0 or left < self.min_visible * self.amodal_area[j]:
                return False
        return True

    def add(self, obj: _Object, y: int, x: int) -> None:
        ph, pw = obj.body8.shape
        region = (slice(y, y + ph), slice(x, x + pw))
        clear = self._clear(obj)
        for j in range(len(self.objects)):
            t = self.transmittance[j][region] * clear
            self.transmittance[j][region] = t
            self.visible[j][region] &= t > 0.5
            self.visible_area[j] = int(np.count_nonzero(self.visible[j]))
        amodal = np.zeros((self.height, self.width), bool)
        amodal[region] = obj.body8 >= 128
        obj.y, obj.x = y, x
        obj.layer = self._paste_layer(obj)
        self.objects.append(obj)
        self.amodal.append(amodal)
        self.visible.append(amodal.copy())
        self.transmittance.append(np.ones((self.height, self.width), np.float64))
        self.amodal_area.append(int(np.count_nonzero(amodal)))
        self.visible_area.append(self.amodal_area[-1])

    @staticmethod
    def _clear(obj: _Object) -> np.ndarray:
        return (255.0 - obj.body8) / 255.0

    def _paste_layer(self, obj: _Object) -> np.ndarray:
        layer = np.zeros((self.height, self.width, 4), np.uint8)
        lh, lw = obj.layer_patch.shape[:2]
        top, left = obj.y - obj.margin, obj.x - obj.margin
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + lh, self.height), min(left + lw, self.width)
        layer[y0:y1, x0:x1] = obj.layer_patch[y0 - top : y1 - top, x0 - left : x1 - left]
        return layer


def _place_object(
    rng: np.random.Generator,
    placed: _Placement,
    category: str,
    color: str,
    light: float,
    shadow_opacity: float,
) -> bool:
    """Try to put one object in front of those placed; False (and nothing added) when no position works."""
    height, width = placed.height, placed.width
    area = math.exp(rng.uniform(math.log(_MIN_AREA), math.log(_MAX_AREA))) * height * width
    obj = _make_object(rng, category, color, area, height, width, light, shadow_opacity)
    for attempt in range(_PLACEMENT_TRIES):
        if attempt == _PLACEMENT_TRIES // 2 and area * 0.6 >= _MIN_AREA * height * width:
            obj = _make_object(rng, category, color, area * 0.6, height, width, light, shadow_opacity)
        ph, pw = obj.body8.shape
        y_max, x_max = height - ph, width - pw
        if placed.objects and rng.random() < _OVERLAP_PROBABILITY:
            # aim at partly covering an object already placed: centre offset by a fraction of both radii
            other = placed.objects[int(rng.integers(len(placed.objects)))]
            oh, ow = other.body8.shape
            reach = 0.5 * (math.hypot(oh, ow) + math.hypot(ph, pw)) * 0.5
            dist = reach * float(rng.uniform(0.5, 1.0))
            angle = rng.uniform(0, 2 * math.pi)
            cy = other.y + oh / 2 + dist * math.sin(angle)
            cx = other.x + ow / 2 + dist * math.cos(angle)
            y = min(max(round(cy - ph / 2), 0), y_max)
            x = min(max(round(cx - pw / 2), 0), x_max)
        else:
            y = int(rng.integers(0, y_max + 1))
            x = int(rng.integers(0, x_max + 1))
        if placed.accepts(obj, y, x):
            placed.add(obj, y, x)
            return True
    return False
