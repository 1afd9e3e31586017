"""Weight-free metrics on hand-made layers with exact expected values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reflade.eval.metrics import (
    alpha_iou,
    alpha_mse,
    alpha_sad,
    as_mask,
    layer_metrics,
    metric_frame,
    occluded_region,
    psnr_visible,
    region_rgb_error,
    resize_layer,
    resize_mask,
    ssim_visible,
)


def layer(alpha_mask: np.ndarray, rgb=(200, 100, 50), alpha_value: int = 255) -> np.ndarray:
    h, w = alpha_mask.shape
    out = np.zeros((h, w, 4), np.uint8)
    out[alpha_mask, :3] = rgb
    out[alpha_mask, 3] = alpha_value
    return out


def box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_alpha_iou_sad_mse_exact():
    gt = layer(box(20, 20, 0, 10, 0, 10))  # 100 px
    pred = layer(box(20, 20, 0, 10, 5, 15))  # 100 px, 50 shared
    assert alpha_iou(pred, gt) == pytest.approx(50 / 150)
    assert alpha_sad(pred, gt) == pytest.approx(100 / 1000)  # 100 pixels differ by 1.0, in thousands
    assert alpha_mse(pred, gt) == pytest.approx(100 / 400)
    assert alpha_iou(gt, gt) == 1.0 and alpha_sad(gt, gt) == 0.0 and alpha_mse(gt, gt) == 0.0
    # half-transparent prediction: alpha 128/255 is >= 0.5 so IoU counts it; SAD counts the exact difference
    half = layer(box(20, 20, 0, 10, 0, 10), alpha_value=128)
    assert alpha_iou(half, gt) == 1.0
    assert alpha_sad(half, gt) == pytest.approx(100 * (127 / 255) / 1000)
    assert alpha_mse(half, gt) == pytest.approx(100 * (127 / 255) ** 2 / 400)
    # inside a region: the left half of the frame holds 50 of gt's and 0 of pred's exclusive pixels
    left = box(20, 20, 0, 20, 0, 10)
    assert alpha_iou(pred, gt, left) == pytest.approx(50 / 100)
    assert alpha_sad(pred, gt, left) == pytest.approx(50 / 1000)
    assert alpha_mse(pred, gt, left.astype(np.uint8) * 255) == pytest.approx(50 / 200)


def test_empty_regions_give_nan_not_a_crash():
    empty = layer(np.zeros((10, 10), bool))
    none = np.zeros((10, 10), bool)
    full = layer(np.ones((10, 10), bool))
    assert math.isnan(alpha_iou(empty, empty))
    for fn in (alpha_sad, alpha_mse, alpha_iou, region_rgb_error):
        assert math.isnan(fn(full, full, none)), fn.__name__
    assert math.isnan(psnr_visible(full, full, none))
    assert math.isnan(ssim_visible(full, full, none))
    m = layer_metrics(full, full, none, kind="foreground", exact_hidden=True)
    assert math.isnan(m["psnr_visible"]) and m["hidden_rgb_mae"] == 0.0  # nothing visible: all hidden
    m = layer_metrics(full, full, ~none, kind="foreground", exact_hidden=True)
    assert m["psnr_visible"] == math.inf and math.isnan(m["hidden_rgb_mae"])  # all visible: nothing hidden
    assert math.isnan(m["hidden_alpha_iou"])


def test_shape_and_input_errors_name_the_problem():
    a, b = layer(np.ones((10, 10), bool)), layer(np.ones((10, 12), bool))
    with pytest.raises(ValueError, match=r"prediction \(10, 10, 4\) and ground truth \(10, 12, 4\)"):
        alpha_iou(a, b)
    with pytest.raises(
        ValueError, match=r"visible mask has shape \(10, 12\), the layers' frame is \(10, 10\)"
    ):
        psnr_visible(a, a, np.ones((10, 12), bool))
    with pytest.raises(ValueError, match="HxWx4 uint8"):
        alpha_mse(a[..., :3], a)
    with pytest.raises(ValueError, match="maximum 1"):
        as_mask(np.ones((10, 10), np.uint8), (10, 10))
    with pytest.raises(ValueError, match="unknown layer kind 'middle'"):
        layer_metrics(a, a, np.ones((10, 10), bool), kind="middle")
    with pytest.raises(ValueError, match="smaller than the 7x7"):
        ssim_visible(a[:5, :5], a[:5, :5], np.ones((5, 5), bool))


def test_psnr_and_ssim_in_the_visible_region():
    rng = np.random.default_rng(0)
    gt = np.full((32, 32, 4), 255, np.uint8)
    gt[..., :3] = rng.integers(20, 236, size=(32, 32, 3))
    vis = box(32, 32, 0, 16, 0, 32)
    assert psnr_visible(gt, gt, vis) == math.inf
    assert ssim_visible(gt, gt, vis) == pytest.approx(1.0)
    pred = gt.copy()
    pred[..., :3] += 10  # error 10 everywhere: PSNR = 20 log10(255 / 10)
    assert psnr_visible(pred, gt, vis) == pytest.approx(20 * math.log10(25.5))
    # errors outside the visible region do not count
    outside = gt.copy()
    outside[16:, :, :3] = 0
    assert psnr_visible(outside, gt, vis) == math.inf
    assert ssim_visible(outside, gt, vis) == pytest.approx(1.0)
    noisy = gt.copy()
    noisy[..., :3] = np.clip(gt[..., :3] + rng.normal(0, 30, size=(32, 32, 3)), 0, 255).astype(np.uint8)
    assert ssim_visible(noisy, gt, vis) < ssim_visible(pred, gt, vis) < 1.0


def test_occluded_region_and_its_rgb_error():
    gt = layer(box(10, 10, 0, 10, 0, 6), rgb=(100, 100, 100))  # the entity: 60 px
    vis = box(10, 10, 0, 10, 0, 4)  # 40 of them visible, 20 hidden (columns 4, 5)
    hidden = occluded_region(gt, vis, "foreground")
    assert hidden.sum() == 20 and hidden[:, 4:6].all()
    copy_visible = layer(vis, rgb=(100, 100, 100))  # the copy-visible baseline invents nothing
    assert region_rgb_error(copy_visible, gt, hidden) == pytest.approx(100.0)  # premultiplied: 100 vs 0
    wrong_colour = layer(box(10, 10, 0, 10, 0, 6), rgb=(110, 90, 100))
    assert region_rgb_error(wrong_colour, gt, hidden) == pytest.approx(20 / 3)
    assert region_rgb_error(gt, gt, hidden) == 0.0
    m = layer_metrics(copy_visible, gt, vis, kind="foreground", exact_hidden=True)
    assert m["hidden_alpha_iou"] == 0.0 and m["alpha_iou"] == pytest.approx(40 / 60)
    bg_vis = ~box(10, 10, 2, 5, 2, 5)  # background: the removed entity covered 9 px
    assert occluded_region(layer(np.ones((10, 10), bool)), bg_vis, "background").sum() == 9


def test_metric_frame_and_premultiplied_resize():
    assert metric_frame(1437, 1831, 512) == (402, 512)
    assert metric_frame(100, 50, 64) == (64, 32)
    # a red square on transparent pixels whose (invalid) colour is green: no green may bleed into the edge
    src = np.zeros((64, 64, 4), np.uint8)
    src[..., 1] = 255
    src[16:48, 16:48] = (255, 0, 0, 255)
    for size in ((21, 21), (100, 100)):
        out = resize_layer(src, size)
        assert out.shape == (*size, 4) and out.dtype == np.uint8
        edge = out[(out[..., 3] > 0) & (out[..., 3] < 255)]
        assert len(edge) > 0 and edge[:, 1].max() <= 1 and edge[:, 0].min() >= 254
        assert (out[out[..., 3] == 0, :3] == 0).all()
    m = resize_mask(box(64, 64, 16, 48, 16, 48).astype(np.uint8) * 255, (32, 32))
    assert m.dtype == bool and m.sum() == 16 * 16
