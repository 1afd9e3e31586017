"""Stage 4, post-completion: mask refinement and alpha matting with foreground colours, no learned weights.

The layer's alpha is matted only along the entity's VISIBLE boundary, where it meets the real image and the image
holds evidence of a soft edge (closed-form matting, :cite:`levin2007closed`, solved by pymatting on a crop around
that band). Along completed (hidden) edges there is no evidence: the completed extent is kept, anti-aliased by a
1-px blur. Foreground colours of the semi-transparent band come from pymatting's multi-level estimator.

pymatting compiles its numba kernels eagerly when it is first imported (about 40 s on 2 cores with an empty numba
cache, under 1 s once the cache in pymatting's ``__pycache__`` or ``NUMBA_CACHE_DIR`` exists). It is imported on
the first ``refine`` call, not with this module.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from reflade.engine.config import EngineConfig
from reflade.engine.types import Completion

__all__ = ["ClassicalMattingBackend", "refine_masks", "clean_mask"]

# Components smaller than this fraction of the mask's area are specks (never the largest one).
_SPECK_FRACTION = 0.02
# Holes smaller than this fraction of the mask's area are filled; larger ones (a mug's handle, a ring) are real.
_HOLE_FRACTION = 0.05
# Context kept around the unknown band in the matting crop, pixels (beyond the band itself).
_CROP_MARGIN_PX = 4
# Standard deviation of the anti-aliasing blur of completed edges, pixels (a 3x3 kernel: about 1/6 spill).
_ANTIALIAS_SIGMA = 0.6
# Conjugate-gradient limits for the matting solve: alpha to 1e-6 is far below one 8-bit step.
_CG_KWARGS = {"maxiter": 2000, "rtol": 1e-6}


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Refine a binary mask: 3x3 open then close (removes 1-2 px slivers and notches), remove specks, fill small holes.

    Args:
        mask: HxW, bool (or anything whose non-zero pixels are the mask).

    Returns:
        HxW bool. The input (as bool) when cleaning would empty it, so a tiny but real mask is never lost.
    """
    m = np.asarray(mask).astype(bool)
    area = int(m.sum())
    if area == 0:
        return m
    kernel = np.ones((3, 3), np.uint8)  # a square keeps square corners; a cross would nibble them
    u8 = m.astype(np.uint8)
    u8 = cv2.morphologyEx(u8, cv2.MORPH_OPEN, kernel)
    u8 = cv2.morphologyEx(u8, cv2.MORPH_CLOSE, kernel)

    n, labels, stats, _ = cv2.connectedComponentsWithStats(u8, connectivity=8)
    if n <= 1:
        return m
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = areas >= _SPECK_FRACTION * area
    keep[int(np.argmax(areas))] = True
    out = np.concatenate([[False], keep])[labels]

    # Holes: background components (4-connected) that do not touch the image border.
    hn, hlabels, hstats, _ = cv2.connectedComponentsWithStats((~out).astype(np.uint8), connectivity=4)
    if hn > 1:
        h, w = out.shape
        x, y = hstats[1:, cv2.CC_STAT_LEFT], hstats[1:, cv2.CC_STAT_TOP]
        bw, bh = hstats[1:, cv2.CC_STAT_WIDTH], hstats[1:, cv2.CC_STAT_HEIGHT]
        interior = (x > 0) & (y > 0) & (x + bw < w) & (y + bh < h)
        small = hstats[1:, cv2.CC_STAT_AREA] < _HOLE_FRACTION * area
        out |= np.concatenate([[False], interior & small])[hlabels]
    return out if out.any() else m


