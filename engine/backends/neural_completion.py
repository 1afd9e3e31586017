"""Stage 3 of the ``neural`` family: layer completion with RePaint (:cite:`lugmayr2022repaint`), an
unconditional pixel-space diffusion UNet, and the hole primitives every neural completion backend shares
(:mod:`.sd3_inpaint` inherits them).

Holes, per entity:

- background: the entity's mask dilated by ``completion_dilate_px`` is the hole; everything else is known.
- amodal layer: the occluded part is ``hull(visible) & (union of the occluders' masks) & ~visible``; it is the
  hole, and the occluders' pixels are unknown too (what lies behind them is the entity or the background, not
  the occluder). Entities without ``occluded_by`` have no hole: their layer is their visible pixels.

Each hole is sampled in a square crop around it (``_CONTEXT`` times the hole's size, at least ``_MIN_CROP_PX``),
resized to its sampling side (:func:`sampling_side`): the crop's side rounded up to a bucket step, at least a
minimum side, at most the model's largest side (step and minimum are ``_BUCKET_FRACTION`` and
``_MIN_SIDE_FRACTION`` of it, rounded up to what the model needs sides to be multiples of). A small crop is thus
sampled near its own scale instead of being upsampled to the model's size (more pixels to denoise, no more
detail); a larger crop is downsampled to it. The result is resized back and pasted ONLY inside the hole
(:func:`paste`), so every other pixel equals the image exactly. Each hole draws its noise from its own generator,
seeded from the image's sha256, the entity id, the hole kind and ``completion_seed``: results do not depend on
how holes are batched.

The steps are public, for a scheduler that batches holes across calls: :meth:`NeuralCompletionBackend.holes`
(an image's holes, crops and sampling sides set), :meth:`~NeuralCompletionBackend.sample` (a batch of holes of
one side through the model), :meth:`~NeuralCompletionBackend.assemble` (an image's completions from its sampled
holes). :meth:`~NeuralCompletionBackend.complete_batch` is the three in a row, holes of every image of the call
sharing sampler batches by side.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from reflade.engine.backends.neural_models import (
    DEFAULT_COMPLETION_DILATE_PX,
    DEFAULT_COMPLETION_SEED,
    DEFAULT_COMPLETION_STEPS,
    WeightsSource,
    autocast,
    cfg_value,
    check_image,
    load_repaint,
    resize,
    round_up,
    select_device,
    weights_refs,
)
from reflade.engine.config import EngineConfig
from reflade.engine.types import Completion, Entity, mask_box

if TYPE_CHECKING:
    from reflade.platform.registry import Registry

__all__ = [
    "BUCKET_FRACTION",
    "MIN_SIDE_FRACTION",
    "SAMPLER_BATCH",
    "Hole",
    "NeuralCompletionBackend",
    "paste",
    "sampling_side",
    "unet_side_multiple",
]

_CONTEXT = 2.0
"""A completion crop is this many times the hole's larger side."""
_MIN_CROP_PX = 32
BUCKET_FRACTION = 0.25
"""Sampling sides are multiples of this fraction of the model's largest side (rounded up to its side multiple)."""
MIN_SIDE_FRACTION = 0.5
"""Crops are sampled at least at this fraction of the model's largest side (rounded up to the bucket step)."""
SAMPLER_BATCH = 32
"""Holes per sampler batch (:meth:`NeuralCompletionBackend.sample` call) at most."""
_JUMP_LENGTH = 10
_JUMP_N_SAMPLE = 1
"""RePaint resampling (jump length, samples per jump); 1 sample means no resampling, the cheapest schedule."""


def _hull(mask: np.ndarray) -> np.ndarray:
    pts = cv2.findNonZero(mask.astype(np.uint8))
    out = np.zeros(mask.shape, np.uint8)
    if pts is not None:
        cv2.fillConvexPoly(out, cv2.convexHull(pts), 1)
    return out.astype(bool)


