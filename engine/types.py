"""What the data-engine stages hand each other. Arrays are in the image's own pixel frame."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), half-open pixels, of the True pixels of an HxW mask (not empty)."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass
class Entity:
    """A candidate entity found by scene understanding (stage 2).

    Attributes:
        entity_id: index within its image, stable for a given image and configuration.
        box: (x0, y0, x1, y1) in pixels, half-open, of the visible mask.
        mask: HxW bool, the visible pixels.
        label: category name ("object" when the backend has no names).
        score: confidence in [0, 1].
        source: detector(s) that found it, "+"-joined after merging.
        attributes: e.g. {"color": "red", "position": "left", "size": "small"}.
        occluded_by: entity_ids of entities in front of this one (they overlap its amodal extent).
        caption: a captioner's description of the entity's crop, as decoded (special tokens skipped, not yet
            sanitised: prompt generation does that); None when no captioner ran, "" when it produced nothing.
    """

    entity_id: int
    box: tuple[int, int, int, int]
    mask: np.ndarray
    label: str
    score: float
    source: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    occluded_by: list[int] = field(default_factory=list)
    caption: str | None = None


@dataclass
class Completion:
    """Stage 3 output for one entity.

    Attributes:
        rgba: HxWx4 uint8, the complete (amodal) layer, straight alpha, RGB = 0 where alpha = 0.
        amodal_mask: HxW bool, the entity's full extent (visible + completed).
        background: HxWx3 uint8, the scene with the entity removed and filled.
        scores: completion checks (e.g. "completed_fraction").
    """

    rgba: np.ndarray
    amodal_mask: np.ndarray
    background: np.ndarray
    scores: dict[str, float] = field(default_factory=dict)
