"""Weight-free quality metrics of one predicted layer against its ground truth (no network, meaningful alone).

Inputs follow the sample format (design.md, "Data"): layers are HxWx4 uint8 RGBA with straight (not premultiplied)
alpha, masks are HxW bool or uint8 0/255. All metrics are computed in the frame of the arrays given: bring both
layers to the evaluation's size first with :func:`resize_layer` / :func:`resize_mask` (``eval.metric_size``).

An empty region makes a metric undefined: it returns NaN (aggregate with ``np.nanmean``), never raises.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import structural_similarity

from reflade.engine import decompose

ALPHA_THRESHOLD = 0.5
"""Alpha (in [0, 1]) at or above which a pixel counts as inside the layer (IoU, occluded region)."""


# ---------------------------------------------------------------- inputs


def _check_layer(layer: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(layer, np.ndarray) or layer.ndim != 3 or layer.shape[2] != 4 or layer.dtype != np.uint8:
        desc = f"{layer.dtype} {layer.shape}" if isinstance(layer, np.ndarray) else type(layer).__name__
        raise ValueError(f"{name}: expected an HxWx4 uint8 RGBA layer, got {desc}")
    return layer


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    _check_layer(pred, "prediction")
    _check_layer(gt, "ground truth")
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction {pred.shape} and ground truth {gt.shape} differ in shape: resize both to the metric size"
        )


def as_mask(mask: np.ndarray, shape: tuple[int, int], name: str = "mask") -> np.ndarray:
    """An HxW bool mask from bool, uint8 0/255 (threshold 128) or float in [0, 1] (threshold 0.5).

    Raises:
        ValueError: wrong shape (both shapes named), or an integer mask whose maximum is 1 (a 0/1 mask: the sample
            format stores 0/255; pass ``mask.astype(bool)``).
    """
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"{name} has shape {mask.shape}, the layers' frame is {tuple(shape)}")
    if mask.dtype == np.bool_:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        if mask.size and mask.max() == 1:
            raise ValueError(
                f"{name}: integer mask with maximum 1; masks are bool or 0/255 (use .astype(bool))"
            )
        return mask >= 128
    if np.issubdtype(mask.dtype, np.floating):
        return mask >= 0.5
    raise ValueError(f"{name}: unsupported mask dtype {mask.dtype}")


def alpha(layer: np.ndarray) -> np.ndarray:
    """Alpha of an HxWx4 uint8 layer as HxW float64 in [0, 1]."""
    return _check_layer(layer, "layer")[..., 3].astype(np.float64) / 255.0


def _region(region: np.ndarray | None, shape: tuple[int, int], name: str) -> np.ndarray:
    return np.ones(shape, dtype=bool) if region is None else as_mask(region, shape, name)


# ---------------------------------------------------------------- resizing (the one place)


def metric_frame(height: int, width: int, metric_size: int) -> tuple[int, int]:
    """(height, width) of a frame whose LONGEST side is ``metric_size`` pixels, aspect ratio kept (>= 1 px)."""
    if height < 1 or width < 1 or metric_size < 1:
        raise ValueError(f"metric_frame: sizes must be positive, got {height}x{width} -> {metric_size}")
    scale = metric_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_layer(layer: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an HxWx4 uint8 straight-alpha layer to ``size`` = (height, width).

    The decomposition API's own resizing (:func:`reflade.engine.decompose.resize_layer`, one place for it):
    resampled premultiplied, so the colour of transparent pixels never bleeds into the layer's edge; RGB is 0 where
    the resized alpha is 0, as the sample format requires.
    """
    _check_layer(layer, "layer")
    return decompose.resize_layer(layer, int(size[0]), int(size[1])).copy()


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an HxW mask (bool or 0/255) to ``size`` = (height, width); returns bool (covered >= half)."""
    m = np.asarray(mask)
    m = as_mask(m, m.shape[:2]).astype(np.float32)
    return decompose.resize_image(m, int(size[0]), int(size[1])) >= 0.5


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an HxWx3 uint8 RGB image to ``size`` = (height, width) (the decomposition API's resizing)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"resize_image: expected HxWx3, got {image.shape}")
    return decompose.resize_image(image, int(size[0]), int(size[1])).copy()


# ---------------------------------------------------------------- regions


def occluded_region(gt: np.ndarray, visible: np.ndarray, kind: str) -> np.ndarray:
    """The HxW bool region a model must invent: what the visible pixels do not show.

    Foreground: inside the ground-truth layer (alpha >= 0.5) but not visible. Background (``visible`` = the pixels
    not covered by the removed entity): everything not visible, i.e. the removed region.
    """
    _check_layer(gt, "ground truth")
    vis = as_mask(visible, gt.shape[:2], "visible mask")
    if kind == "foreground":
        return (alpha(gt) >= ALPHA_THRESHOLD) & ~vis
    if kind == "background":
        return ~vis
    raise ValueError(f"occluded_region: unknown layer kind {kind!r} (known: foreground, background)")


# ---------------------------------------------------------------- alpha (the matting benchmarks' measures)


def alpha_iou(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> float:
    """IoU of the two alphas thresholded at 0.5, inside ``region`` (default: the whole frame).

    Returns NaN when both are empty there (the union is empty).
    """
    _check_pair(pred, gt)
    r = _region(region, gt.shape[:2], "region")
    p, g = (alpha(pred) >= ALPHA_THRESHOLD) & r, (alpha(gt) >= ALPHA_THRESHOLD) & r
    union = int(np.count_nonzero(p | g))
    return math.nan if union == 0 else int(np.count_nonzero(p & g)) / union


def alpha_sad(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> float:
    """Sum of absolute alpha differences (alpha in [0, 1]) inside ``region``, in THOUSANDS, as matting benchmarks
    (alphamatting.com, Composition-1k) report SAD. Depends on the frame size: compare at one metric size.

    Returns NaN on an empty region.
    """
    _check_pair(pred, gt)
    r = _region(region, gt.shape[:2], "region")
    if not r.any():
        return math.nan
    return float(np.abs(alpha(pred) - alpha(gt))[r].sum()) / 1000.0


def alpha_mse(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> float:
    """Mean squared alpha difference (alpha in [0, 1], not scaled) inside ``region``; NaN on an empty region."""
    _check_pair(pred, gt)
    r = _region(region, gt.shape[:2], "region")
    if not r.any():
        return math.nan
    return float(np.mean((alpha(pred) - alpha(gt))[r] ** 2))


# ---------------------------------------------------------------- colour


def psnr_visible(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray) -> float:
    """PSNR (dB, peak 255) of the straight RGB inside the visible region: ``10 log10(255^2 / MSE)`` over its
    pixels and 3 channels. ``inf`` when identical there; NaN on an empty region."""
    _check_pair(pred, gt)
    v = as_mask(visible, gt.shape[:2], "visible mask")
    if not v.any():
        return math.nan
    diff = pred[..., :3][v].astype(np.float64) - gt[..., :3][v].astype(np.float64)
    mse = float(np.mean(diff**2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def ssim_visible(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray) -> float:
    """SSIM of the straight RGB inside the visible region, in [-1, 1].

    Both images are multiplied by the visible mask (as S_vis is), then skimage's full SSIM map (7x7 window, data
    range 255, per channel) is averaged over the region's pixels and channels: pixels outside the region never
    count, and hidden content of either layer cannot leak in through the window. NaN on an empty region.

    Raises:
        ValueError: shapes differ, or a side is below 7 pixels (the SSIM window).
    """
    _check_pair(pred, gt)
    v = as_mask(visible, gt.shape[:2], "visible mask")
    if min(gt.shape[:2]) < 7:
        raise ValueError(f"ssim_visible: frame {gt.shape[:2]} is smaller than the 7x7 SSIM window")
    if not v.any():
        return math.nan
    m = v[..., None]
    p = pred[..., :3].astype(np.float64) * m
    g = gt[..., :3].astype(np.float64) * m
    _, smap = structural_similarity(g, p, data_range=255.0, channel_axis=2, full=True)
    return float(smap[v].mean())


def region_rgb_error(pred: np.ndarray, gt: np.ndarray, region: np.ndarray) -> float:
    """Mean absolute error (0-255) of the PREMULTIPLIED RGB (rgb * alpha) inside ``region``, over pixels and 3
    channels: the colour the layer shows where it is composited, so a missing or faint alpha costs as much as a
    wrong colour. Used on :func:`occluded_region` (a foreground's hidden part, a background's removed region).
    NaN on an empty region."""
    _check_pair(pred, gt)
    r = as_mask(region, gt.shape[:2], "region")
    if not r.any():
        return math.nan

    def pre(x: np.ndarray) -> np.ndarray:
        return x[..., :3][r].astype(np.float64) * (x[..., 3][r].astype(np.float64)[:, None] / 255.0)

    return float(np.mean(np.abs(pre(pred) - pre(gt))))


def layer_metrics(
    pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, *, kind: str, exact_hidden: bool = False
) -> dict[str, float]:
    """Every weight-free metric of one (prediction, ground truth) pair, in one frame.

    Args:
        pred, gt: HxWx4 uint8 straight-alpha layers of the same shape.
        visible: HxW ground-truth visible mask (bool or 0/255).
        kind: ``foreground`` or ``background``.
        exact_hidden: the ground truth is exact behind occluders (synthetic rows): also report ``hidden_rgb_mae``
            and ``hidden_alpha_iou`` inside :func:`occluded_region`.

    Returns:
        ``alpha_iou``, ``alpha_sad`` (thousands), ``alpha_mse``, ``psnr_visible`` (dB), ``ssim_visible``, and with
        ``exact_hidden`` ``hidden_rgb_mae`` (0-255) and ``hidden_alpha_iou``; NaN where a region is empty.
    """
    if kind not in ("foreground", "background"):
        raise ValueError(f"layer_metrics: unknown layer kind {kind!r} (known: foreground, background)")
    out = {
        "alpha_iou": alpha_iou(pred, gt),
        "alpha_sad": alpha_sad(pred, gt),
        "alpha_mse": alpha_mse(pred, gt),
        "psnr_visible": psnr_visible(pred, gt, visible),
        "ssim_visible": ssim_visible(pred, gt, visible),
    }
    if exact_hidden:
        hidden = occluded_region(gt, visible, kind)
        out["hidden_rgb_mae"] = region_rgb_error(pred, gt, hidden)
        out["hidden_alpha_iou"] = alpha_iou(pred, gt, hidden)
    return out
