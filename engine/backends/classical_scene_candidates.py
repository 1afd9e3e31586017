"""Scene understanding without weights (``classical_scene.py``): from the detectors' raw masks to the chosen
candidates. Each mask is tidied (``tidy_mask``: its largest component, holes filled unless they look like the
surroundings), scored (``Rater``), merged across detectors (``merge_candidates``) and chosen greedily, strongest
first, into disjoint masks (``select_candidates``); plus the mask helpers the backend shares.
"""

from __future__ import annotations

import cv2
import numpy as np

_MAX_BORDER_SHARE = 0.3
"""A region holding more than this share of the image border is background."""
_SAME_COLOR = 10.0
"""Lab distance under which a pixel far from a candidate counts as a recurrence of its colour."""
_SPLIT_GAP = 30.0
"""Lab distance between the two colour clusters of a mask above which it is rated as two things merged."""
_MIN_RELATIVE_SCORE = 0.4
"""Candidates scoring below this fraction of the best one are dropped."""
_MAX_PART_LOSS = 0.4
"""A candidate losing more than this fraction of its pixels to stronger entities is dropped."""


class Candidate:
    """A candidate entity: ``mask`` HxW bool in the working copy's frame, ``score`` in [0, 1], ``source`` the
    detector(s) that proposed it (``"regions"``, ``"saliency"`` or ``"regions+saliency"``)."""

    __slots__ = ("mask", "score", "source")

    def __init__(self, mask: np.ndarray, score: float, source: str):
        self.mask = mask
        self.score = score
        self.source = source


