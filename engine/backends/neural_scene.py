"""Stage 2 of the ``neural`` family: an open-vocabulary detector (OWLv2) and SAM find the entities of an image,
and the captioner (:mod:`.neural_captioner`) describes each.

1. OWLv2 scores every patch box against the text queries ``"a photo of a <word>"`` for each word of
   ``EngineConfig.vocabulary``; a box's score is its best query's sigmoid score and its label that query's word.
   The text embeddings are computed once, when the backend loads.
2. Boxes are clipped to the image, NMS'ed (IoU ``_NMS_IOU``) and kept above ``detector_threshold``. When none
   passes and ``detector_fallback`` is on, the best boxes are kept anyway (random tiny weights score every box
   alike; a real detector seldom needs it, and the post-filter judges what comes out). At most
   ``2 * max_entities`` boxes go on to SAM.
3. SAM: one image embedding per image, every box of the image through the prompt encoder and mask decoder at
   once (single-mask output), masks upscaled to the image and binarised at logit 0, then clipped to the box
   enlarged by ``_BOX_MARGIN`` of its size on each side (SAM's leaks past the detector's box are background).
4. Occlusion order by score: candidates are taken best score first. A candidate whose mask has IoU above
   ``merge_iou`` with an entity already kept is a duplicate and dropped. Pixels claimed by a better-scored entity
   stay with it (visible masks are disjoint), and the candidate lists that entity in ``occluded_by`` when it
   lost at least ``_MIN_OVERLAP`` of its mask (and ``_MIN_OVERLAP_PX`` pixels) to it: a box-prompted mask that
   spills over another object means that object sits in front of it inside the box. Visible masks outside the
   configured area fractions are dropped; at most ``max_entities`` are kept, ``entity_id`` 0..n-1 by score.
5. Attributes (colour word from HSV, position, size) follow the classical backend's rules, so both families
   describe entities in the same words for prompt generation.
6. Captions (:class:`~.neural_captioner.NeuralCaptioner`, unless ``captioner_weights`` is empty), of every kept
   entity of every image of a batch together.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from reflade.engine.backends.neural_captioner import NeuralCaptioner
from reflade.engine.backends.neural_models import (
    DEFAULT_DETECTOR_FALLBACK,
    DEFAULT_DETECTOR_THRESHOLD,
    DEFAULT_VOCABULARY,
    WeightsSource,
    autocast,
    captioner_ref,
    cfg_value,
    check_image,
    load_owlv2,
    load_sam,
    resize,
    select_device,
    weights_refs,
)
from reflade.engine.config import EngineConfig
from reflade.engine.types import Entity, mask_box

if TYPE_CHECKING:
    from reflade.platform.registry import Registry

__all__ = ["SOURCE", "NeuralSceneBackend"]

SOURCE = "owlv2+sam"
_QUERY_TEMPLATE = "a photo of a {}"
"""OWL-ViT's prompt for a category word."""
_NMS_IOU = 0.5
"""Detector boxes overlapping a better one by more than this IoU are dropped."""
_BOX_MARGIN = 0.1
"""SAM masks are clipped to the detector box grown by this fraction of its width/height on each side."""
_MIN_OVERLAP = 0.02
"""Fraction of a candidate's mask taken by a better entity that makes that entity an occluder."""
_MIN_OVERLAP_PX = 6
_MIN_BOX_PX = 2
"""Boxes narrower or lower than this after clipping to the image are dropped (pixels)."""


def _vocabulary(cfg: EngineConfig) -> list[str]:
    words = [str(w).strip() for w in cfg_value(cfg, "vocabulary", DEFAULT_VOCABULARY) if str(w).strip()]
    if not words:
        raise ValueError(
            "engine.vocabulary is empty: the open-vocabulary detector needs at least one category"
        )
    return words