def unet_side_multiple(block_out_channels: list[int] | tuple[int, ...], vae_factor: int = 1) -> int:
    """Pixels an input side of a diffusers UNet must be a multiple of.

    Every down block but the last halves the resolution (``UNet2DModel``, ``UNet2DConditionModel``, and the
    ``AutoencoderKL`` encoder alike), so a side must be a multiple of ``2 ** (len(block_out_channels) - 1)``
    latent pixels, times the VAE's factor in image pixels (1 for a pixel-space UNet).

    Args:
        block_out_channels: the model config's ``block_out_channels`` (one entry per level).
        vae_factor: image pixels per latent pixel (8 for the SD VAEs, 1 without a VAE).

    Raises:
        ValueError: no levels, or a factor below 1.
    """
    if len(block_out_channels) < 1 or vae_factor < 1:
        raise ValueError(
            f"need at least one level and a VAE factor >= 1, got {block_out_channels}, {vae_factor}"
        )
    return 2 ** (len(block_out_channels) - 1) * int(vae_factor)


def sampling_side(crop_px: int, *, max_side: int, step: int, min_side: int, multiple: int = 1) -> int:
    """Side (pixels) at which a completion crop is sampled: its own scale, rounded up to a bucket.

    ``crop_px`` rounded UP to a multiple of ``step``, at least ``min_side`` (itself rounded up to ``step``), at most
    ``max_side``. A crop is therefore never upsampled to the model's maximum: it is enlarged by less than one
    ``step`` (or to ``min_side``); a crop larger than ``max_side`` is downsampled to it. Few distinct sides
    (buckets) let crops of one side be batched together.

    Args:
        crop_px: the crop's larger side, pixels (>= 1).
        max_side: the model's largest (native) side, pixels; a multiple of ``multiple``.
        step: bucket step, pixels; a multiple of ``multiple``.
        min_side: smallest sampling side, pixels.
        multiple: what the model needs every side to be a multiple of (SD3: VAE factor 8 x patch 2 = 16; a
            pixel-space UNet: :func:`unet_side_multiple`).

    Returns:
        The sampling side: a multiple of ``multiple``, at most ``max_side``, and ``>= crop_px`` when
        ``crop_px <= max_side``.

    Raises:
        ValueError: a non-positive argument, or ``step`` / ``max_side`` not a multiple of ``multiple``.
    """
    if min(crop_px, max_side, step, multiple) < 1 or min_side < 0:
        raise ValueError(
            f"sampling_side needs positive sizes, got crop {crop_px}, max {max_side}, step {step}, "
            f"min {min_side}, multiple {multiple}"
        )
    if step % multiple or max_side % multiple:
        raise ValueError(
            f"the bucket step ({step} px) and the maximum side ({max_side} px) must be multiples of {multiple} px"
        )
    return min(max_side, round_up(max(crop_px, min_side), step))


@dataclass
class Hole:
    """One region to fill: an entity's background hole or its amodal (occluded) part, with where and at which
    side it is sampled. Made by :meth:`NeuralCompletionBackend.holes`; ``result`` is set by
    :meth:`~NeuralCompletionBackend.sample`."""

    image: int
    """The caller's index of the image (``complete_batch``: its position in the call)."""
    entity: int
    """Index of the entity in its image's list."""
    kind: str
    """``background`` or ``amodal``."""
    hole: np.ndarray
    """HxW bool: pixels pasted from the sample."""
    unknown: np.ndarray
    """HxW bool, ``hole`` included: pixels the sampler must not take as known."""
    seed: int
    """Seed of the hole's own noise generator."""
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)
    """Square (x0, y0, x1, y1) pixels around the hole (clipped to the image), holding the whole hole."""
    side: int = 0
    """Side (pixels) the crop is sampled at (:meth:`NeuralCompletionBackend.sampling_side`)."""
    result: np.ndarray | None = None
    """The sampled crop, resized back to the crop's size, uint8 RGB."""


