"""The prompt canvas: every spatial prompt drawn on one RGB image (rld-method.md, RefLayer).

This is the one renderer of the platform: training, serving and evaluation all draw canvases here.

Drawing rules, in this order (later ones paint over earlier ones):

1. Background: blue ``(0, 0, 1)``.
2. Box: its half-open region ``[x0, x1) x [y0, y1)`` green ``(0, 1, 0)``.
3. Mask: its pixels red ``(1, 0, 0)`` (a mask lies over the box).
4. Points: a Gaussian dot each, blended into the canvas as ``canvas = canvas * (1 - g) + colour * g`` with
   ``g = exp(-d^2 / (2 sigma^2))`` and ``d`` the distance in pixels from the point's pixel. Positive points
   (label 1) are white ``(1, 1, 1)``, negative points (label 0) black ``(0, 0, 0)``: both differ from every
   region colour in all three channels, so a dot stays visible on any region. Where dots overlap, a pixel
   blends with the dot of largest ``g`` only, so ``g = 1`` at a point's own pixel makes that pixel exactly its
   dot colour whatever other points are near (two points on one pixel: the later one).

Text is not drawn (it goes through the text encoder). A text-only prompt therefore has the empty canvas (all
blue), the same canvas that stands for "no spatial prompt" when conditions are dropped in training.

Prompts follow the sample format (:mod:`reflade.engine.schema`): ``type``, ``granularity``, ``points``
(``[[x, y, label], ...]`` in pixels), ``box`` (``[x0, y0, x1, y1]``, half-open, pixels), ``mask`` (PNG bytes,
0/255) and ``text``. Here a mask may also be an HxW NumPy array (bool, or numbers where non-zero is inside), and
missing keys default to ``None`` (``granularity`` to ``"fine"``). The prompt checks (:class:`PromptError`,
:func:`validate_prompt_for_image`) live in :mod:`reflade.engine.decompose`, the one place every decomposer and
caller shares; they are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

from reflade.engine.decompose import (
    MAX_TEXT_CHARS,
    PromptError,
    normalize_prompt,
    validate_prompt_for_image,
)
from reflade.engine.decompose import prompt_mask_array as _mask_array

__all__ = [
    "BACKGROUND",
    "BOX",
    "MASK",
    "MAX_TEXT_CHARS",
    "NEGATIVE_POINT",
    "POSITIVE_POINT",
    "PromptError",
    "canvas_batch",
    "default_sigma",
    "empty_canvas",
    "normalize_prompt",
    "render_canvas",
    "validate_prompt_for_image",
]

BACKGROUND = (0.0, 0.0, 1.0)
BOX = (0.0, 1.0, 0.0)
MASK = (1.0, 0.0, 0.0)
POSITIVE_POINT = (1.0, 1.0, 1.0)
NEGATIVE_POINT = (0.0, 0.0, 0.0)


def default_sigma(height: int, width: int) -> float:
    """Standard deviation of a point's dot in pixels: ``max(h, w) / 64``, at least 1 pixel."""
    return max(1.0, max(height, width) / 64.0)


def empty_canvas(height: int, width: int) -> torch.Tensor:
    """The canvas of no spatial prompt (all blue) as (1, 3, H, W) in [-1, 1]: the unconditional canvas."""
    c = torch.tensor(BACKGROUND, dtype=torch.float32).mul(2.0).sub(1.0)
    return c.view(1, 3, 1, 1).expand(1, 3, height, width).contiguous()


