"""The training-step functions shared by the plain loop, the Ray Train loop and the GPU check.

A step is: :func:`encode_batch` (frozen VAE and text encoder; cacheable, e.g. in a first Ray Data pass) ->
:func:`flow_matching_loss` (transformer phase) and/or :func:`alpha_decoder_loss` (alpha phase) -> backward.

Flow matching (rectified flow, SD3's convention): ``x_t = (1 - s) x0 + s noise`` for a noise level ``s`` in
(0, 1), the transformer predicts ``v = noise - x0`` at timestep ``1000 s``. ``s`` is drawn logit-normal (SD3's
default: ``sigmoid(N(0, 1))``), then shifted like the sampler's schedule (``shift s / (1 + (shift - 1) s)``, the
scheduler's ``shift``), so training spends its effort where sampling does.

Condition dropout (for classifier-free guidance): per sample, with probability ``drop_text`` the text embedding is
replaced by the empty string's, and independently with probability ``drop_canvas`` the canvas latent by the empty
(all-blue) canvas's. The source image and the layer kind are never dropped: the layer is always of this image and
of the kind asked for.

Mixed precision: bf16 autocast on CUDA only (CPU autocast is slower than float32 here); weights stay float32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from reflade.engine.schema import KINDS
from reflade.train.bundle import RefLayerBundle
from reflade.train.config import TIMESTEP_SAMPLINGS

__all__ = [
    "alpha_decoder_loss",
    "autocast",
    "encode_batch",
    "flow_matching_loss",
    "kind_indices",
    "premultiply_over_grey",
    "sample_sigmas",
    "TIMESTEP_SAMPLINGS",
]


def autocast(device: torch.device | str, enabled: bool | None = None):
    """bf16 autocast for ``device``; on by default on CUDA only."""
    device = torch.device(device)
    on = device.type == "cuda" if enabled is None else bool(enabled)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on)


def premultiply_over_grey(layers: torch.Tensor) -> torch.Tensor:
    """(B, 4, H, W) straight RGBA in [0, 1] -> (B, 3, H, W) in [-1, 1]: the layer over mid-grey.

    In the VAE's [-1, 1] space this is ``rgb * alpha`` (premultiplied), 0 where the layer is empty.
    """
    return (layers[:, :3] * 2.0 - 1.0) * layers[:, 3:4]


FUSED_ENCODE_MAX = 8
"""At inference (no layers), images and canvases are encoded in one VAE call when together at most this many."""


@torch.no_grad()
def encode_batch(
    bundle: RefLayerBundle,
    images: torch.Tensor,
    layers: torch.Tensor | None,
    canvases: torch.Tensor,
    texts: list[str],
    *,
    kinds: list[str] | None = None,
    mixed_precision: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Everything the frozen parts compute for a batch (no gradients; cacheable).

    Args:
        images: (B, 3, H, W) source images in [-1, 1], H = W = the bundle's resolution.
        layers: (B, 4, H, W) target layers, straight RGBA in [0, 1] (None at inference).
        canvases: (B, 3, H, W) prompt canvases in [-1, 1] (:func:`reflade.train.canvas.canvas_batch`).
        texts: B prompt texts ("" for none).
        kinds: B layer kinds (``foreground`` / ``background``); None: no ``kind`` entry (the model then takes
            every row as a foreground).
        mixed_precision: bf16 autocast around the VAE and text encoders (default: on CUDA only); the latents
            come back as float32 either way.

    Returns:
        ``image``, ``canvas`` (and ``target`` with ``layers``): (B, C, h, w) normalized latents, ``target`` the
        latent of the layer over mid-grey (:func:`premultiply_over_grey`); ``text_hidden`` (B, L, D),
        ``text_pooled`` (B, P); ``alpha`` (B, 1, H, W) in [0, 1] with ``layers``; ``kind`` (B,) with ``kinds``:
        indices into :data:`reflade.engine.schema.KINDS` (the builders' ``layer_kinds``) as float32, like every
        other cached column.

    Raises:
        ValueError: batch sizes differ, or a kind is not a layer kind.
    """
    b = images.shape[0]
    if canvases.shape[0] != b or len(texts) != b or (layers is not None and layers.shape[0] != b):
        raise ValueError(
            f"batch sizes differ: images {b}, canvases {canvases.shape[0]}, texts {len(texts)}"
            + (f", layers {layers.shape[0]}" if layers is not None else "")
        )
    device = bundle.device
    with autocast(device, mixed_precision):
        if layers is None and 2 * b <= FUSED_ENCODE_MAX:
            # Inference-sized batches: image and canvas through the encoder in one call (one launch sequence).
            both = bundle.encode_pixels(torch.cat([images.to(device), canvases.to(device)]))
            out: dict[str, torch.Tensor] = {"image": both[:b], "canvas": both[b:]}
        else:
            out = {
                "image": bundle.encode_pixels(images.to(device)),
                "canvas": bundle.encode_pixels(canvases.to(device)),
            }
        if layers is not None:
            layers = layers.to(device, torch.float32)
            out["target"] = bundle.encode_pixels(premultiply_over_grey(layers))
            out["alpha"] = layers[:, 3:4].contiguous()
        hidden, pooled = bundle.text_encoder.encode(list(texts))
    out["text_hidden"], out["text_pooled"] = hidden.float(), pooled.float()
    if kinds is not None:
        out["kind"] = kind_indices(kinds, b)
    return out


