"""The pixels of the synthetic scenes (``engine/synth.py``): the colour words' palette, the backgrounds
(procedural textures and scikit-image's bundled photographs) and the fill of an object in its colour word.

Every function draws from the scene's ``numpy.random.Generator`` in a fixed order: the same generator state gives
the same pixels.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

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


def texture_background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, str]:
    """A procedural background: HxWx3 uint8 (gradient, stripes, tiles or clouds between two muted colours, with
    low-frequency noise and grain) and what it is, ``"texture:KIND"``."""
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


def photo_background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, str]:
    """A random crop of a bundled photograph resized to HxWx3 uint8 (grey ones tinted, half of them mirrored) and
    what it is, ``"photo:NAME"``."""
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


def texture_rgb(rng: np.random.Generator, color: str, height: int, width: int) -> np.ndarray:
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
