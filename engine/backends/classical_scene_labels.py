"""Scene understanding without weights (``classical_scene.py``): what an entity is called. There is no classifier
offline, so labels are honest shape words from contour analysis (``shape_word``) and attributes give the dominant
colour word, the position in a 3x3 grid and the size (``entity_attributes``).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

# (upper hue bound in degrees, word) for saturated pixels; low saturation or value gives white/gray/black
_HUE_WORDS = [
    (15, "red"),
    (40, "orange"),
    (70, "yellow"),
    (165, "green"),
    (200, "cyan"),
    (255, "blue"),
    (290, "purple"),
    (340, "pink"),
    (360, "red"),
]


def _color_word(image: np.ndarray, mask: np.ndarray) -> str:
    """Most frequent colour word over the masked pixels (HSV rules)."""
    px = image[mask].reshape(-1, 1, 3)
    if len(px) > 20000:
        px = px[:: len(px) // 20000 + 1]
    hsv = cv2.cvtColor(px, cv2.COLOR_RGB2HSV_FULL).reshape(-1, 3).astype(np.float32)
    hue = hsv[:, 0] * 360.0 / 256.0
    sat = hsv[:, 1] / 255.0
    val = hsv[:, 2] / 255.0
    words = ["black", "white", "gray", "brown"] + [w for _, w in _HUE_WORDS[:-1]]
    idx = np.zeros(len(px), np.int64)
    for top, word in _HUE_WORDS[::-1]:  # narrowing upper bounds: each pixel ends with its band's word
        idx[hue < top] = words.index(word)
    brownish = (hue < 45) | (hue >= 345)
    idx[brownish & (val < 0.6) & (sat > 0.25)] = words.index("brown")
    idx[sat < 0.2] = words.index("gray")
    idx[(sat < 0.2) & (val > 0.8)] = words.index("white")
    idx[val < 0.2] = words.index("black")
    return words[int(np.bincount(idx, minlength=len(words)).argmax())]


def entity_attributes(image: np.ndarray, mask: np.ndarray) -> dict[str, str]:
    """``color`` (dominant colour word), ``position`` (centroid in a 3x3 grid, e.g. ``"left top"``) and ``size``
    (``small`` under 5% of the image, ``medium`` under 20%, ``large``) of an entity; image HxWx3 uint8 RGB, mask
    HxW bool, not empty."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / w, ys.mean() / h
    horiz = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    vert = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    frac = len(xs) / (h * w)
    size = "small" if frac < 0.05 else "medium" if frac < 0.2 else "large"
    return {"color": _color_word(image, mask), "position": f"{horiz} {vert}", "size": size}


def shape_word(mask: np.ndarray) -> str:
    """Coarse shape from contour analysis: elongation, circularity, rectangularity."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return "object"
    c = max(contours, key=cv2.contourArea)
    area = cv2.contourArea(c)
    perimeter = cv2.arcLength(c, True)
    (_, _), (rw, rh), _ = cv2.minAreaRect(c)
    if area <= 0 or perimeter <= 0 or min(rw, rh) <= 0:
        return "object"
    aspect = max(rw, rh) / min(rw, rh)
    circularity = 4 * math.pi * area / perimeter**2
    if aspect >= 2.5:
        return "elongated object"
    if circularity >= 0.8 and aspect < 1.3:
        return "round object"
    if area / (rw * rh) >= 0.9:
        return "rectangular object"
    return "object"
