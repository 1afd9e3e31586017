"""The prompt canvas renders exactly, and bad prompts fail with messages that say what is wrong."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reflade.engine.schema import encode_png
from reflade.train.canvas import (
    BACKGROUND,
    BOX,
    MASK,
    NEGATIVE_POINT,
    POSITIVE_POINT,
    PromptError,
    canvas_batch,
    default_sigma,
    empty_canvas,
    render_canvas,
    validate_prompt_for_image,
)

H, W = 48, 64


def _prompt(**kw):
    base = {"type": None, "granularity": "fine", "points": [], "box": None, "mask": None, "text": None}
    base.update(kw)
    return base


def test_background_box_and_mask_colours_are_exact():
    mask = np.zeros((H, W), bool)
    mask[20:30, 15:25] = True
    c = render_canvas(_prompt(type="box+mask", box=[10, 5, 40, 35], mask=encode_png(mask)), H, W)
    assert c.shape == (H, W, 3) and c.dtype == np.float32
    assert tuple(c[0, 0]) == BACKGROUND and tuple(c[47, 63]) == BACKGROUND
    assert tuple(c[5, 10]) == BOX and tuple(c[34, 39]) == BOX  # first and last pixel of the half-open box
    assert tuple(c[5, 40]) == BACKGROUND and tuple(c[35, 10]) == BACKGROUND  # x1 and y1 are outside
    assert tuple(c[20, 15]) == MASK and tuple(c[29, 24]) == MASK  # the mask lies over the box
    assert tuple(c[30, 24]) == BOX
    # every pixel is one of the three region colours (no dots, no blending)
    colours = {tuple(px) for px in c.reshape(-1, 3)}
    assert colours == {BACKGROUND, BOX, MASK}


def test_mask_outside_box_and_mask_as_array():
    mask = np.zeros((H, W), bool)
    mask[40:44, 50:60] = True
    a = render_canvas(_prompt(type="mask", mask=mask), H, W)
    b = render_canvas(_prompt(type="mask", mask=encode_png(mask)), H, W)
    np.testing.assert_array_equal(a, b)
    assert (a[mask] == MASK).all() and (a[~mask] == BACKGROUND).all()
    # a 0/1 uint8 array is read as non-zero = inside
    c = render_canvas(_prompt(type="mask", mask=mask.astype(np.uint8)), H, W)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("label,colour", [(1, POSITIVE_POINT), (0, NEGATIVE_POINT)])
def test_point_is_a_gaussian_dot_with_exact_peak(label, colour):
    x, y, sigma = 30, 20, 3.0
    c = render_canvas(_prompt(type="point", points=[[x, y, label]]), H, W, sigma=sigma)
    assert tuple(c[y, x]) == colour  # g = 1 at the point's pixel
    bg = np.asarray(BACKGROUND, np.float32)
    col = np.asarray(colour, np.float32)
    # weight of the dot colour recovered from the blend, along the row and the column through the point
    for d in range(0, 12):
        for yy, xx in ((y, x + d), (y, x - d), (y + d, x), (y - d, x)):
            expected = math.exp(-(d * d) / (2 * sigma * sigma))
            np.testing.assert_allclose(c[yy, xx], bg * (1 - expected) + col * expected, atol=1e-6)
    # diagonal: the dot is round (depends on distance only)
    g = math.exp(-(2 * 16) / (2 * sigma * sigma))
    np.testing.assert_allclose(c[y + 4, x + 4], bg * (1 - g) + col * g, atol=1e-6)
    # distance from the dot colour grows monotonically away from the peak
    dist = np.abs(c[y, x:] - col).sum(-1)
    assert np.all(np.diff(dist[: int(5 * sigma)]) > 0)
    # far from the dot the background is untouched
    assert tuple(c[0, 0]) == BACKGROUND


def test_dots_over_regions_and_default_sigma():
    assert default_sigma(H, W) == 1.0  # max(48, 64) / 64
    assert default_sigma(512, 256) == 8.0
    c = render_canvas(
        _prompt(type="point+box", points=[[20, 20, 1], [25, 22, 0]], box=[10, 10, 40, 40]), H, W
    )
    assert tuple(c[20, 20]) == POSITIVE_POINT and tuple(c[22, 25]) == NEGATIVE_POINT
    # one sigma from the positive dot, on the box: halfway-ish between green and white
    g = math.exp(-0.5)
    np.testing.assert_allclose(
        c[20, 19], np.asarray(BOX) * (1 - g) + np.asarray(POSITIVE_POINT) * g, atol=1e-6
    )


def test_text_is_not_drawn():
    c = render_canvas(_prompt(type="text", text="the red disc"), H, W)
    assert (c == np.asarray(BACKGROUND, np.float32)).all()
    e = empty_canvas(H, W)
    assert e.shape == (1, 3, H, W)
    np.testing.assert_array_equal(e[0].permute(1, 2, 0).numpy(), c * 2 - 1)


def test_canvas_batch_range_shape_and_resize():
    prompts = [_prompt(type="box", box=[0, 0, 32, 24]), _prompt(type="point", points=[[10, 10, 1]])]
    t = canvas_batch(prompts, H, W)
    assert t.shape == (2, 3, H, W)
    assert t.min() >= -1 and t.max() <= 1
    assert t[0, :, 0, 0].tolist() == [-1.0, 1.0, -1.0]  # green in [-1, 1]
    assert t[0, :, 47, 63].tolist() == [-1.0, -1.0, 1.0]
    small = canvas_batch(prompts, [H, 96], [W, 128], size=(24, 32))
    assert small.shape == (2, 3, 24, 32)
    assert small[0, :, 0, 0].tolist() == [-1.0, 1.0, -1.0]
    with pytest.raises(PromptError, match="different sizes"):
        canvas_batch(prompts, [H, 96], [W, 128])


@pytest.mark.parametrize(
    "prompt,message",
    [
        (_prompt(type="point", points=[[64, 10, 1]]), r"point \[64, 10, 1\] outside the 64x48 image"),
        (_prompt(type="point", points=[[-1, 10, 1]]), "outside"),
        (_prompt(type="point", points=[[3, 4, 2]]), "label 0 or 1"),
        (_prompt(type="box", box=[10, 10, 65, 20]), "half-open inside 64x48"),
        (_prompt(type="box", box=[10, 10, 10, 20]), "half-open"),  # empty: x0 == x1
        (_prompt(type="box", box=[20, 10, 10, 20]), "half-open"),
        (_prompt(type="box", box=[1, 2, 3]), "half-open"),
        (_prompt(type="mask", mask=np.zeros((W, H), bool)), "mask is 48x64 .* the image is 64x48"),
        (_prompt(type="mask", mask=encode_png(np.zeros((10, 10), bool))), "does not match the image 64x48"),
        (_prompt(type="text", text="x" * 301), "301 characters"),
        (_prompt(type="scribble", points=[[1, 1, 1]]), "prompt type 'scribble'"),
        (_prompt(type="text"), "empty prompt"),
        (_prompt(), "empty prompt"),
        (_prompt(type="box", box=None, points=[[1, 1, 1]]), "box prompt without a box"),
        (_prompt(type="text", text="x", granularity="medium"), "granularity"),
        ({"type": "box", "bbox": [0, 0, 1, 1]}, "unknown prompt keys"),
    ],
)
def test_bad_prompts_raise_prompt_error(prompt, message):
    with pytest.raises(PromptError, match=message):
        validate_prompt_for_image(prompt, H, W)
    with pytest.raises(PromptError):
        render_canvas(prompt, H, W)


def test_good_prompts_pass_and_fill_defaults():
    p = validate_prompt_for_image({"box": [0, 0, 64, 48], "text": "x" * 300}, H, W)
    assert p["type"] == "text+box" and p["granularity"] == "fine" and p["points"] == []
    assert isinstance(PromptError("x"), ValueError)