def _draw_dots(canvas: np.ndarray, points: list[list[int]], sigma: float) -> None:
    # Each pixel blends with the dot of largest weight (its nearest), so dots never dim each other's peaks.
    # Weights are evaluated on a window of 5 sigma (g < 4e-6 outside: below what 8 bits or a VAE can see).
    if not points:
        return
    h, w = canvas.shape[:2]
    r = int(np.ceil(5.0 * sigma))
    weight = np.zeros((h, w), np.float32)
    colour = np.zeros((h, w, 3), np.float32)
    for x, y, label in points:
        y0, y1, x0, x1 = max(0, y - r), min(h, y + r + 1), max(0, x - r), min(w, x + r + 1)
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - y
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - x
        g = np.exp(-(xx * xx + yy * yy) / np.float32(2.0 * sigma * sigma))
        wins = g >= weight[y0:y1, x0:x1]  # ties: the later point wins
        weight[y0:y1, x0:x1][wins] = g[wins]
        colour[y0:y1, x0:x1][wins] = POSITIVE_POINT if label == 1 else NEGATIVE_POINT
    g = weight[..., None]
    canvas *= 1.0 - g
    canvas += g * colour


def render_canvas(
    prompt: dict[str, Any], height: int, width: int, *, sigma: float | None = None, validate: bool = True
) -> np.ndarray:
    """Draw a prompt's spatial parts on an RGB canvas in the image's pixel frame.

    Args:
        prompt: a prompt of the sample format (see the module docstring); coordinates in pixels of an image of
            ``height`` x ``width``.
        height, width: the image's size in pixels.
        sigma: standard deviation of point dots in pixels (default :func:`default_sigma`).
        validate: check the prompt first (:func:`validate_prompt_for_image`); off only for prompts already
            checked.

    Returns:
        HxWx3 float32 in [0, 1].

    Raises:
        PromptError: the prompt does not fit the image (when ``validate``).
    """
    p = validate_prompt_for_image(prompt, height, width) if validate else normalize_prompt(prompt)
    sigma = default_sigma(height, width) if sigma is None else float(sigma)
    if sigma <= 0:
        raise PromptError(f"point sigma must be positive, got {sigma}")
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    if p["box"] is not None:
        x0, y0, x1, y1 = p["box"]
        canvas[y0:y1, x0:x1] = BOX
    m = _mask_array(p["mask"])
    if m is not None:
        canvas[m] = MASK
    _draw_dots(canvas, p["points"], sigma)
    return canvas


def canvas_batch(
    prompts: Sequence[dict[str, Any]],
    height: int | Sequence[int],
    width: int | Sequence[int],
    *,
    size: tuple[int, int] | None = None,
    sigma: float | None = None,
) -> torch.Tensor:
    """Canvases of several prompts as one tensor for the VAE.

    Args:
        prompts: B prompts.
        height, width: the image size each prompt's coordinates refer to (one for all, or one per prompt).
        size: (H, W) of the output; each canvas is drawn in its own frame and resized to it (area averaging when
            shrinking, as images are). Default: the frame itself (then all frames must be equal).
        sigma: point dot sigma in the prompt's frame (default :func:`default_sigma` of that frame).

    Returns:
        (B, 3, H, W) float32 in [-1, 1].

    Raises:
        PromptError: a prompt does not fit its image, or frames differ without ``size``.
    """
    n = len(prompts)
    hs = [int(height)] * n if isinstance(height, (int, np.integer)) else [int(v) for v in height]
    ws = [int(width)] * n if isinstance(width, (int, np.integer)) else [int(v) for v in width]
    if len(hs) != n or len(ws) != n:
        raise PromptError(f"{n} prompts but {len(hs)} heights and {len(ws)} widths")
    if size is None:
        if len(set(zip(hs, ws, strict=True))) > 1:
            raise PromptError(
                "prompts refer to images of different sizes: give `size` to resize the canvases"
            )
        size = (hs[0], ws[0]) if n else (0, 0)
    out = np.empty((n, size[0], size[1], 3), dtype=np.float32)
    for i, (p, h, w) in enumerate(zip(prompts, hs, ws, strict=True)):
        c = render_canvas(p, h, w, sigma=sigma)
        if (h, w) != tuple(size):
            interp = cv2.INTER_AREA if size[0] <= h and size[1] <= w else cv2.INTER_LINEAR
            c = cv2.resize(c, (size[1], size[0]), interpolation=interp)
        out[i] = c
    return torch.from_numpy(out).permute(0, 3, 1, 2).mul_(2.0).sub_(1.0).contiguous()
