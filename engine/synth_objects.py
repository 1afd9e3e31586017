"""The objects of the synthetic scenes (``engine/synth.py``): procedural shapes with soft, anti-aliased alpha and
a cast shadow inside their own layer, and their placement back to front with controlled occlusion.

Everything draws from the scene's ``numpy.random.Generator`` in a fixed order: the same generator state gives the
same objects in the same places.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from reflade.engine.synth_textures import texture_rgb

CATEGORIES: tuple[str, ...] = ("disc", "square", "triangle", "star", "ring", "blob", "capsule")
"""Shape names, used as the objects' category labels."""

_SUPERSAMPLE = 4  # shapes are drawn at 4x and area-averaged: soft, anti-aliased alpha edges
_MIN_AREA, _MAX_AREA = 0.035, 0.22  # target amodal area, fraction of the image (drawn log-uniformly)
_PLACEMENT_TRIES = 40  # positions tried per object before it is dropped (the last half at a smaller size)
_OVERLAP_PROBABILITY = 0.7  # chance that a placement aims at overlapping an object already placed


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
    rgb = texture_rgb(rng, color, ph, pw)

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


class Placement:
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


def place_object(
    rng: np.random.Generator,
    placed: Placement,
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