class NeuralCompletionBackend:
    """Stage 3 with an unconditional diffusion UNet and RePaint sampling; see the module docstring.

    Args:
        cfg: engine configuration (``completion_weights``, ``completion_steps``, ``completion_dilate_px``,
            ``completion_seed``, ``num_gpus``).
        registry: where the weights live; None builds one from ``load_config()`` (the worker's environment),
            unless ``engine.weights_dir`` names a local folder of weights (:class:`.neural_models.WeightsSource`).
        cache_dir: local weights cache; None means :func:`.neural_models.default_cache_dir`.

    Attributes:
        weights: exact references of the weights loaded, [completion].
        size: the UNet's ``sample_size``, the largest sampling side (pixels).
        side_multiple: what every sampling side is a multiple of (:func:`unet_side_multiple`), pixels.
        bucket_step, min_side: sampling sides are multiples of ``bucket_step`` and at least ``min_side``, pixels.
        sampler_batch: holes per :meth:`sample` call at most (:data:`SAMPLER_BATCH`).
    """

    name = "neural"
    sampler_batch = SAMPLER_BATCH

    def __init__(
        self,
        cfg: EngineConfig | None = None,
        *,
        registry: Registry | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.cfg = cfg or EngineConfig()
        self.device = select_device(self.cfg)
        local = WeightsSource(self.cfg, registry, cache_dir).fetch(weights_refs(self.cfg)[2], "completion")
        self.weights = [local.ref]
        self.unet, self.scheduler = load_repaint(local.path, self.device)
        self._set_sides(
            int(self.unet.config.sample_size), unet_side_multiple(self.unet.config.block_out_channels)
        )

    def _set_sides(self, size: int, side_multiple: int) -> None:
        """The sampling sides' bounds and the hole settings of the configuration."""
        self.size = size
        self.side_multiple = side_multiple
        self.bucket_step = round_up(self.size * BUCKET_FRACTION, self.side_multiple)
        self.min_side = round_up(self.size * MIN_SIDE_FRACTION, self.bucket_step)
        self.sampling_side(self.size)  # a size the model cannot run at fails here, not mid-batch
        self.steps = int(cfg_value(self.cfg, "completion_steps", DEFAULT_COMPLETION_STEPS))
        self.dilate_px = int(cfg_value(self.cfg, "completion_dilate_px", DEFAULT_COMPLETION_DILATE_PX))
        self.seed = int(cfg_value(self.cfg, "completion_seed", DEFAULT_COMPLETION_SEED))

    def complete(self, image: np.ndarray, entities: list[Entity]) -> list[Completion]:
        """Amodal layer and background of each entity of one image.

        Args:
            image: HxWx3 uint8 RGB.
            entities: stage-2 entities of the image (masks HxW bool).

        Returns:
            One :class:`Completion` per entity, in order: ``rgba`` HxWx4 uint8 (alpha 255 on the amodal mask,
            RGB = 0 where alpha = 0, the image's pixels on the visible mask), ``amodal_mask`` HxW bool,
            ``background`` HxWx3 uint8 (equal to the image outside the dilated entity mask), ``scores``
            ``completed_fraction`` (completed / amodal pixels) and ``background_fill_fraction`` (filled /
            image pixels).

        Raises:
            ValueError: the image is not HxWx3 uint8, or a mask does not match it.
        """
        return self.complete_batch([image], [entities])[0]

    def complete_batch(
        self, images: list[np.ndarray], entities_list: list[list[Entity]]
    ) -> list[list[Completion]]:
        """:meth:`complete` for several images, every hole of every image through the sampler together: holes
        of one sampling side share :meth:`sample` calls (at most ``sampler_batch`` holes each)."""
        if len(images) != len(entities_list):
            raise ValueError(f"{len(images)} images but {len(entities_list)} entity lists")
        holes: list[Hole] = []
        for i, (image, entities) in enumerate(zip(images, entities_list, strict=True)):
            holes += self.holes(i, image, entities)
        by_side: dict[int, list[Hole]] = {}
        for h in holes:
            by_side.setdefault(h.side, []).append(h)
        with torch.inference_mode():
            for side, group in sorted(by_side.items()):
                for start in range(0, len(group), self.sampler_batch):
                    batch = group[start : start + self.sampler_batch]
                    self.sample([images[h.image] for h in batch], batch, side)
        return [
            self.assemble(image, entities, [h for h in holes if h.image == i])
            for i, (image, entities) in enumerate(zip(images, entities_list, strict=True))
        ]

    # ------------------------------------------------------------ the steps
    def holes(self, image_index: int, image: np.ndarray, entities: list[Entity]) -> list[Hole]:
        """The holes of one image: per entity with a non-empty mask its background hole, and its amodal hole
        when better-scored entities hide part of it (see the module docstring).

        Args:
            image_index: stored in each hole's ``image`` (the caller's key of the image).
            image: HxWx3 uint8 RGB.
            entities: the image's stage-2 entities (masks HxW bool).

        Returns:
            Holes in entity order (background before amodal), ``crop``, ``side`` and ``seed`` set, ``result``
            None. An image without entities, or with empty masks only, has none.

        Raises:
            ValueError: the image is not HxWx3 uint8, or a mask does not match it.
        """
        check_image(image)
        h, w = image.shape[:2]
        digest = hashlib.sha256(image.tobytes()).digest() + np.asarray(image.shape, np.int64).tobytes()
        masks = {}
        for ent in entities:
            m = np.asarray(ent.mask).astype(bool)
            if m.shape != (h, w):
                raise ValueError(f"entity {ent.entity_id}: mask {m.shape} does not match the image {(h, w)}")
            masks[ent.entity_id] = m

        def seed(ent: Entity, kind: str) -> int:
            key = hashlib.sha256(digest + f"|{ent.entity_id}|{kind}|{self.seed}".encode()).digest()
            return int.from_bytes(key[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF

        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * self.dilate_px + 1,) * 2)
        out = []
        for k, ent in enumerate(entities):
            visible = masks[ent.entity_id]
            if not visible.any():
                continue
            bg = cv2.dilate(visible.astype(np.uint8), kernel).astype(bool) if self.dilate_px > 0 else visible
            out.append(Hole(image_index, k, "background", bg, bg, seed(ent, "background")))
            front = np.zeros((h, w), bool)
            for j in ent.occluded_by:
                if j in masks and j != ent.entity_id:
                    front |= masks[j]
            hidden = _hull(visible) & front & ~visible
            if hidden.any():
                out.append(Hole(image_index, k, "amodal", hidden, hidden | front, seed(ent, "amodal")))
        for hole in out:
            hole.crop = _crop(hole.hole, (h, w))
            x0, y0, x1, y1 = hole.crop
            hole.side = self.sampling_side(max(x1 - x0, y1 - y0))
        return out

    def sampling_side(self, crop_px: int) -> int:
        """Side (pixels) at which a crop of ``crop_px`` is sampled by this model (:func:`sampling_side`)."""
        return sampling_side(
            crop_px,
            max_side=self.size,
            step=self.bucket_step,
            min_side=self.min_side,
            multiple=self.side_multiple,
        )

    def sample(self, images: list[np.ndarray], holes: list[Hole], side: int) -> None:
        """RePaint over a batch of holes at ``side`` x ``side`` pixels; sets each hole's ``result``.

        Args:
            images: per hole, the HxWx3 uint8 image it belongs to (``images[k]`` for ``holes[k]``).
            holes: holes from :meth:`holes`, all of sampling side ``side``; at most ``sampler_batch`` of them
                keeps memory bounded.
            side: the holes' sampling side, pixels.
        """
        from diffusers.utils.torch_utils import randn_tensor

        s = side
        known, keep = [], []
        for image, hole in zip(images, holes, strict=True):
            x0, y0, x1, y1 = hole.crop
            patch = resize(image[y0:y1, x0:x1], (s, s)).astype(np.float32) / 127.5 - 1.0
            # any trace of the hole in a small pixel makes it unknown: the sampler must not copy hole pixels
            unknown = resize(hole.unknown[y0:y1, x0:x1].astype(np.float32), (s, s)) > 0
            known.append(patch.transpose(2, 0, 1))
            keep.append((~unknown).astype(np.float32)[None])
        original = torch.from_numpy(np.stack(known)).to(self.device)
        mask = torch.from_numpy(np.stack(keep)).to(self.device)
        generators = [torch.Generator("cpu").manual_seed(h.seed) for h in holes]
        sched = self.scheduler
        # Timesteps stay on the CPU: the scheduler indexes its CPU tables with them; the UNet moves them itself.
        sched.set_timesteps(self.steps, jump_length=_JUMP_LENGTH, jump_n_sample=_JUMP_N_SAMPLE)
        sched.eta = 0.0
        with torch.inference_mode():
            x = randn_tensor(
                tuple(original.shape), generator=generators, device=self.device, dtype=torch.float32
            )
            t_last = sched.timesteps[0] + 1
            for t in sched.timesteps:
                if t < t_last:
                    with autocast(self.device):
                        eps = self.unet(x, t).sample
                    x = sched.step(eps.float(), t, x, original, mask, generators).prev_sample
                else:
                    x = sched.undo_step(x, t_last, generators)
                t_last = t
            result = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for hole, sample in zip(holes, result, strict=True):
            x0, y0, x1, y1 = hole.crop
            hole.result = resize(sample, (x1 - x0, y1 - y0))

    def assemble(self, image: np.ndarray, entities: list[Entity], holes: list[Hole]) -> list[Completion]:
        """One image's completions from its sampled holes (the return value of :meth:`complete`).

        Args:
            image: HxWx3 uint8 RGB.
            entities: the image's entities, as given to :meth:`holes`.
            holes: that image's holes (from :meth:`holes`), each with its ``result`` set.

        Raises:
            ValueError: a hole has not been sampled.
        """
        by_key = {(h.entity, h.kind): h for h in holes}
        if any(h.result is None for h in holes):
            raise ValueError("every hole must be sampled before its image is assembled")
        comps = []
        for k, ent in enumerate(entities):
            visible = np.asarray(ent.mask).astype(bool)
            background = image.copy()
            amodal = visible.copy()
            bg_hole = by_key.get((k, "background"))
            if bg_hole is not None:
                paste(background, bg_hole)
            rgb = np.where(visible[..., None], image, 0).astype(np.uint8)
            am_hole = by_key.get((k, "amodal"))
            if am_hole is not None:
                paste(rgb, am_hole)
                amodal |= am_hole.hole
            alpha = np.where(amodal, 255, 0).astype(np.uint8)
            completed = int(np.count_nonzero(amodal & ~visible))
            filled = int(bg_hole.hole.sum()) if bg_hole is not None else 0
            comps.append(
                Completion(
                    rgba=np.dstack([rgb, alpha]),
                    amodal_mask=amodal,
                    background=background,
                    scores={
                        "completed_fraction": round(completed / max(1, int(amodal.sum())), 6),
                        "background_fill_fraction": round(filled / visible.size, 6),
                    },
                )
            )
        return comps


def _crop(hole: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The square crop (x0, y0, x1, y1) sampled for an HxW bool ``hole``: ``_CONTEXT`` times its larger side, at
    least ``_MIN_CROP_PX``, centred on it and shifted (never shrunk below the hole) to stay in the image."""
    h, w = shape
    x0, y0, x1, y1 = mask_box(hole)
    side = max(_MIN_CROP_PX, int(np.ceil(_CONTEXT * max(x1 - x0, y1 - y0))))
    cw, ch = min(side, w), min(side, h)
    cx0 = int(np.clip((x0 + x1) / 2 - cw / 2, 0, w - cw))
    cy0 = int(np.clip((y0 + y1) / 2 - ch / 2, 0, h - ch))
    return cx0, cy0, cx0 + cw, cy0 + ch


def paste(target: np.ndarray, hole: Hole) -> None:
    """Copy a sampled hole's pixels into ``target`` (HxWx3 uint8, the hole's image frame) inside the hole only,
    in place; every other pixel stays as it was."""
    x0, y0, x1, y1 = hole.crop  # the crop always holds the whole hole (see _crop)
    inside = hole.hole[y0:y1, x0:x1]
    target[y0:y1, x0:x1][inside] = hole.result[inside]
