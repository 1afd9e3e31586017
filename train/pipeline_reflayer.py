"""RefLayer decomposition: images, prompts and layer kinds in, one RGBA layer per image out.

Three levels, like segment-anything's predictor:

- :meth:`RefLayerPipeline.decompose`: the platform's one decomposition API (:class:`reflade.engine.decompose.
  Decomposer`), what eval, serve, the demo and the benchmarks call: a batch of NumPy images each at its own size,
  prompts in the sample format, kinds ``foreground`` / ``background``; everything checked before any compute.
  ``RefLayerPipeline.from_registry("model/reflayer@candidate")`` loads the model by registry reference.
- ``RefLayerPipeline(bundle)(image, prompt, kind=...)``: one image, for a person (the same path).
- :meth:`RefLayerPipeline.decompose_batch`: batched tensors at the model's resolution, for Ray.

Steps: the image and its prompt canvas are resized to the model's square resolution (area averaging down,
bilinear up, :func:`reflade.engine.decompose.resize_image`) and encoded by the frozen VAE; the text by the text
encoder; the layer kind selects the model's kind embedding. From seeded Gaussian noise the transformer integrates
the flow with the Euler sampler (``FlowMatchEulerDiscreteScheduler``, a fresh copy per call, so concurrent calls
never share its state). The final latent goes through both decoders: the VAE's decoder gives the layer over
mid-grey (premultiplied in [-1, 1]), the alpha decoder gives alpha; the straight colour is their ratio, taken
after resizing back to each image's size (:func:`reflade.engine.decompose.premultiplied_to_layer`). With
``guidance_scale`` > 1 the conditional and unconditional rows (empty text and empty canvas, same image, same
kind) run as one batch of two: ``v = v_u + g (v_c - v_u)``.

Determinism: the noise comes from a CPU ``torch.Generator`` seeded with ``seed``, so a seed gives the same output
on any device that computes the network deterministically (bit-identical on CPU).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from reflade.engine.decompose import (
    ALPHA_EPS,
    PromptError,
    check_kind,
    premultiplied_to_layer,
    prepare,
    resize_image,
)
from reflade.engine.schema import KINDS
from reflade.train.canvas import canvas_batch
from reflade.train.losses import autocast, encode_batch
from reflade.train.model import RefLayerBundle

__all__ = ["PromptError", "RefLayerPipeline"]

_ALPHA_EPS = ALPHA_EPS


class RefLayerPipeline:
    """Referring layer decomposition with a :class:`~reflade.train.model.RefLayerBundle`.

    Args:
        bundle: the model and its frozen parts (put it on its device first).
        mixed_precision: bf16 autocast (default: on CUDA only, and only while the model's weights are float32:
            weights already cast to bf16 (``bundle.to(dtype=torch.bfloat16)``) run without autocast, which saves
            its per-op dispatch).
        record_stages: time each stage of :meth:`decompose_batch` into :attr:`last_stages`.
    """

    def __init__(
        self, bundle: RefLayerBundle, mixed_precision: bool | None = None, record_stages: bool = False
    ):
        self.bundle = bundle
        self.mixed_precision = mixed_precision
        self.record_stages = record_stages
        self.last_stages: dict[str, float] = {}
        """With ``record_stages``: seconds of each stage of the last :meth:`decompose_batch` (``encode``,
        ``sample``, ``decode_rgb``, ``decode_alpha``, ``finish``), the device synchronised at each boundary (which
        costs a little: leave it off when serving)."""

    # ------------------------------------------------------------------ for a person
    def __call__(
        self,
        image: np.ndarray,
        prompt: dict[str, Any],
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        seed: int = 0,
    ) -> np.ndarray:
        """Decompose the layer a prompt refers to.

        Args:
            image: HxWx3 uint8 RGB.
            prompt: a prompt in the image's pixel frame (:mod:`reflade.train.canvas`): points, box, mask
                (PNG bytes or an HxW array) and/or text.
            num_inference_steps: Euler steps.
            guidance_scale: classifier-free guidance; 1 runs the conditional branch only.
            seed: seed of the initial noise.

        Returns:
            HxWx4 uint8 RGBA in the input's size, straight alpha, RGB = 0 where alpha = 0.

        Raises:
            ValueError: the image is not HxWx3 uint8, or bad step / guidance values.
            PromptError: the prompt does not fit the image (before any compute).
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
        h, w = image.shape[:2]
        p = validate_prompt_for_image(prompt, h, w)
        self._check_sampling(num_inference_steps, guidance_scale)
        r = self.bundle.resolution
        small = _resize(image, r, r).astype(np.float32) / 127.5 - 1.0
        images = torch.from_numpy(small).permute(2, 0, 1).unsqueeze(0)
        canvases = canvas_batch([p], h, w, size=(r, r))
        rgba = self.decompose_batch(
            images,
            canvases,
            [p["text"] or ""],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            straight=False,
        )[0]
        # Resize premultiplied colour and alpha (resampling straight colour would bleed the empty pixels' 0
        # into the edges), then divide at the output size.
        premult = rgba.permute(1, 2, 0).float().cpu().numpy()
        premult = _resize(premult, h, w)
        return _to_uint8(premult[..., :3], np.clip(premult[..., 3], 0.0, 1.0))

    # ------------------------------------------------------------------ for Ray
    @torch.no_grad()
    def decompose_batch(
        self,
        images: torch.Tensor,
        canvases: torch.Tensor,
        texts: list[str],
        *,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        seed: int | list[int] = 0,
        straight: bool = True,
    ) -> torch.Tensor:
        """Decompose a batch at the model's resolution.

        Args:
            images: (B, 3, R, R) in [-1, 1], R = ``bundle.resolution``.
            canvases: (B, 3, R, R) in [-1, 1] (:func:`reflade.train.canvas.canvas_batch` with ``size=(R, R)``).
            texts: B texts ("" for none).
            seed: one seed for the batch (row i draws after row i-1) or one per row.
            straight: straight alpha (colour divided by alpha, 0 where alpha is 0); False returns the colour
                premultiplied by alpha (for resampling before dividing).

        Returns:
            (B, 4, R, R) float32 RGBA in [0, 1] on the bundle's device.
        """
        self._check_sampling(num_inference_steps, guidance_scale)
        bundle = self.bundle
        r = bundle.resolution
        b = images.shape[0]
        if images.shape[1:] != (3, r, r) or canvases.shape[1:] != (3, r, r):
            raise ValueError(
                f"images and canvases must be (B, 3, {r}, {r}); got {tuple(images.shape)} and {tuple(canvases.shape)}"
            )
        device = bundle.device
        # (RefLayer has no dropout or batch statistics: train and eval mode compute the same, so the model's
        # mode is left as the caller set it, e.g. in the middle of a training run.)
        mp = self._autocast()
        clock = _StageClock(device, self.record_stages)
        cond = encode_batch(bundle, images, None, canvases, list(texts), mixed_precision=mp)
        noise = self._noise(b, seed, r // bundle.vae_scale_factor).to(device)
        clock.lap("encode")

        guided = guidance_scale > 1.0
        image_lat, canvas_lat = cond["image"], cond["canvas"]
        hidden, pooled = cond["text_hidden"], cond["text_pooled"]
        if guided:
            empty_hidden, empty_pooled = bundle.empty_text()
            empty_canvas = bundle.empty_canvas_latent(r, r)
            image_lat = torch.cat([image_lat, image_lat])
            canvas_lat = torch.cat([canvas_lat, empty_canvas.expand_as(canvas_lat)])
            hidden = torch.cat([hidden, empty_hidden.expand_as(hidden)])
            pooled = torch.cat([pooled, empty_pooled.expand_as(pooled)])

        scheduler = copy.deepcopy(bundle.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        x = noise
        for t in scheduler.timesteps:
            x_in = torch.cat([x, x]) if guided else x
            with autocast(device, mp):
                v = bundle.model(x_in, image_lat, canvas_lat, t.expand(x_in.shape[0]), hidden, pooled).float()
            if guided:
                v_c, v_u = v.chunk(2)
                v = v_u + guidance_scale * (v_c - v_u)
            x = scheduler.step(v, t, x, return_dict=False)[0]
        clock.lap("sample")

        with autocast(device, mp):
            premult = bundle.decode_rgb(x).float()
            clock.lap("decode_rgb")
            alpha = torch.sigmoid(bundle.decode_alpha_logits(x).float())
            clock.lap("decode_alpha")
        # premult = rgb' * alpha in [-1, 1] (the layer over mid-grey); colour in [0, 1] premultiplied:
        colour = ((premult + alpha) / 2.0).clamp(min=0.0)
        colour = torch.minimum(colour, alpha)
        if straight:
            colour = torch.where(
                alpha > _ALPHA_EPS, colour / alpha.clamp_min(_ALPHA_EPS), torch.zeros_like(colour)
            )
        out = torch.cat([colour.clamp(0.0, 1.0), alpha], dim=1)
        clock.lap("finish")
        if self.record_stages:
            self.last_stages = clock.stages
        return out

    # ------------------------------------------------------------------ helpers
    def _autocast(self) -> bool | None:
        """Autocast for this call: the caller's choice, off when the weights are already low precision."""
        if next(self.bundle.model.parameters()).dtype != torch.float32:
            return False
        return self.mixed_precision

    @staticmethod
    def _check_sampling(num_inference_steps: int, guidance_scale: float) -> None:
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")

    def _noise(self, batch: int, seed: int | list[int], side: int) -> torch.Tensor:
        c = self.bundle.latent_channels
        if isinstance(seed, (list, tuple)):
            if len(seed) != batch:
                raise ValueError(f"{len(seed)} seeds for a batch of {batch}")
            return torch.cat(
                [torch.randn(1, c, side, side, generator=torch.Generator().manual_seed(int(s))) for s in seed]
            )
        return torch.randn(batch, c, side, side, generator=torch.Generator().manual_seed(int(seed)))


class _StageClock:
    """Seconds between laps, the device synchronised at each (a no-op unless enabled)."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled
        self.device = torch.device(device)
        self.stages: dict[str, float] = {}
        self._t = self._now() if enabled else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.enabled:
            now = self._now()
            self.stages[name] = now - self._t
            self._t = now


def _to_uint8(premult: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Premultiplied colour HxWx3 and alpha HxW in [0, 1] -> HxWx4 uint8, straight, RGB = 0 where alpha = 0."""
    a8 = np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8)
    safe = np.maximum(alpha, _ALPHA_EPS)[..., None]
    rgb = np.clip(premult / safe, 0.0, 1.0)
    rgb8 = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    rgb8[a8 == 0] = 0
    return np.dstack([rgb8, a8])
