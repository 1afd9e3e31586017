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
from reflade.train.bundle import RefLayerBundle
from reflade.train.canvas import canvas_batch
from reflade.train.losses import autocast, encode_batch

__all__ = ["PromptError", "RefLayerPipeline"]


class RefLayerPipeline:
    """Referring layer decomposition with a :class:`~reflade.train.bundle.RefLayerBundle`; implements
    :class:`reflade.engine.decompose.Decomposer`.

    Args:
        bundle: the model and its frozen parts (put it on its device first).
        mixed_precision: bf16 autocast (default: on CUDA only, and only while the model's weights are float32:
            weights already cast to bf16 (``bundle.to(dtype=torch.bfloat16)``) run without autocast, which saves
            its per-op dispatch).
        record_stages: time each stage of :meth:`decompose_batch` into :attr:`last_stages`.
        max_batch: most images :meth:`decompose` sends through the model at once (bounds its memory).
    """

    def __init__(
        self,
        bundle: RefLayerBundle,
        mixed_precision: bool | None = None,
        record_stages: bool = False,
        max_batch: int = 8,
    ):
        if int(max_batch) < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.bundle = bundle
        self.mixed_precision = mixed_precision
        self.record_stages = record_stages
        self.max_batch = int(max_batch)
        self.last_stages: dict[str, float] = {}
        """With ``record_stages``: seconds of each stage of the last :meth:`decompose_batch` (``encode``,
        ``sample``, ``decode_rgb``, ``decode_alpha``, ``finish``), the device synchronised at each boundary (which
        costs a little: leave it off when serving)."""

    @classmethod
    def from_registry(
        cls,
        ref: str = "model/reflayer@candidate",
        registry=None,
        *,
        cache_dir: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> RefLayerPipeline:
        """A pipeline for a registered model (:func:`reflade.train.model.load_reflayer`).

        Args:
            ref: registry reference of a RefLayer model version (``model/reflayer@production``, ``...@3``).
            registry: the registry (default: the configured one).
            cache_dir, device, dtype: as :func:`~reflade.train.model.load_reflayer` takes them.
            kwargs: :class:`RefLayerPipeline` arguments (``mixed_precision``, ``max_batch``, ...).

        Raises:
            RegistryError: the reference does not resolve; ValueError: it is not a RefLayer model.
        """
        from reflade.train.model import load_reflayer

        bundle = load_reflayer(ref, registry=registry, cache_dir=cache_dir, device=device, dtype=dtype)
        return cls(bundle, **kwargs)

    @property
    def name(self) -> str:
        """``reflayer:<the model's registry version>`` (or its preset when it was not loaded from the registry)."""
        config = getattr(self.bundle, "config", None) or {}
        return f"reflayer:{config.get('ref') or config.get('preset') or 'unregistered'}"

    # ------------------------------------------------------------------ the platform's API
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
            prompts: B prompts in the sample format (points, box, mask as PNG bytes or an HxW array, text, or
                mixes), in their image's pixel frame.
            kinds: B of ``"foreground"`` / ``"background"`` (the model's kind input).
            steps: Euler steps.
            guidance: classifier-free guidance (1: the conditional branch only).
            seeds: one seed for every image or one per image; an image's output depends on its own inputs and
                seed only, not on the rest of the batch (up to float summation order in batched kernels).

        Returns:
            B arrays HxWx4 uint8 RGBA, each at its image's size, straight alpha, RGB = 0 where alpha = 0.

        Raises:
            PromptError: a prompt does not fit its image (before any compute).
            ValueError: bad images, kinds, seeds, steps or guidance, or a background asked of a model without a
                kind input (before any compute).
        """
        items = prepare(images, prompts, kinds, steps=steps, guidance=guidance, seeds=seeds)
        self._kind_tensor([it.kind for it in items])  # a model without kinds refuses a background here
        r = self.bundle.resolution
        out: list[np.ndarray] = []
        for start in range(0, len(items), self.max_batch):
            part = items[start : start + self.max_batch]
            small = [resize_image(it.image, r, r).astype(np.float32) / 127.5 - 1.0 for it in part]
            batch = torch.from_numpy(np.stack(small)).permute(0, 3, 1, 2).contiguous()
            canvases = canvas_batch(
                [it.prompt for it in part], [it.height for it in part], [it.width for it in part], size=(r, r)
            )
            premult = self.decompose_batch(
                batch,
                canvases,
                [it.prompt["text"] or "" for it in part],
                kinds=[it.kind for it in part],
                num_inference_steps=steps,
                guidance_scale=guidance,
                seed=[it.seed for it in part],
                straight=False,
            )
            for it, layer in zip(part, premult.permute(0, 2, 3, 1).float().cpu().numpy(), strict=True):
                out.append(premultiplied_to_layer(layer, it.height, it.width))
        return out

    # ------------------------------------------------------------------ for a person
    def __call__(
        self,
        image: np.ndarray,
        prompt: dict[str, Any],
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        seed: int = 0,
        kind: str = "foreground",
    ) -> np.ndarray:
        """Decompose the layer a prompt refers to: :meth:`decompose` for one image.

        Args:
            image: HxWx3 uint8 RGB.
            prompt: a prompt in the image's pixel frame (:mod:`reflade.train.canvas`): points, box, mask
                (PNG bytes or an HxW array) and/or text.
            num_inference_steps: Euler steps.
            guidance_scale: classifier-free guidance; 1 runs the conditional branch only.
            seed: seed of the initial noise.
            kind: ``foreground`` (the entity's layer) or ``background`` (the scene without it).

        Returns:
            HxWx4 uint8 RGBA in the input's size, straight alpha, RGB = 0 where alpha = 0.

        Raises:
            ValueError: the image is not HxWx3 uint8, bad step / guidance values, or a bad kind.
            PromptError: the prompt does not fit the image (before any compute).
        """
        self._check_sampling(num_inference_steps, guidance_scale)
        return self.decompose(
            [image],
            [prompt],
            [kind],
            steps=int(num_inference_steps),
            guidance=guidance_scale,
            seeds=seed,
        )[0]

    # ------------------------------------------------------------------ for Ray
    @torch.no_grad()
    def decompose_batch(
        self,
        images: torch.Tensor,
        canvases: torch.Tensor,
        texts: list[str],
        *,
        kinds: list[str] | None = None,
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
            kinds: B layer kinds (``foreground`` / ``background``); None: every row a foreground.
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
        if len(texts) != b or (kinds is not None and len(kinds) != b):
            raise ValueError(
                f"a batch of {b} images needs {b} texts and kinds, got {len(texts)} and "
                f"{'no' if kinds is None else len(kinds)} kinds"
            )
        kind = self._kind_tensor(list(kinds) if kinds is not None else [KINDS[0]] * b)
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
            # the kind is not a condition that guidance drops: both branches ask for the same kind
            kind = None if kind is None else torch.cat([kind, kind])

        scheduler = copy.deepcopy(bundle.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        x = noise
        for t in scheduler.timesteps:
            x_in = torch.cat([x, x]) if guided else x
            with autocast(device, mp):
                v = bundle.model(
                    x_in, image_lat, canvas_lat, t.expand(x_in.shape[0]), hidden, pooled, kind
                ).float()
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
                alpha > ALPHA_EPS, colour / alpha.clamp_min(ALPHA_EPS), torch.zeros_like(colour)
            )
        out = torch.cat([colour.clamp(0.0, 1.0), alpha], dim=1)
        clock.lap("finish")
        if self.record_stages:
            self.last_stages = clock.stages
        return out

    # ------------------------------------------------------------------ helpers
    def _kind_tensor(self, kinds: list[str]) -> torch.Tensor | None:
        """(B,) kind indices for the model; None for a model without a kind input asked for foregrounds only.

        Raises:
            ValueError: a kind is not a layer kind, or a background asked of a model without a kind input.
        """
        kinds = [check_kind(k, f"kinds[{i}]") for i, k in enumerate(kinds)]
        model = self.bundle.model
        if model.layer_kinds is None:
            if any(k != KINDS[0] for k in kinds):
                model.kind_index(kinds)  # raises: this model has no kind input (and says so)
            return None
        return model.kind_index(kinds)

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