def kind_indices(kinds: list[str], batch: int | None = None) -> torch.Tensor:
    """Layer kind names -> (B,) float32 indices into :data:`reflade.engine.schema.KINDS`.

    Raises:
        ValueError: a name is not a layer kind, or ``batch`` names another length.
    """
    from reflade.engine.decompose import check_kind

    kinds = [check_kind(k, f"kinds[{i}]") for i, k in enumerate(kinds)]
    if batch is not None and len(kinds) != batch:
        raise ValueError(f"{len(kinds)} layer kinds for a batch of {batch}")
    return torch.tensor([KINDS.index(k) for k in kinds], dtype=torch.float32)


def sample_sigmas(
    bundle: RefLayerBundle,
    batch: int,
    generator: torch.Generator | None = None,
    sampling: str = "logit-normal",
) -> torch.Tensor:
    """(B,) noise levels in [0, 1): drawn by ``sampling`` (:data:`TIMESTEP_SAMPLINGS`), then shifted by the
    scheduler's ``shift`` (on the generator's device).

    Logit-normal (SD3's) puts most draws near 0.5; uniform weighs every level as the Euler sampler's evenly spaced
    steps do, the high-noise levels where a layer's shape is decided included.

    Raises:
        ValueError: an unknown ``sampling``.
    """
    dev = generator.device if generator is not None else torch.device("cpu")
    if sampling == "logit-normal":
        u = torch.sigmoid(torch.randn(batch, generator=generator, device=dev))
    elif sampling == "uniform":
        u = torch.rand(batch, generator=generator, device=dev)
    else:
        raise ValueError(f"unknown timestep sampling {sampling!r} (known: {', '.join(TIMESTEP_SAMPLINGS)})")
    shift = float(bundle.scheduler.config.shift)
    return shift * u / (1.0 + (shift - 1.0) * u)


def _drop_mask(batch: int, rate: float, generator: torch.Generator | None) -> torch.Tensor:
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(batch, generator=generator, device=dev) < rate