class NeuralSceneBackend:
    """Stage 2 with an open-vocabulary detector (OWLv2) and SAM; see the module docstring for the rules.

    Args:
        cfg: engine configuration (weights references, vocabulary, thresholds, ``num_gpus``).
        registry: where the weights live; None builds one from ``load_config()`` (the worker's environment),
            unless ``engine.weights_dir`` names a local folder of weights (:class:`.neural_models.WeightsSource`).
        cache_dir: local weights cache; None means :func:`.neural_models.default_cache_dir`.

    Attributes:
        weights: exact references of the weights loaded, [sam, detector, captioner] (no captioner when
            ``captioner_weights`` is empty).
        captioner: the :class:`NeuralCaptioner`, or None.
    """

    name = "neural"

    def __init__(
        self,
        cfg: EngineConfig | None = None,
        *,
        registry: Registry | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.cfg = cfg or EngineConfig()
        self.device = select_device(self.cfg)
        self.vocabulary = _vocabulary(self.cfg)
        source = WeightsSource(self.cfg, registry, cache_dir)
        sam_ref, det_ref = weights_refs(self.cfg)[:2]
        sam_w = source.fetch(sam_ref, "SAM")
        det_w = source.fetch(det_ref, "detector")
        self.weights = [sam_w.ref, det_w.ref]
        self.sam = load_sam(sam_w.path, self.device)
        self.owl = load_owlv2(det_w.path, self.device)
        self.captioner = None
        if captioner_ref(self.cfg):
            self.captioner = NeuralCaptioner(self.cfg, source=source, device=self.device)
            self.weights += self.captioner.weights
        self.threshold = float(cfg_value(self.cfg, "detector_threshold", DEFAULT_DETECTOR_THRESHOLD))
        self.fallback = bool(cfg_value(self.cfg, "detector_fallback", DEFAULT_DETECTOR_FALLBACK))
        self._query_embeds = self._embed_queries()

    def _embed_queries(self) -> torch.Tensor:
        owl = self.owl
        max_len = owl.model.config.text_config.max_position_embeddings
        tokens = owl.tokenizer(
            [_QUERY_TEMPLATE.format(w) for w in self.vocabulary],
            padding="max_length",
            max_length=max_len,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode(), autocast(self.device):
            out = owl.model.owlv2.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        embeds = out.pooler_output if hasattr(out, "pooler_output") else out
        return embeds.float()  # (Q, D)

    # ------------------------------------------------------------ public
    def detect(self, image: np.ndarray) -> list[Entity]:
        """Candidate entities of one image.

        Args:
            image: HxWx3 uint8 RGB.

        Returns:
            At most ``cfg.max_entities`` entities, ``entity_id`` 0..n-1 in descending score; masks HxW bool,
            disjoint, non-empty, within the configured area fractions; labels from the vocabulary; ``caption``
            set when a captioner is configured.

        Raises:
            ValueError: the image is not HxWx3 uint8.
        """
        return self.detect_batch([image])[0]

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Entity]]:
        """:meth:`detect` for several images: one detector pass and one SAM encoder pass for the batch, and
        the crops of every entity of the batch through the captioner together.

        Args:
            images: list of HxWx3 uint8 RGB images (sizes may differ).

        Returns:
            One list of entities per image, in order.
        """
        for im in images:
            check_image(im)
        if not images:
            return []
        with torch.inference_mode():
            boxes = self._detect_boxes(images)
            masks = self._segment(images, [b[0] for b in boxes])
        entities = [
            self._entities(im, m, s, lab) for im, (_, s, lab), m in zip(images, boxes, masks, strict=True)
        ]
        if self.captioner is not None:
            self.captioner.caption_entities(images, entities)
        return entities

    # ------------------------------------------------------------ detector
    def _owl_input(self, image: np.ndarray) -> np.ndarray:
        # OWLv2's processor: pad bottom/right to a square with grey, resize, normalise.
        h, w = image.shape[:2]
        side = max(h, w)
        square = np.full((side, side, 3), 128, np.uint8)
        square[:h, :w] = image
        size = self.owl.image_size
        x = resize(square, (size, size)).astype(np.float32) / 255.0
        return ((x - self.owl.mean) / self.owl.std).transpose(2, 0, 1)

    def _detect_boxes(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
        """Per image: (boxes Nx4 float xyxy pixels, scores N, labels N) after clipping, NMS and selection."""
        from torchvision.ops import nms

        model = self.owl.model
        pixels = torch.from_numpy(np.stack([self._owl_input(im) for im in images])).to(self.device)
        with autocast(self.device):
            feature_map, _ = model.image_embedder(pixel_values=pixels)
            b, ph, pw, d = feature_map.shape
            feats = feature_map.reshape(b, ph * pw, d)
            queries = self._query_embeds[None].expand(b, -1, -1).to(feats.dtype)
            logits, _ = model.class_predictor(feats, queries, None)
            pred = model.box_predictor(feats, feature_map)
        probs = torch.sigmoid(logits.float())  # (B, P, Q)
        best, label_idx = probs.max(dim=-1)
        out = []
        keep_n = 2 * self.cfg.max_entities
        for i, im in enumerate(images):
            h, w = im.shape[:2]
            side = float(max(h, w))
            cx, cy, bw, bh = pred[i].float().unbind(-1)
            xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * side
            xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
            xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
            ok = ((xyxy[:, 2] - xyxy[:, 0]) >= _MIN_BOX_PX) & ((xyxy[:, 3] - xyxy[:, 1]) >= _MIN_BOX_PX)
            idx = torch.nonzero(ok).flatten()
            idx = idx[nms(xyxy[idx], best[i, idx], _NMS_IOU)]  # sorted by descending score
            passed = idx[best[i, idx] >= self.threshold]
            if len(passed) == 0 and self.fallback:
                passed = idx
            passed = passed[:keep_n]
            out.append(
                (
                    xyxy[passed].cpu().numpy(),
                    best[i, passed].cpu().numpy(),
                    [self.vocabulary[k] for k in label_idx[i, passed].tolist()],
                )
            )
        return out

    # ------------------------------------------------------------ SAM
    def _sam_input(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        size = self.sam.image_encoder.img_size
        h, w = image.shape[:2]
        s = size / max(h, w)
        nh, nw = max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))
        x = resize(image, (nw, nh)).astype(np.float32)
        mean = self.sam.pixel_mean.view(-1).cpu().numpy()
        std = self.sam.pixel_std.view(-1).cpu().numpy()
        out = np.zeros((3, size, size), np.float32)  # zero padding after normalisation, as Sam.preprocess
        out[:, :nh, :nw] = ((x - mean) / std).transpose(2, 0, 1)
        return out, (nh, nw)

    def _segment(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """Per image: NxHxW bool masks of its boxes (one image embedding, all boxes at once)."""
        sam = self.sam
        todo = [i for i, b in enumerate(boxes) if len(b)]
        out = [np.zeros((0, *im.shape[:2]), bool) for im in images]
        if not todo:
            return out
        inputs = [self._sam_input(images[i]) for i in todo]
        pixels = torch.from_numpy(np.stack([x for x, _ in inputs])).to(self.device)
        with autocast(self.device):
            embeddings = sam.image_encoder(pixels)
        dense_pe = sam.prompt_encoder.get_dense_pe()
        for k, i in enumerate(todo):
            h, w = images[i].shape[:2]
            scale = sam.image_encoder.img_size / max(h, w)
            box = torch.as_tensor(boxes[i] * scale, dtype=torch.float32, device=self.device)
            with autocast(self.device):
                sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
                low_res, _ = sam.mask_decoder(
                    image_embeddings=embeddings[k : k + 1],
                    image_pe=dense_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
            logits = sam.postprocess_masks(low_res.float(), inputs[k][1], (h, w))
            masks = (logits[:, 0] > sam.mask_threshold).cpu().numpy()
            for j, (x0, y0, x1, y1) in enumerate(boxes[i]):
                mx, my = _BOX_MARGIN * (x1 - x0), _BOX_MARGIN * (y1 - y0)
                clip = np.zeros((h, w), bool)
                clip[
                    max(0, int(y0 - my)) : int(np.ceil(y1 + my)), max(0, int(x0 - mx)) : int(np.ceil(x1 + mx))
                ] = 1
                masks[j] &= clip
            out[i] = masks
        return out

    # ------------------------------------------------------------ entities
    def _entities(
        self, image: np.ndarray, masks: np.ndarray, scores: np.ndarray, labels: list[str]
    ) -> list[Entity]:
        from reflade.engine.backends.classical_scene import entity_attributes

        h, w = image.shape[:2]
        min_px = max(1.0, self.cfg.min_entity_area * h * w)
        max_px = self.cfg.max_entity_area * h * w
        taken = np.zeros((h, w), bool)
        kept: list[tuple[Entity, np.ndarray]] = []  # (entity, its full SAM mask)
        for mask, score, label in zip(masks, scores, labels, strict=True):
            if len(kept) >= self.cfg.max_entities:
                break
            area = int(mask.sum())
            if area == 0:
                continue
            if any(_iou(mask, full) > self.cfg.merge_iou for _, full in kept):
                continue
            visible = mask & ~taken
            n = int(visible.sum())
            if not min_px <= n <= max_px:
                continue
            lost_min = max(_MIN_OVERLAP_PX, _MIN_OVERLAP * area)
            occluders = [e.entity_id for e, _ in kept if np.count_nonzero(mask & e.mask) >= lost_min]
            ent = Entity(
                entity_id=len(kept),
                box=mask_box(visible),
                mask=visible,
                label=label,
                score=round(float(score), 4),
                source=SOURCE,
                attributes=entity_attributes(image, visible),
                occluded_by=occluders,
            )
            taken |= visible
            kept.append((ent, mask))
        return [e for e, _ in kept]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.count_nonzero(a & b)
    return inter / max(1, np.count_nonzero(a | b))
