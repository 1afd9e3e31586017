"""Stage 3, layer completion, without weights: shape completion and colour filling on the CPU.

For each entity (from stage 2, with ``occluded_by`` set):

- Amodal mask: the visible mask plus the part of its occluders' masks (grown by ``_GAP_PX``, since detected
  masks rarely meet exactly) that its shape plausibly extends under, connected to the visible mask. The
  shape prior is an ellipse fitted to the visible outline away from the occluders when it explains that
  outline (discs, blobs, rounded ends), else a polygon: the convex hull's sides that run along the visible
  outline, extended under the occluders (``_polygon_prior``). No occluders: amodal = visible.
- Layer: RGB = the image on visible pixels (exactly), and on the completed pixels a fill computed from the
  entity's own visible pixels only (every other pixel is treated as unknown, so an occluder's colour cannot
  bleed in); alpha = 255 on the amodal mask, 0 elsewhere (stage 4 refines edges); RGB = 0 where alpha = 0.
- Background: the entity's visible mask, dilated by ``_BG_DILATE_PX`` (minus the pixels of entities in front
  of it), is removed and filled from the pixels around it that belong to no entity in front of or behind it.
  Entities known to lie behind it (their ``occluded_by`` names it) then show their completed layers there,
  deepest first. Pixels outside the hole equal the image exactly.

The fill (``fill_from``) is multi-scale so that large holes do not smear: a push-pull pyramid (each level
the weighted mean of the known pixels below it) gives the hole's interior, and OpenCV's Telea inpainting
redoes a band along the hole's edge so that edges and gradients run into it continuously. It makes no
texture: a large filled hole is smooth.
"""

from __future__ import annotations

import cv2
import numpy as np

from reflade.engine.config import EngineConfig
from reflade.engine.types import Completion, Entity

_BG_DILATE_PX = 3
"""The removed entity's mask is grown by this many pixels so that its anti-aliased edge goes too."""
_INPAINT_RADIUS = 5
"""Neighbourhood radius of Telea inpainting, pixels."""
_EDGE_BAND_PX = 6
"""Width of the band along a hole's edge that Telea fills; deeper pixels come from the pyramid."""
_ELLIPSE_SLACK = 0.06
"""An ellipse explains a visible mask when at most this fraction of the mask lies outside it, and at most
this fraction of the ellipse lies on pixels that are neither the mask nor its occluders."""
_GAP_PX = 2
"""Occluder masks are grown by this many pixels before the amodal extension is cut from them."""
_POLYGON_GROWTH = 1.5
"""The polygon shape prior stays inside the visible mask's convex hull scaled by this about its centre."""
_LAYER_MARGIN_PX = 8
"""Margin around the amodal box of the crop a layer's colours are filled in."""


