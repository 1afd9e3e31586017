"""Captions of entity crops for stage 2 of the ``neural`` family: a BLIP captioning model
(``BlipForConditionalGeneration``) loaded by reference (``captioner_weights``).

Every kept entity's box, grown by ``_CAPTION_MARGIN`` of its size on each side and clipped to the image
(:func:`caption_crop`), is cropped, resized to the captioner's square input and captioned, greedy, at most
``caption_max_new_tokens`` tokens; the crops of all entities of all images of a batch go through the model together
(``_CAPTION_BATCH`` at a time). The decoded text (special tokens skipped) is stored in ``Entity.caption``; prompt
generation sanitises it into the fine text prompts (:func:`reflade.engine.stages.prompts.sanitize_caption`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from reflade.engine.backends.neural_models import (
    DEFAULT_CAPTION_MAX_NEW_TOKENS,
    WeightsSource,
    autocast,
    captioner_ref,
    cfg_value,
    check_image,
    load_blip,
    resize,
    select_device,
)
from reflade.engine.config import EngineConfig
from reflade.engine.types import Entity

if TYPE_CHECKING:
    from reflade.platform.registry import Registry

__all__ = ["NeuralCaptioner", "caption_crop"]

_CAPTION_MARGIN = 0.15
"""A caption crop is the entity's box grown by this fraction of its width/height on each side (context)."""
_CAPTION_BATCH = 32
"""Crops per captioner batch."""
_CAPTION_MAX_CHARS = 300
"""Decoded captions are cut to this many characters (the schema's text limit) before they travel on."""


class NeuralCaptioner:
    """Captions of image crops with a BLIP captioning model (``BlipForConditionalGeneration``) loaded from the
    registry; greedy decoding, so a crop's caption is deterministic.

    Args:
        cfg: engine configuration (``captioner_weights``, ``caption_max_new_tokens``, ``num_gpus``).
        registry: where the weights live; None builds one from ``load_config()`` (the worker's environment),
            unless ``engine.weights_dir`` names a local folder of weights.
        cache_dir: local weights cache; None means :func:`.neural_models.default_cache_dir`.
        device: where the model runs; None means :func:`.neural_models.select_device`.
        source: where the weights come from, shared with the scene backend (then ``registry`` and
            ``cache_dir`` are not used).

    Attributes:
        weights: exact references of the weights loaded, [captioner].
        max_new_tokens: tokens generated at most per crop (``caption_max_new_tokens``, capped by the model's
            position embeddings).

    Raises:
        ValueError: ``captioner_weights`` is empty, or ``caption_max_new_tokens`` < 1.
    """

    name = "neural"

    def __init__(
        self,
        cfg: EngineConfig | None = None,
        *,
        registry: Registry | None = None,
        cache_dir: str | os.PathLike | None = None,
        device: torch.device | None = None,
        source: WeightsSource | None = None,
    ):
        self.cfg = cfg or EngineConfig()
        ref = captioner_ref(self.cfg)
        if not ref:
            raise ValueError("engine.captioner_weights is empty: there is no captioner to load")
        requested = int(cfg_value(self.cfg, "caption_max_new_tokens", DEFAULT_CAPTION_MAX_NEW_TOKENS))
        if requested < 1:
            raise ValueError(f"engine.caption_max_new_tokens must be at least 1, got {requested}")
        self.device = device if device is not None else select_device(self.cfg)
        source = source if source is not None else WeightsSource(self.cfg, registry, cache_dir)
        local = source.fetch(ref, "captioner")
        self.weights = [local.ref]
        self.blip = load_blip(local.path, self.device)
        # The decoder starts from one [DEC] token: what it generates must fit its position embeddings.
        room = int(self.blip.model.config.text_config.max_position_embeddings) - 1
        self.max_new_tokens = max(1, min(requested, room))

    def caption(self, crops: list[np.ndarray]) -> list[str]:
        """One caption per crop.

        Args:
            crops: HxWx3 uint8 RGB crops (sizes may differ; each is resized to the model's square input).

        Returns:
            The decoded captions, special tokens skipped, whitespace collapsed, at most ``max_new_tokens``
            words and ``_CAPTION_MAX_CHARS`` characters each (may be empty); not otherwise sanitised.

        Raises:
            ValueError: a crop that is not HxWx3 uint8.
        """
        for c in crops:
            check_image(c)
        out: list[str] = []
        with torch.inference_mode():
            for start in range(0, len(crops), _CAPTION_BATCH):
                chunk = crops[start : start + _CAPTION_BATCH]
                pixels = torch.from_numpy(np.stack([self._input(c) for c in chunk])).to(self.device)
                with autocast(self.device):
                    ids = self.blip.model.generate(
                        pixel_values=pixels,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        num_beams=1,
                    )
                texts = self.blip.tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)
                out += [" ".join(t.split())[:_CAPTION_MAX_CHARS] for t in texts]
        return out

    def caption_entities(self, images: list[np.ndarray], entities_list: list[list[Entity]]) -> None:
        """Caption every entity of every image together and set its ``caption`` (in place).

        Args:
            images: HxWx3 uint8 RGB images.
            entities_list: per image, its entities (``box`` in that image's pixels).
        """
        if len(images) != len(entities_list):
            raise ValueError(f"{len(images)} images but {len(entities_list)} entity lists")
        todo = [(image, ent) for image, ents in zip(images, entities_list, strict=True) for ent in ents]
        captions = self.caption([caption_crop(image, ent.box) for image, ent in todo])
        for (_, ent), text in zip(todo, captions, strict=True):
            ent.caption = text

    def _input(self, crop: np.ndarray) -> np.ndarray:
        # BLIP's image processor: resize to the square input (no aspect kept), scale to [0, 1], normalise.
        size = self.blip.image_size
        x = resize(crop, (size, size)).astype(np.float32) / 255.0
        return ((x - self.blip.mean) / self.blip.std).transpose(2, 0, 1)


def caption_crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """What the captioner sees of an entity: its box grown by ``_CAPTION_MARGIN`` (at least 2 px) per side,
    clipped to the image; the whole image when the box lies off it.

    Args:
        image: HxWx3 uint8 RGB.
        box: (x0, y0, x1, y1) pixels, half-open.

    Returns:
        The crop, hxwx3 uint8 (contiguous).
    """
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    mx, my = max(2.0, _CAPTION_MARGIN * (x1 - x0)), max(2.0, _CAPTION_MARGIN * (y1 - y0))
    cx0, cy0 = max(0, int(x0 - mx)), max(0, int(y0 - my))
    cx1, cy1 = min(w, int(np.ceil(x1 + mx))), min(h, int(np.ceil(y1 + my)))
    if cx1 <= cx0 or cy1 <= cy0:  # a box off the image: caption the whole image rather than nothing
        return image
    return np.ascontiguousarray(image[cy0:cy1, cx0:cx1])