def refine_masks(visible_mask: np.ndarray, amodal_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clean the visible and amodal masks of one entity consistently (visible is always inside amodal).

    Args:
        visible_mask: HxW bool, the entity's visible pixels.
        amodal_mask: HxW bool, its full extent (visible + completed).

    Returns:
        (visible, amodal), both HxW bool. The pipeline stores this visible mask beside the refined layer.
    """
    visible = clean_mask(visible_mask)
    amodal = clean_mask(np.asarray(amodal_mask, dtype=bool) | visible) | visible
    return visible, amodal


class ClassicalMattingBackend:
    """Mask refinement + closed-form alpha matting + multi-level foreground estimation (pymatting), CPU only."""

    name = "classical"

    def __init__(self, cfg: EngineConfig | None = None):
        self.cfg = cfg or EngineConfig()

    def refine(self, image: np.ndarray, completion: Completion, visible_mask: np.ndarray) -> np.ndarray:
        """Refine one completed foreground layer.

        Args:
            image: HxWx3 uint8 RGB, the source image.
            completion: stage 3 output; ``rgba`` HxWx4 uint8 (its RGB gives the colours of the completed part)
                and ``amodal_mask`` HxW bool (the extent to keep).
            visible_mask: HxW bool, the entity's visible pixels in ``image``.

        Returns:
            HxWx4 uint8 RGBA, straight alpha: matted along the visible boundary, the completed extent anti-aliased
            elsewhere; RGB = 0 where alpha = 0 and RGB = ``image`` wherever the entity is visible and opaque.

        Raises:
            ValueError: shapes or dtypes that do not match the description above.
        """
        image, rgba, amodal_in, visible_in = _check_inputs(image, completion, visible_mask)
        visible, amodal = refine_masks(visible_in, amodal_in)
        hidden = amodal & ~visible
        colour = _entity_colour(image, rgba, visible)

        alpha = cv2.GaussianBlur(amodal.astype(np.float32), (3, 3), _ANTIALIAS_SIGMA)
        alpha[visible & (alpha > 0.999)] = 1.0  # float round-off of the blur must not make opaque pixels 254

        zone = _visible_edge_zone(visible, amodal, self.cfg.matting_band_px)
        # Hidden pixels stay opaque: the occluder's colours say nothing about the entity.
        unknown = zone & ~hidden
        if unknown.any():
            y0, y1, x0, x1 = _crop_box(unknown, self.cfg.matting_band_px + _CROP_MARGIN_PX)
            crop = (slice(y0, y1), slice(x0, x1))
            # The entity as if unoccluded: occluder pixels replaced by the nearest visible colour (not the
            # completion's, whose seam with the visible part would read as a soft edge to the colour-line model).
            composite = _extend_colours(image[crop], visible[crop], hidden[crop])
            a_crop, f_crop = _matte(composite / 255.0, amodal[crop], unknown[crop])
            u = unknown[crop]
            alpha[crop][u] = a_crop[u]
            colour[crop][u] = f_crop[u] * 255.0

        a8 = np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8)
        rgb = np.clip(np.rint(colour), 0, 255).astype(np.uint8)
        opaque_visible = visible & (a8 == 255)
        rgb[opaque_visible] = image[opaque_visible]
        rgb[a8 == 0] = 0
        return np.dstack([rgb, a8])


def _check_inputs(image, completion, visible_mask):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
    h, w = image.shape[:2]
    rgba = np.asarray(completion.rgba)
    if rgba.shape != (h, w, 4) or rgba.dtype != np.uint8:
        raise ValueError(
            f"completion.rgba must be {h}x{w}x4 uint8, got shape {rgba.shape} dtype {rgba.dtype}"
        )
    amodal = np.asarray(completion.amodal_mask, dtype=bool)
    visible = np.asarray(visible_mask, dtype=bool)
    for name, m in (("completion.amodal_mask", amodal), ("visible_mask", visible)):
        if m.shape != (h, w):
            raise ValueError(f"{name} must be {h}x{w}, got {m.shape}")
    return image, rgba, amodal, visible


def _entity_colour(image: np.ndarray, rgba: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """HxWx3 float32: the image where visible, the completion where completed, nearest known colour elsewhere.

    Pixels just outside the known extent (anti-aliasing spill, filled holes) take the colour of the nearest known
    pixel, so a semi-transparent edge never fades to black.
    """
    known = visible | (rgba[..., 3] > 0)
    colour = np.where(visible[..., None], image, rgba[..., :3]).astype(np.float32)
    if not known.any() or known.all():
        return colour
    _, (iy, ix) = ndimage.distance_transform_edt(~known, return_indices=True)
    return colour[iy, ix]


def _extend_colours(image: np.ndarray, visible: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """hxwx3 float32: ``image`` with its ``hidden`` pixels replaced by the nearest ``visible`` pixel's colour."""
    out = image.astype(np.float32)
    if hidden.any() and visible.any():
        _, (iy, ix) = ndimage.distance_transform_edt(~visible, return_indices=True)
        out[hidden] = out[iy[hidden], ix[hidden]]
    return out


def _visible_edge_zone(visible: np.ndarray, amodal: np.ndarray, band: int) -> np.ndarray:
    """HxW bool: pixels within ``band`` px of the boundary between the visible mask and the outside of the entity.

    Boundaries between visible and hidden (behind an occluder) pixels are excluded: the entity continues there.
    """
    if not visible.any() or band <= 0:
        return np.zeros_like(visible)
    kernel = np.ones((3, 3), np.uint8)
    outside_near = cv2.dilate((~amodal).astype(np.uint8), kernel).astype(bool)
    edge = visible & outside_near
    if not edge.any():
        return np.zeros_like(visible)
    dist = cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_L2, 3)
    return dist <= band


def _crop_box(mask: np.ndarray, pad: int) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return (
        max(0, int(ys.min()) - pad),
        min(h, int(ys.max()) + 1 + pad),
        max(0, int(xs.min()) - pad),
        min(w, int(xs.max()) + 1 + pad),
    )


def _matte(image: np.ndarray, fg: np.ndarray, unknown: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form alpha and multi-level foreground on one crop.

    Args:
        image: hxwx3 float in [0, 1].
        fg: hxw bool, known foreground outside ``unknown`` (everything else outside it is known background).
        unknown: hxw bool, the band to solve.

    Returns:
        (alpha hxw float in [0, 1], foreground hxwx3 float in [0, 1]).
    """
    from pymatting import estimate_alpha_cf, estimate_foreground_ml  # numba: compiled/loaded on first use

    trimap = np.where(fg, 1.0, 0.0)
    trimap[unknown] = 0.5
    image = np.ascontiguousarray(image, dtype=np.float64)
    if fg[~unknown].all() or not fg[~unknown].any():
        # No constraint of one kind: the solve is degenerate, keep the binary extent.
        alpha = fg.astype(np.float64)
    else:
        alpha = estimate_alpha_cf(image, trimap, cg_kwargs=_CG_KWARGS)
    foreground = estimate_foreground_ml(image, alpha)
    return alpha, np.clip(foreground, 0.0, 1.0)
