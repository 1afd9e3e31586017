"""Stage 6, post-filter: reject layers that are malformed, empty, or that changed what the image shows.

Checks, in the order they are reported (the first failure is the reason; every score is computed when it can be):

| kind | code | rejects when |
|---|---|---|
| both | ``invalid_rgba`` | not HxWx4 uint8 like the image; foreground: RGB != 0 where alpha = 0; background: alpha != 255 |
| foreground | ``empty_alpha`` | alpha covers less than ``min_alpha_fraction`` of the image |
| foreground | ``full_alpha`` | alpha covers more than ``max_alpha_fraction`` |
| both | ``visible_changed`` | mean abs RGB difference to the image over the compared pixels > ``max_visible_change`` |
| foreground | ``implausible_size`` | amodal area / visible area > 4: the completion invented most of the object |

Compared pixels: foreground, the visible pixels where the layer is opaque (alpha = 255); background, the pixels
the removed entity did not cover (the row's ``visible_mask``).

Scores (all kinds): ``alpha_fraction`` = sum(alpha) / (255 * H * W); ``visible_change`` (0-255); ``amodal_ratio`` =
alpha area (sum(alpha) / 255) / visible area (at least 1 pixel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reflade.engine.config import EngineConfig
from reflade.engine.schema import KINDS

__all__ = ["Verdict", "check_layer", "MAX_AMODAL_RATIO"]

MAX_AMODAL_RATIO = 4.0
"""A foreground layer whose alpha area exceeds this many times its visible area is rejected."""


@dataclass
class Verdict:
    """The post-filter's decision on one layer.

    Attributes:
        ok: True when the layer is kept.
        reason: None when kept, else ``"code: human detail"`` (codes in the module's table).
        scores: ``alpha_fraction``, ``visible_change``, ``amodal_ratio`` (NaN where the layer is too malformed).
    """

    ok: bool
    reason: str | None
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def code(self) -> str | None:
        """The reason's code alone (``"visible_changed"``), for counting rejections by cause."""
        return None if self.reason is None else self.reason.split(":", 1)[0]


def check_layer(
    layer: np.ndarray,
    image: np.ndarray,
    visible_mask: np.ndarray,
    kind: str,
    cfg: EngineConfig | None = None,
) -> Verdict:
    """Decide whether one layer enters the dataset.

    Args:
        layer: HxWx4 uint8 RGBA, straight alpha (a malformed layer is a rejection, not an error).
        image: HxWx3 uint8 RGB, the source image.
        visible_mask: HxW bool. Foreground: the entity's visible pixels. Background: the pixels of ``image`` not
            covered by the removed entity (the row's ``visible_mask`` column).
        kind: ``foreground`` or ``background``.
        cfg: engine configuration (``min_alpha_fraction``, ``max_alpha_fraction``, ``max_visible_change``).

    Returns:
        A Verdict.

    Raises:
        ValueError: unknown kind, or an image / mask that does not have the shapes above (a caller's bug).
    """
    cfg = cfg or EngineConfig()
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
    h, w = image.shape[:2]
    visible = np.asarray(visible_mask).astype(bool)
    if visible.shape != (h, w):
        raise ValueError(f"visible_mask must be {h}x{w} like the image, got {visible.shape}")

    nan = float("nan")
    layer = np.asarray(layer)
    if layer.shape != (h, w, 4) or layer.dtype != np.uint8:
        scores = {"alpha_fraction": nan, "visible_change": nan, "amodal_ratio": nan}
        return _reject(
            "invalid_rgba",
            f"layer has shape {layer.shape} dtype {layer.dtype}, expected {h}x{w}x4 uint8",
            scores,
        )

    alpha = layer[..., 3]
    rgb = layer[..., :3]
    alpha_area = float(alpha.sum(dtype=np.float64)) / 255.0
    visible_area = int(visible.sum())
    compared = visible & (alpha == 255) if kind == "foreground" else visible
    change = _mean_abs_diff(rgb, image, compared)
    scores = {
        "alpha_fraction": alpha_area / (h * w),
        "visible_change": change,
        "amodal_ratio": alpha_area / max(visible_area, 1),
    }

    if kind == "background":
        not_opaque = int((alpha != 255).sum())
        if not_opaque:
            return _reject(
                "invalid_rgba", f"background layer has {not_opaque} pixels with alpha != 255", scores
            )
        if change > cfg.max_visible_change:
            return _reject(
                "visible_changed",
                f"mean change {change:.1f} of the {visible_area} pixels outside the "
                f"removed entity exceeds {cfg.max_visible_change}",
                scores,
            )
        return Verdict(ok=True, reason=None, scores=scores)

    stray = int(((alpha == 0) & rgb.any(axis=-1)).sum())
    if stray:
        return _reject("invalid_rgba", f"{stray} pixels have RGB != 0 where alpha = 0", scores)
    if scores["alpha_fraction"] < cfg.min_alpha_fraction:
        return _reject(
            "empty_alpha",
            f"alpha covers {scores['alpha_fraction']:.4f} of the image, below {cfg.min_alpha_fraction}",
            scores,
        )
    if scores["alpha_fraction"] > cfg.max_alpha_fraction:
        return _reject(
            "full_alpha",
            f"alpha covers {scores['alpha_fraction']:.3f} of the image, above {cfg.max_alpha_fraction}",
            scores,
        )
    if change > cfg.max_visible_change:
        return _reject(
            "visible_changed",
            f"mean change {change:.1f} on {int(compared.sum())} opaque visible "
            f"pixels exceeds {cfg.max_visible_change}: the completion altered what was seen",
            scores,
        )
    max_ratio = getattr(cfg, "max_amodal_ratio", MAX_AMODAL_RATIO)
    if scores["amodal_ratio"] > max_ratio:
        return _reject(
            "implausible_size",
            f"layer area is {scores['amodal_ratio']:.1f}x the visible area "
            f"({visible_area} px), above {max_ratio}: the completion invented most of the object",
            scores,
        )
    return Verdict(ok=True, reason=None, scores=scores)


def _mean_abs_diff(rgb: np.ndarray, image: np.ndarray, where: np.ndarray) -> float:
    """Mean absolute difference over the selected pixels and the 3 channels, 0-255; 0 when none is selected."""
    if not where.any():
        return 0.0
    return float(np.abs(rgb[where].astype(np.int16) - image[where].astype(np.int16)).mean())


def _reject(code: str, detail: str, scores: dict[str, float]) -> Verdict:
    return Verdict(ok=False, reason=f"{code}: {detail}", scores=scores)