class ClassicalCompletionBackend:
    """Completes each entity's layer and the background behind it; deterministic, no weights, CPU only."""

    name = "classical"

    def __init__(self, cfg: EngineConfig | None = None):
        self.cfg = cfg or EngineConfig()

    def complete(self, image: np.ndarray, entities: list[Entity]) -> list[Completion]:
        """One completion per entity, in the same order.

        Args:
            image: HxWx3 uint8 RGB.
            entities: stage-2 entities of this image; ``mask`` HxW bool, ``occluded_by`` entity ids.

        Returns:
            Completions: ``rgba`` HxWx4 uint8, ``amodal_mask`` HxW bool, ``background`` HxWx3 uint8, and scores
            ``completed_fraction`` (hidden / amodal area), ``bg_hole_fraction`` (removed / image area),
            ``bg_revealed_fraction`` (share of the removed pixels restored from layers behind).

        Raises:
            ValueError: the image is not HxWx3 uint8, or a mask does not match it.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"complete() needs an HxWx3 uint8 RGB image, got shape {image.shape} {image.dtype}"
            )
        h, w = image.shape[:2]
        for e in entities:
            if e.mask.shape != (h, w):
                raise ValueError(
                    f"entity {e.entity_id}: mask shape {e.mask.shape} does not match image {(h, w)}"
                )
        by_id = {e.entity_id: e for e in entities}
        masks = [e.mask.astype(bool) for e in entities]

        amodals = []
        for e, visible in zip(entities, masks, strict=True):
            occluders = [by_id[i].mask.astype(bool) for i in e.occluded_by if i in by_id and i != e.entity_id]
            amodals.append(amodal_mask(visible, occluders))
        layers = [_layer(image, visible, amodal) for visible, amodal in zip(masks, amodals, strict=True)]

        depth = _depths(entities)
        out = []
        for k in range(len(entities)):
            visible, amodal = masks[k], amodals[k]
            background, hole, revealed = self._background(image, entities, k, masks, amodals, layers, depth)
            hidden = np.count_nonzero(amodal & ~visible)
            hole_px = np.count_nonzero(hole)
            out.append(
                Completion(
                    rgba=layers[k],
                    amodal_mask=amodal,
                    background=background,
                    scores={
                        "completed_fraction": round(float(hidden / max(1, np.count_nonzero(amodal))), 4),
                        "bg_hole_fraction": round(float(hole_px / (h * w)), 4),
                        "bg_revealed_fraction": round(float(revealed / max(1, hole_px)), 4),
                    },
                )
            )
        return out

    @staticmethod
    def _background(image, entities, k, masks, amodals, layers, depth):
        """The scene without entity k: (HxWx3 uint8, the removed pixels, how many came from layers behind)."""
        e = entities[k]
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * _BG_DILATE_PX + 1, 2 * _BG_DILATE_PX + 1))
        hole = cv2.dilate(masks[k].astype(np.uint8), kernel).astype(bool)
        front = [j for j, other in enumerate(entities) if other.entity_id in e.occluded_by]
        behind = [j for j, other in enumerate(entities) if j != k and e.entity_id in other.occluded_by]
        for j in front:
            hole &= ~masks[j]  # what is in front of the entity stays
        # the fill reads neither the entities in front nor those behind (they come back as their own layers)
        source = ~hole
        for j in front + behind:
            source &= ~masks[j]
        background = image.copy()
        background[hole] = _fill_near(image, source, hole)[hole]
        revealed = np.zeros_like(hole)
        for j in sorted(behind, key=lambda j: (-depth[j], j)):  # deepest first, nearer ones painted over
            paint = hole & amodals[j]
            background[paint] = layers[j][paint, :3]
            revealed |= paint
        revealed = int(np.count_nonzero(revealed))
        return background, hole, revealed


def amodal_mask(visible: np.ndarray, occluders: list[np.ndarray]) -> np.ndarray:
    """The visible mask plus the part of the occluders' pixels its shape plausibly extends under.

    Args:
        visible: HxW bool, the entity's visible pixels.
        occluders: HxW bool masks of the entities in front of it.

    Returns:
        HxW bool, a superset of ``visible``; equal to it when there are no occluders.
    """
    visible = visible.astype(bool)
    if not occluders or not visible.any():
        return visible.copy()
    occ = np.zeros_like(visible)
    for m in occluders:
        occ |= m.astype(bool)
    # detected masks rarely meet exactly: the few pixels between the entity and its occluders count as hidden
    occ = cv2.dilate(occ.astype(np.uint8), np.ones((2 * _GAP_PX + 1,) * 2, np.uint8)).astype(bool) & ~visible
    if not occ.any():
        return visible.copy()
    prior = _ellipse_prior(visible, occ)
    if prior is None:
        prior = _polygon_prior(visible, occ)
    extension = prior & occ
    # keep the parts of the extension that touch the visible mask
    grown = cv2.dilate(visible.astype(np.uint8), np.ones((2 * _GAP_PX + 1,) * 2, np.uint8)).astype(bool)
    n, comp = cv2.connectedComponents(extension.astype(np.uint8), connectivity=8)
    if n > 1:
        touching = np.unique(comp[grown & extension])
        extension = np.isin(comp, touching[touching > 0])
    return visible | extension


def _ellipse_prior(visible: np.ndarray, occ: np.ndarray) -> np.ndarray | None:
    """An ellipse fitted to the visible outline away from the occluders, when it explains the mask; else None."""
    contours, _ = cv2.findContours(visible.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    pts = max(contours, key=cv2.contourArea)[:, 0, :]
    near_occ = cv2.dilate(occ.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    free = pts[~near_occ[pts[:, 1], pts[:, 0]]]
    if len(free) < 20:
        return None
    (cx, cy), (ax1, ax2), angle = cv2.fitEllipse(free.astype(np.float32))
    if not (np.isfinite([cx, cy, ax1, ax2, angle]).all() and min(ax1, ax2) >= 2):
        return None
    area = np.count_nonzero(visible)
    if np.pi * ax1 * ax2 / 4 > 4 * area:  # a tiny arc fitted by a huge ellipse
        return None
    ellipse = np.zeros(visible.shape, np.uint8)
    cv2.ellipse(ellipse, ((cx, cy), (ax1, ax2), angle), 1, -1)
    ellipse = ellipse.astype(bool)
    outside = np.count_nonzero(visible & ~ellipse) / area
    claimed = np.count_nonzero(ellipse & ~visible & ~occ) / max(1, np.count_nonzero(ellipse))
    if outside > _ELLIPSE_SLACK or claimed > _ELLIPSE_SLACK:
        return None
    return ellipse


def _polygon_prior(visible: np.ndarray, occ: np.ndarray) -> np.ndarray:
    """The convex hull of the visible mask with the hull edges that bridge the occluded part dropped.

    The hull is the intersection of the half-planes of its edges. An edge running along the visible outline
    is a real side of the shape; an edge that crosses the occluders away from the visible pixels only closes
    the bite they take. Intersecting the real sides' half-planes extends straight sides and corners under the
    occluders (a square's hidden corner comes back, where the hull would cut it off diagonally). The result is
    bounded by the hull scaled by ``_POLYGON_GROWTH`` about its centre.
    """
    h, w = visible.shape
    contours, _ = cv2.findContours(visible.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    hull = cv2.convexHull(np.concatenate([c[:, 0, :] for c in contours]))[:, 0, :].astype(np.float64)
    if len(hull) < 3:
        return visible.copy()
    centre = hull.mean(0)
    bound = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(bound, np.rint(centre + _POLYGON_GROWTH * (hull - centre)).astype(np.int32), 1)
    ys, xs = np.nonzero(bound)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    inside = bound[y0:y1, x0:x1].astype(bool)

    off_visible = cv2.distanceTransform((~visible).astype(np.uint8), cv2.DIST_L2, 3) > 2
    near_occ = cv2.dilate(occ.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    signed_area = float(np.sum(hull[:, 0] * np.roll(hull[:, 1], -1) - np.roll(hull[:, 0], -1) * hull[:, 1]))
    orient = 1.0 if signed_area >= 0 else -1.0
    for i in range(len(hull)):
        a, b = hull[i], hull[(i + 1) % len(hull)]
        length = float(np.hypot(*(b - a)))
        if length < 1:
            continue
        t = np.linspace(0.0, 1.0, max(2, int(length)))[:, None]
        samples = np.rint(a + t * (b - a)).astype(int)
        sx, sy = np.clip(samples[:, 0], 0, w - 1), np.clip(samples[:, 1], 0, h - 1)
        if near_occ[sy, sx].mean() > 0.3 and off_visible[sy, sx].mean() > 0.3:
            continue  # the edge closes the occluded bite: not a side of the shape
        cross = (b[0] - a[0]) * (yy - a[1]) - (b[1] - a[1]) * (xx - a[0])
        inside &= orient * cross >= -0.5
    prior = np.zeros((h, w), bool)
    prior[y0:y1, x0:x1] = inside
    return prior | visible


def _layer(image: np.ndarray, visible: np.ndarray, amodal: np.ndarray) -> np.ndarray:
    """HxWx4 uint8: image on visible pixels, own-colour fill on hidden ones, alpha 255 on the amodal mask."""
    h, w = visible.shape
    rgba = np.zeros((h, w, 4), np.uint8)
    if not amodal.any():
        return rgba
    rgba[visible, :3] = image[visible]
    hidden = amodal & ~visible
    if hidden.any() and visible.any():
        ys, xs = np.nonzero(amodal)
        y0, y1 = max(0, ys.min() - _LAYER_MARGIN_PX), min(h, ys.max() + 1 + _LAYER_MARGIN_PX)
        x0, x1 = max(0, xs.min() - _LAYER_MARGIN_PX), min(w, xs.max() + 1 + _LAYER_MARGIN_PX)
        crop = (slice(y0, y1), slice(x0, x1))
        filled = fill_from(image[crop], visible[crop], hidden[crop])
        rgba[crop][hidden[crop], :3] = filled[hidden[crop]]
    rgba[amodal, 3] = 255
    return rgba


def fill_from(image: np.ndarray, known: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """Fills the pixels not in ``known`` using only the known pixels; known pixels are returned unchanged.

    Multi-scale: a push-pull pyramid fills the unknown pixels smoothly (no smearing however large the hole),
    then Telea inpainting redoes a band of ``_EDGE_BAND_PX`` along the hole's edge, reading the known pixels
    and the pyramid's values, so that structure runs into the hole continuously (a thin hole is all band).

    Args:
        image: HxWx3 uint8.
        known: HxW bool; with no known pixel the image is returned as it is.
        region: HxW bool, the pixels that are wanted (default: all unknown ones); unknown pixels outside it
            keep the cheaper pyramid values.

    Returns:
        HxWx3 uint8.
    """
    known = known.astype(bool)
    out = image.copy()
    if known.all() or not known.any():
        return out
    coarse = _push_pull(image.astype(np.float32), known.astype(np.float32))
    base = np.where(known[..., None], image, np.clip(np.rint(coarse), 0, 255).astype(np.uint8))
    depth = cv2.distanceTransform((~known).astype(np.uint8), cv2.DIST_L2, 3)
    band = ~known & (depth <= _EDGE_BAND_PX)
    if region is not None:
        band &= region
    if band.any():
        base = cv2.inpaint(base, band.astype(np.uint8), _INPAINT_RADIUS, cv2.INPAINT_TELEA)
    out[~known] = base[~known]
    return out


def _fill_near(image: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``fill_from(image, source, target)`` on a crop around ``target`` (the whole image if the crop holds no
    source pixel); only the values on ``target`` are meaningful."""
    h, w = target.shape
    ys, xs = np.nonzero(target)
    if ys.size == 0:
        return image.copy()
    margin = max(16, (ys.max() - ys.min() + xs.max() - xs.min()) // 4)
    y0, y1 = max(0, ys.min() - margin), min(h, ys.max() + 1 + margin)
    x0, x1 = max(0, xs.min() - margin), min(w, xs.max() + 1 + margin)
    out = image.copy()
    crop = (slice(y0, y1), slice(x0, x1))
    if source[crop].any():
        out[crop] = fill_from(image[crop], source[crop], target[crop])
    else:
        out = fill_from(image, source, target)
    return out


def _push_pull(image: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """HxWx3 float32: each unknown pixel (weight 0) gets the weighted mean of the known ones, coarse to fine."""
    levels = []
    colour, w = image * weight[..., None], weight
    while min(w.shape) > 1 and not (w > 1e-6).all():
        levels.append((colour, w))
        colour, w = cv2.pyrDown(colour), cv2.pyrDown(w)
    result = colour / np.maximum(w, 1e-6)[..., None]
    for colour, w in reversed(levels):
        up = cv2.pyrUp(result, dstsize=(w.shape[1], w.shape[0]))
        confidence = np.clip(2.0 * w, 0.0, 1.0)[..., None]
        result = colour / np.maximum(w, 1e-6)[..., None] * confidence + up * (1.0 - confidence)
    return result


def _depths(entities: list[Entity]) -> list[int]:
    """Per entity, the longest chain of entities in front of it (0 = nothing in front); cycles are cut."""
    by_id = {e.entity_id: i for i, e in enumerate(entities)}
    memo: dict[int, int] = {}

    def depth(i: int, stack: frozenset[int]) -> int:
        if i in memo:
            return memo[i]
        fronts = [by_id[f] for f in entities[i].occluded_by if f in by_id and by_id[f] not in stack]
        d = 1 + max((depth(f, stack | {i}) for f in fronts), default=-1)
        memo[i] = d
        return d

    return [depth(i, frozenset()) for i in range(len(entities))]