def tidy_mask(mask: np.ndarray, lab: np.ndarray, min_px: float) -> np.ndarray | None:
    """Largest connected component with its holes filled, unless a hole looks like the surroundings.

    A hole is filled when it is tiny, or when its mean colour is closer to the mask's than to the ring around
    the mask (texture spots are filled; what is seen through a ring or between an object's arms is not).
    Returns None when the component is smaller than half an entity.
    """
    mask = largest_component(mask)
    if np.count_nonzero(mask) < 0.5 * min_px:
        return None
    # work in the mask's box, grown by the ring width and padded with one row/column of "outside"
    h, w = mask.shape
    x, y, bw, bh = cv2.boundingRect(mask.astype(np.uint8))
    x0, y0, x1, y1 = max(0, x - 4), max(0, y - 4), min(w, x + bw + 4), min(h, y + bh + 4)
    crop, crop_lab = mask[y0:y1, x0:x1], lab[y0:y1, x0:x1]
    outside_px = np.pad(~crop, 1, constant_values=True).astype(np.uint8)
    n, comp, stats, _ = cv2.connectedComponentsWithStats(outside_px, connectivity=4)
    outside_label = int(comp[0, 0])
    comp = comp[1:-1, 1:-1]
    holes = [k for k in range(1, n) if k != outside_label]
    if not holes:
        return mask
    own = crop_lab[crop].mean(0)
    ring = cv2.dilate(crop.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~crop
    outside = crop_lab[ring].mean(0) if ring.any() else own
    fill = np.zeros(n, bool)
    for k in holes:
        if stats[k, cv2.CC_STAT_AREA] <= max(6.0, 0.1 * min_px):
            fill[k] = True
            continue
        colour = crop_lab[comp == k].mean(0)
        fill[k] = np.linalg.norm(colour - own) < np.linalg.norm(colour - outside)
    out = mask.copy()
    out[y0:y1, x0:x1] |= fill[comp]
    return out


class Rater:
    """Scores a candidate mask in [0, 1]; None for background (a large share of the image border).

    score = (0.6 * detector confidence + 0.4 * solidity) * border * uniqueness * homogeneity, where
    - border lowers masks whose outline runs along the image border (cut-off background),
    - uniqueness lowers masks whose colour recurs far away in the image (tiles, stripes, other patterns),
    - homogeneity lowers masks made of two clearly different colours (two objects merged into one region).
    """

    _COARSE_SIDE = 64

    def __init__(self, lab: np.ndarray):
        h, w = lab.shape[:2]
        self.shape = (h, w)
        s = min(1.0, self._COARSE_SIDE / max(h, w))
        self.coarse_size = (max(1, round(w * s)), max(1, round(h * s)))
        self.coarse = cv2.resize(lab, self.coarse_size, interpolation=cv2.INTER_AREA)
        self.coarse_px = h * w / (self.coarse_size[0] * self.coarse_size[1])
        self.lab = cv2.GaussianBlur(lab, (0, 0), 1.5)  # grain and fine texture out of the colour statistics

    def score(self, mask: np.ndarray, confidence: float) -> float | None:
        h, w = self.shape
        on_border = (
            np.count_nonzero(mask[0])
            + np.count_nonzero(mask[-1])
            + np.count_nonzero(mask[:, 0])
            + np.count_nonzero(mask[:, -1])
        )
        if on_border > _MAX_BORDER_SHARE * 2 * (h + w):
            return None
        area = np.count_nonzero(mask)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        outline = sum(cv2.arcLength(c, True) for c in contours)
        touch = on_border / max(1.0, outline)
        if touch > 2 * _MAX_BORDER_SHARE:
            return None
        pixels = self.lab[mask]
        mean = pixels.mean(0)
        small = cv2.resize(mask.astype(np.float32), self.coarse_size, interpolation=cv2.INTER_AREA)
        near = cv2.dilate((small > 0).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        dist = np.linalg.norm(self.coarse - mean, axis=2)
        recurring = np.count_nonzero((dist < _SAME_COLOR) & ~near) * self.coarse_px / area
        score = (0.6 * confidence + 0.4 * _solidity(mask)) * (1.0 - touch / (2 * _MAX_BORDER_SHARE))
        return score / (1.0 + recurring) ** 0.5 * _homogeneity(pixels, mean)


def _homogeneity(pixels: np.ndarray, mean: np.ndarray) -> float:
    """1 for one colour; down to 0.3 when 2-means finds two clusters far apart, each a real share of the mask.

    Args:
        pixels: Nx3 Lab colours of the mask.
        mean: their mean.
    """
    if len(pixels) > 4000:
        pixels = pixels[:: len(pixels) // 4000 + 1]
    centred = pixels - mean
    # split along the principal axis, then two Lloyd iterations
    axis = np.linalg.eigh(centred.T @ centred)[1][:, -1]
    side = centred @ axis > 0
    for _ in range(2):
        if side.all() or not side.any():
            return 1.0
        c1, c0 = pixels[side].mean(0), pixels[~side].mean(0)
        side = np.linalg.norm(pixels - c1, axis=1) < np.linalg.norm(pixels - c0, axis=1)
    if side.all() or not side.any():
        return 1.0
    gap = float(np.linalg.norm(pixels[side].mean(0) - pixels[~side].mean(0)))
    minority = min(side.mean(), 1.0 - side.mean())
    if minority < 0.12:
        return 1.0
    return float(np.clip(1.0 - (gap - _SPLIT_GAP) / 40.0, 0.3, 1.0))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def merge_candidates(cands: list[Candidate], merge_iou: float) -> list[Candidate]:
    """One candidate per group of overlapping ones (IoU > merge_iou), strongest first."""
    order = sorted(range(len(cands)), key=lambda i: (-cands[i].score, i))
    merged: list[Candidate] = []
    for i in order:
        c = cands[i]
        for m in merged:
            if _iou(c.mask, m.mask) > merge_iou:
                sources = m.source.split("+")
                if c.source not in sources:
                    # two detectors agree: combine their confidence (noisy OR)
                    m.score = 1.0 - (1.0 - m.score) * (1.0 - c.score)
                    m.source = "+".join(sorted(sources + [c.source], key=_SOURCE_ORDER.index))
                break
        else:
            merged.append(Candidate(c.mask, c.score, c.source))
    merged.sort(key=lambda c: -c.score)  # stable: ties keep detector order
    return merged


_SOURCE_ORDER = ["regions", "saliency"]


def select_candidates(cands: list[Candidate], min_px: float, max_px: float, max_n: int) -> list[Candidate]:
    """Greedy, strongest first: disjoint masks, parts and duplicates of chosen ones dropped."""
    if not cands:
        return []
    taken = np.zeros_like(cands[0].mask)
    chosen: list[Candidate] = []
    floor = _MIN_RELATIVE_SCORE * max(c.score for c in cands)
    for c in cands:
        if len(chosen) >= max_n or c.score < floor:
            break
        area = np.count_nonzero(c.mask)
        if not min_px <= area <= max_px:
            continue
        own = c.mask & ~taken
        if np.count_nonzero(own) < (1.0 - _MAX_PART_LOSS) * area:
            continue
        own = largest_component(own)
        if np.count_nonzero(own) < min_px:
            continue
        taken |= own
        chosen.append(Candidate(own, c.score, c.source))
    return chosen


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of ``mask`` (computed in its bounding box)."""
    x, y, bw, bh = cv2.boundingRect(mask.astype(np.uint8))
    out = np.zeros(mask.shape, bool)
    if bw == 0:
        return out
    crop = mask[y : y + bh, x : x + bw].astype(np.uint8)
    n, comp, stats, _ = cv2.connectedComponentsWithStats(crop, connectivity=8)
    if n <= 2:
        out[y : y + bh, x : x + bw] = crop.astype(bool)
    else:
        out[y : y + bh, x : x + bw] = comp == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return out


def convex_hull_mask(mask: np.ndarray) -> np.ndarray:
    """HxW bool: the filled convex hull of ``mask``'s pixels (all False for an empty mask)."""
    pts = cv2.findNonZero(mask.astype(np.uint8))
    out = np.zeros(mask.shape, np.uint8)
    if pts is not None:
        cv2.fillConvexPoly(out, cv2.convexHull(pts), 1)
    return out.astype(bool)


def _solidity(mask: np.ndarray) -> float:
    return float(np.count_nonzero(mask)) / max(1, np.count_nonzero(convex_hull_mask(mask)))
