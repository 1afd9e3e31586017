"""A decomposer without weights: the data engine's classical backends answering one prompt at a time.

:class:`ClassicalDecomposer` implements :class:`reflade.engine.decompose.Decomposer`. It is the baseline that
evaluation reports beside every model, and what a user gets on a CPU without trained weights. Per image:

1. Segment the referred entity's visible mask from the spatial prompt:

   - a fine mask is the visible mask as given; a coarse mask (a quick brush stroke) seeds GrabCut
     (``cv2.grabCut``): inside it "probably the entity", outside it "background";
   - a box seeds GrabCut: inside "probably the entity", outside "background";
   - points alone: the scene backend's candidate entity holding every positive point and no negative one; when
     none does, GrabCut in a square around the positive points (a side of ``_POINT_WINDOW`` of the image's
     longest side);
   - positive points are "surely the entity" and negative points "surely not" in every GrabCut; the result
     keeps the connected parts that hold a positive point (or the largest part when there is none).

   Text is not read (there is no language model here): a text-only prompt is refused before any compute
   (:class:`~reflade.engine.decompose.PromptError`), and the text of a mixed prompt is ignored.
2. Scene context: the scene backend's other entities (:class:`~reflade.engine.backends.classical_scene.
   ClassicalSceneBackend`), minus those the referred entity mostly covers, with occlusion order recomputed
   with the referred entity among them (the backend's T-junction and convex-hull cues).
3. Amodal completion (:class:`~reflade.engine.backends.classical_completion.ClassicalCompletionBackend`): the
   entity's full extent and colours, and the scene with it removed and filled.
4. Foreground: matting along the visible boundary
   (:class:`~reflade.engine.backends.classical_matting.ClassicalMattingBackend`). Background: the filled scene,
   alpha 255 everywhere.

Images whose longest side exceeds ``max_side`` are worked on at that size (:func:`reflade.engine.decompose.
resize_image`); a foreground comes back resized (premultiplied), a background keeps the image's own pixels
outside the removed region and takes the resized fill inside it.

Deterministic: GrabCut's k-means initialisation draws from OpenCV's random generator, which is seeded with each
item's seed right before; everything else is deterministic. ``steps`` and ``guidance`` are checked and ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from reflade.engine.backends.classical_completion import ClassicalCompletionBackend
from reflade.engine.backends.classical_matting import ClassicalMattingBackend
from reflade.engine.backends.classical_scene import ClassicalSceneBackend, order_entities
from reflade.engine.config import EngineConfig
from reflade.engine.decompose import (
    DecomposeItem,
    PromptError,
    prepare,
    prompt_mask_array,
    resize_image,
    resize_layer,
    scale_prompt,
)
from reflade.engine.types import Entity, mask_box

__all__ = ["ClassicalDecomposer"]

_GRABCUT_ITERS = 5
"""GrabCut iterations (colour model re-estimations)."""
_POINT_WINDOW = 0.35
"""Side of the GrabCut window around positive points, as a fraction of the image's longest side."""
_POINT_RADIUS = 1 / 64
"""Radius of the disc a point marks as sure, as a fraction of the image's longest side (at least 1 px)."""
_COVERED = 0.5
"""A detected entity with more than this fraction of its pixels inside the referred one is that entity (or a
part of it) and leaves the scene context."""
_POINT_SLACK_PX = 2
"""A candidate holds a point when the point lies within this many pixels of its mask."""
_PART_SHARE = 0.2
"""A GrabCut part smaller than this fraction of the largest part is a speck, unless it holds a positive point."""