def _where(drop: torch.Tensor, empty: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    drop = drop.to(cond.device).view(-1, *([1] * (cond.dim() - 1)))
    return torch.where(drop, empty.to(cond.dtype).expand_as(cond), cond)


def flow_matching_loss(
    bundle: RefLayerBundle,
    latents: dict[str, Any],
    generator: torch.Generator | None = None,
    drop_text: float = 0.1,
    drop_canvas: float = 0.1,
    *,
    mixed_precision: bool | None = None,
    timestep_sampling: str = "logit-normal",
) -> torch.Tensor:
    """Rectified-flow loss of the transformer phase: mean squared error of the predicted velocity.

    Args:
        latents: from :func:`encode_batch` (``target``, ``image``, ``canvas``, ``text_hidden``, ``text_pooled``,
            and ``kind`` (B,), never dropped: without it every row is a foreground).
        generator: source of noise levels, noise and dropout (CPU by default): a fixed seed gives a fixed draw,
            e.g. for comparing losses fairly.
        drop_text, drop_canvas: per-sample probabilities of replacing the text / canvas by the empty one.
        mixed_precision: bf16 autocast (default: on CUDA only).
        timestep_sampling: how noise levels are drawn (:func:`sample_sigmas`).

    Returns:
        Scalar loss (float32): the mean squared error of the velocity ``noise - x0``, or, for a model that
        predicts the clean latent (``bundle.model.prediction == "sample"``, the tiny preset), of the clean latent
        itself. That weighting matters: the velocity error of an ``x0`` prediction is its ``x0`` error over
        ``sigma``, a weight ``1 / sigma^2`` that gives the nearly clean draws (an easy copy of the input) hundreds
        of times the weight of the noisy ones, where the layer's shape is decided. Trained that way the overfit
        test's 8 samples were reproduced at half noise and missed from pure noise (x0 MSE 0.60 at sigma 1 after
        1000 steps; foreground alpha IoU 0.26-0.54 through the sampler); with the ``x0`` error, 0.004 at sigma 1
        and IoU 0.95-0.99 (tests/train/test_overfit.py).
    """
    device = bundle.device
    x0 = latents["target"].to(device)
    b = x0.shape[0]
    dev = generator.device if generator is not None else torch.device("cpu")
    sigmas = sample_sigmas(bundle, b, generator, timestep_sampling).to(device)
    noise = torch.randn(x0.shape, generator=generator, device=dev).to(device)
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    target = noise - x0

    hidden, pooled = latents["text_hidden"].to(device), latents["text_pooled"].to(device)
    canvas = latents["canvas"].to(device)
    if drop_text > 0:
        empty_hidden, empty_pooled = bundle.empty_text()
        drop = _drop_mask(b, drop_text, generator)  # one draw decides both text tensors of a sample
        hidden, pooled = _where(drop, empty_hidden, hidden), _where(drop, empty_pooled, pooled)
    if drop_canvas > 0:
        f = bundle.vae_scale_factor
        empty_canvas = bundle.empty_canvas_latent(canvas.shape[-2] * f, canvas.shape[-1] * f)
        canvas = _where(_drop_mask(b, drop_canvas, generator), empty_canvas, canvas)

    with autocast(device, mixed_precision):
        kind = latents.get("kind")
        kind = None if kind is None else kind.to(device)
        pred = bundle.model(noisy, latents["image"].to(device), canvas, sigmas * 1000.0, hidden, pooled, kind)
    if getattr(bundle.model, "prediction", "velocity") == "sample":
        # the error of the clean latent, the same weight at every noise level (see the docstring)
        return F.mse_loss(noisy.float() - s * pred.float(), x0.float())
    return F.mse_loss(pred.float(), target.float())


def alpha_decoder_loss(
    bundle: RefLayerBundle,
    latents: dict[str, Any],
    alpha_targets: torch.Tensor | None = None,
    *,
    l1_weight: float = 1.0,
    mixed_precision: bool | None = None,
) -> torch.Tensor:
    """Loss of the alpha phase: the alpha decoder on the clean target latent.

    ``BCE(logits, alpha) + l1_weight * |sigmoid(logits) - alpha|``: the BCE gives strong gradients on hard
    edges, the L1 weighs soft (matted) edges linearly.

    Args:
        latents: from :func:`encode_batch` (``target``; ``alpha`` when ``alpha_targets`` is None).
        alpha_targets: (B, 1, H, W) or (B, H, W) alpha in [0, 1] at the bundle's resolution.

    Returns:
        Scalar loss (float32).
    """
    device = bundle.device
    a = latents["alpha"] if alpha_targets is None else alpha_targets
    a = a.to(device, torch.float32)
    if a.dim() == 3:
        a = a.unsqueeze(1)
    with autocast(device, mixed_precision):
        logits = bundle.decode_alpha_logits(latents["target"].to(device))
    logits = logits.float()
    if logits.shape != a.shape:
        raise ValueError(f"alpha targets are {tuple(a.shape)}, the decoder gives {tuple(logits.shape)}")
    bce = F.binary_cross_entropy_with_logits(logits, a)
    return bce + l1_weight * (torch.sigmoid(logits) - a).abs().mean()