class ClassicalDecomposer:
    """Referring layer decomposition with the engine's classical backends (no weights, CPU).

    Args:
        cfg: engine configuration of the backends (default :class:`~reflade.engine.config.EngineConfig`).
        max_side: longest side, pixels, an image is worked on at (larger images are shrunk and their layers
            resized back).
    """

    name = "classical"

    def __init__(self, cfg: EngineConfig | None = None, *, max_side: int = 1024):
        if int(max_side) < 32:
            raise ValueError(f"max_side must be at least 32 pixels, got {max_side}")
        self.cfg = cfg or EngineConfig()
        self.max_side = int(max_side)
        self.scene = ClassicalSceneBackend(self.cfg)
        self.completion = ClassicalCompletionBackend(self.cfg)
        self.matting = ClassicalMattingBackend(self.cfg)

    def decompose(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[dict[str, Any]],
        kinds: Sequence[str],
        *,
        steps: int = 20,
        guidance: float = 1.0,
        seeds: int | Sequence[int] = 0,
    ) -> list[np.ndarray]:
        """Decompose the layer each prompt refers to (:meth:`reflade.engine.decompose.Decomposer.decompose`).

        Args:
            images: B arrays HxWx3 uint8 RGB, each at its own size.
            prompts: B prompts in the sample format with at least one point, box or mask (text is ignored).
            kinds: B of ``"foreground"`` / ``"background"``.
            steps, guidance: checked, then ignored (nothing is sampled).
            seeds: one seed for every image or one per image (GrabCut's initialisation).

        Returns:
            B arrays HxWx4 uint8 RGBA at each image's size, straight alpha, RGB = 0 where alpha = 0; a
            background has alpha 255 everywhere.

        Raises:
            PromptError: a prompt does not fit its image, or has no point, box or mask (before any compute).
            ValueError: bad images, kinds, seeds, steps or guidance (before any compute).
        """
        items = prepare(
            images, prompts, kinds, steps=steps, guidance=guidance, seeds=seeds, refuse_text_only=True
        )
        for i, item in enumerate(items):
            p = item.prompt
            if p["box"] is None and p["mask"] is None and not any(label == 1 for *_, label in p["points"]):
                raise PromptError(
                    f"prompts[{i}] has only negative points: nothing is referred (add a positive point, a box "
                    "or a mask)"
                )
        return [self._one(item) for item in items]

    # ------------------------------------------------------------------ one image
    def _one(self, item: DecomposeItem) -> np.ndarray:
        h, w = item.height, item.width
        scale = min(1.0, self.max_side / max(h, w))
        wh, ww = max(1, round(h * scale)), max(1, round(w * scale))
        image = resize_image(item.image, wh, ww)
        prompt = scale_prompt(item.prompt, (h, w), (wh, ww))

        cv2.setRNGSeed(int(item.seed) % (2**31))
        entities, k = self.referred_entity(image, prompt)
        completion = self.completion.complete(image, entities)[k]
        if item.kind == "foreground":
            rgba = self.matting.refine(image, completion, entities[k].mask)
            return resize_layer(rgba, h, w)
        background = completion.background
        if (wh, ww) != (h, w):
            # the image's own pixels outside the removed region; the resized fill inside it
            changed = (background != image).any(axis=2).astype(np.uint8)
            changed = cv2.dilate(changed, np.ones((3, 3), np.uint8))
            inside = resize_image(changed.astype(np.float32), h, w) > 0
            background = np.where(inside[..., None], resize_image(background, h, w), item.image)
        return np.dstack([background, np.full((h, w), 255, np.uint8)])

    def referred_entity(self, image: np.ndarray, prompt: dict[str, Any]) -> tuple[list[Entity], int]:
        """The scene's entities with the referred one among them, and its index.

        Args:
            image: HxWx3 uint8 RGB.
            prompt: a normalized prompt (:func:`reflade.engine.decompose.validate_prompt_for_image`) with at
                least one point, box or mask, in ``image``'s frame.

        Returns:
            (entities, k): entities with disjoint visible masks and ``occluded_by`` set, ``entities[k]`` the
            referred one.
        """
        h, w = image.shape[:2]
        detected = self.scene.detect(image)
        points = prompt.get("points") or []
        pos = [(x, y) for x, y, label in points if label == 1]
        neg = [(x, y) for x, y, label in points if label == 0]
        mask = prompt_mask_array(prompt.get("mask"))
        box = prompt.get("box")

        if mask is None and box is None:
            k = _candidate_for_points(detected, pos, neg)
            if k is not None:
                return detected, k
        if mask is not None and prompt.get("granularity") != "coarse":
            target = mask.copy()  # the visible mask itself, in as many parts as occluders cut it into
        else:
            target = _keep_referred_parts(_grabcut(image, mask, box, pos, neg), pos)
        if not target.any():
            # nothing segmented (a degenerate prompt): the prompt's own region stands in
            target = _prompt_region(h, w, mask, box, pos)

        others = []
        for e in detected:
            area = max(1, int(np.count_nonzero(e.mask)))
            if np.count_nonzero(e.mask & target) > _COVERED * area:
                continue
            rest = e.mask & ~target
            if rest.any():
                others.append((e, rest))
        entities = [
            Entity(
                entity_id=i,
                box=mask_box(m),
                mask=m,
                label=e.label,
                score=e.score,
                source=e.source,
                attributes=dict(e.attributes),
            )
            for i, (e, m) in enumerate(others)
        ]
        k = len(entities)
        entities.append(Entity(entity_id=k, box=mask_box(target), mask=target, label="object", score=1.0))
        order_entities(entities, [e.mask for e in entities])
        return entities, k


# ---------------------------------------------------------------------------------------------- segmentation
def _disc_radius(h: int, w: int) -> int:
    return max(1, round(max(h, w) * _POINT_RADIUS))


def _grabcut(
    image: np.ndarray,
    mask: np.ndarray | None,
    box: list[int] | None,
    pos: list[tuple[int, int]],
    neg: list[tuple[int, int]],
) -> np.ndarray:
    """HxW bool: GrabCut seeded by a region (a coarse mask, a box, or a window around the positive points)."""
    h, w = image.shape[:2]
    seeds = np.full((h, w), cv2.GC_BGD, np.uint8)
    if mask is not None:
        region = mask.copy()
        if box is not None:
            x0, y0, x1, y1 = box
            inside = np.zeros((h, w), bool)
            inside[y0:y1, x0:x1] = True
            region &= inside
    elif box is not None:
        x0, y0, x1, y1 = box
        region = np.zeros((h, w), bool)
        region[y0:y1, x0:x1] = True
    else:
        region = _point_window(h, w, pos)
    seeds[region] = cv2.GC_PR_FGD
    r = _disc_radius(h, w)
    for x, y in pos:
        cv2.circle(seeds, (int(x), int(y)), r, int(cv2.GC_FGD), -1)
    for x, y in neg:
        cv2.circle(seeds, (int(x), int(y)), r, int(cv2.GC_BGD), -1)
    has = {int(v) for v in np.unique(seeds)}
    fg_seeded = bool(has & {cv2.GC_FGD, cv2.GC_PR_FGD})
    bg_seeded = bool(has & {cv2.GC_BGD, cv2.GC_PR_BGD})
    if not (fg_seeded and bg_seeded):
        # GrabCut needs samples of both colour models: a region covering the whole image stays as it is
        return region
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(image, seeds, None, bgd, fgd, _GRABCUT_ITERS, cv2.GC_INIT_WITH_MASK)
    return (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)


def _point_window(h: int, w: int, pos: list[tuple[int, int]]) -> np.ndarray:
    """HxW bool: a square of side ``_POINT_WINDOW`` x the longest side around the positive points' box."""
    region = np.zeros((h, w), bool)
    if not pos:
        return region
    xs, ys = [p[0] for p in pos], [p[1] for p in pos]
    half = max(2, round(_POINT_WINDOW * max(h, w) / 2))
    x0, x1 = max(0, min(xs) - half), min(w, max(xs) + half + 1)
    y0, y1 = max(0, min(ys) - half), min(h, max(ys) + half + 1)
    region[y0:y1, x0:x1] = True
    return region


def _keep_referred_parts(target: np.ndarray, pos: list[tuple[int, int]]) -> np.ndarray:
    """The connected parts of ``target`` that hold a positive point or are at least ``_PART_SHARE`` of its
    largest part (an occluder may cut the entity in pieces; specks of look-alike colour go)."""
    n, labels = cv2.connectedComponents(target.astype(np.uint8), connectivity=8)
    if n <= 2:
        return target.astype(bool)
    counts = np.bincount(labels.ravel(), minlength=n)
    counts[0] = 0
    keep = {int(i) for i in np.nonzero(counts >= _PART_SHARE * counts.max())[0]}
    keep |= {int(labels[y, x]) for x, y in pos if labels[y, x] > 0}
    return np.isin(labels, sorted(keep))


def _candidate_for_points(
    entities: list[Entity], pos: list[tuple[int, int]], neg: list[tuple[int, int]]
) -> int | None:
    """Index of the smallest candidate holding every positive point and no negative point, or None."""
    if not pos:
        return None
    best, best_area = None, None
    kernel = np.ones((2 * _POINT_SLACK_PX + 1,) * 2, np.uint8)
    for i, e in enumerate(entities):
        grown = cv2.dilate(e.mask.astype(np.uint8), kernel).astype(bool)
        if not all(grown[y, x] for x, y in pos) or any(e.mask[y, x] for x, y in neg):
            continue
        area = int(np.count_nonzero(e.mask))
        if best_area is None or area < best_area:
            best, best_area = i, area
    return best


def _prompt_region(
    h: int, w: int, mask: np.ndarray | None, box: list[int] | None, pos: list[tuple[int, int]]
) -> np.ndarray:
    """HxW bool: the region a prompt names by itself (its mask, its box, or discs at its positive points)."""
    if mask is not None and mask.any():
        return mask.copy()
    region = np.zeros((h, w), bool)
    if box is not None:
        x0, y0, x1, y1 = box
        region[y0:y1, x0:x1] = True
        return region
    discs = np.zeros((h, w), np.uint8)
    for x, y in pos:
        cv2.circle(discs, (int(x), int(y)), _disc_radius(h, w), 1, -1)
    return discs.astype(bool)
