"""The tiny configuration's VAE: a small ``AutoencoderKL`` trained on the dataset's images and layers.

No pretrained VAE is available offline, and a frozen random VAE decodes noise (design.md, Weights), so the tiny
configuration first trains its own, registers it as ``weights/tiny-vae@N`` and every later tiny phase loads it
frozen, exactly as the sd3-medium configuration loads SD3's VAE from the registry.

The model (:func:`build_tiny_vae`, 0.98 M parameters): diffusers' ``AutoencoderKL`` with 3 levels of 32, 64 and 64
channels (:data:`BLOCK_OUT_CHANNELS`, one resnet per encoder level), so a 4x downscale: 64x64 RGB -> 16x16x16
latents. 16 latent channels and no quant convs, as in SD3's VAE, so the tiny RefLayer has SD3's latent layout.
After training, ``scaling_factor`` and ``shift_factor`` are set from the training latents (``(z - shift) * scale``
has mean 0 and variance 1, SD3's 1.5305 / 0.0609 convention) and saved in the model's config.

Pixel convention, shared by this VAE's training and every later encoding (RefLayer's images and targets, eval):
RGB in [-1, 1] (uint8 / 127.5 - 1), channels first. The VAE sees a layer (RGBA, straight alpha) composited over
mid-grey, that is premultiplied in [-1, 1] (``rgb * alpha``, 0 where the layer is empty:
:func:`layer_over_grey`), the RefLayer target convention of ``reflade.train.losses.premultiply_over_grey``; the
alpha is the alpha decoder's business, not this VAE's. :func:`layer_to_vae_input` gives the straight colour on
the same scale (-1 where alpha is 0, as the dataset stores it). Resizing is to a square ``size`` x ``size`` (the
whole frame, aspect not kept), area interpolation when shrinking; a layer is resized premultiplied (then
un-premultiplied for its straight colour), so that transparent pixels do not darken its edges.

Training it, measuring it and registering it: :mod:`reflade.train.vae_training`.

Example::

    from reflade.train.vae_training import train_vae

    vae, metrics = train_vae(vae_training_tensors(rows, 64), steps=300)
    z = (vae.encode(x).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import cv2
import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

__all__ = [
    "BLOCK_OUT_CHANNELS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_LR",
    "DEFAULT_STEPS",
    "DOWNSCALE",
    "LATENT_CHANNELS",
    "VAE_NAME",
    "build_tiny_vae",
    "image_to_vae_input",
    "layer_over_grey",
    "layer_to_vae_input",
    "vae_training_tensors",
]

LATENT_CHANNELS = 16
"""Latent channels, as SD3's VAE."""
BLOCK_OUT_CHANNELS = (32, 64, 64)
"""Channels of the three levels; 3 levels = 2 downsamplings."""
DOWNSCALE = 2 ** (len(BLOCK_OUT_CHANNELS) - 1)
"""Pixels per latent cell along each side (64 px -> 16x16 latents)."""
NORM_GROUPS = 8
"""GroupNorm groups (must divide every level's channels)."""
VAE_NAME = "tiny-vae"
"""Registry name: ``weights/tiny-vae``."""
LICENSE = "Apache-2.0 (trained by RefLade)"
SOURCE = "reflade train vae"

DEFAULT_STEPS = 1500
"""Optimiser steps of a VAE phase (batch 8: 12 000 samples). Measured on synthetic 64 px scenes (2 idle cores,
about 3.2 steps/s): held-out PSNR 20.4 dB after 150 steps, 22.0 after 300, 23.3 after 600."""
DEFAULT_BATCH_SIZE = 8
"""Samples per step. Measured at equal samples and time (1600, about 60 s): batch 8 reached 21.0 dB held-out,
batch 32 18.1 dB, batch 4 20.1 dB."""
DEFAULT_LR = 2e-3
"""Peak learning rate (AdamW; warmup, then cosine decay to a tenth)."""

_INIT_LOGVAR = -8.0
"""Initial log-variance of the posterior (std exp(-4) = 0.018; see build_tiny_vae)."""


# ---------------------------------------------------------------------------------------------- model
def build_tiny_vae(sample_size: int = 64, seed: int | None = 0) -> AutoencoderKL:
    """The tiny configuration's VAE, randomly initialised (0.98 M parameters).

    Args:
        sample_size: training resolution in pixels (recorded in the config; the model is fully convolutional).
        seed: ``torch.manual_seed`` before the weights are drawn (None: leave the global generator alone).

    Returns:
        An ``AutoencoderKL`` mapping (B, 3, H, W) in [-1, 1] to (B, 16, H/4, W/4) latents; H and W multiples of 4.
        ``scaling_factor`` 1 and ``shift_factor`` 0 until :func:`train_vae` sets them.
    """
    if seed is not None:
        torch.manual_seed(seed)
    levels = len(BLOCK_OUT_CHANNELS)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=NORM_GROUPS,
        sample_size=sample_size,
        scaling_factor=1.0,
        shift_factor=0.0,
        force_upcast=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # Two init choices that make the short training runs of the tiny configuration learn (measured: +2.7 dB
    # held-out PSNR after 200 steps). Every resnet block's last convolution and every attention's output start at
    # zero, so each block starts as the identity and the whole model as a shallow, nearly linear path that
    # learns fast. And the log-variance half of the encoder's output starts at a small constant: at the default
    # init the posterior's noise (std about 1) is three times the spread of its means, so the decoder would
    # first see mostly noise.
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, ResnetBlock2D):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
            elif isinstance(module, Attention):
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
        conv_out = vae.encoder.conv_out
        conv_out.weight[LATENT_CHANNELS:].zero_()
        conv_out.bias[LATENT_CHANNELS:].fill_(_INIT_LOGVAR)
    return vae


# ---------------------------------------------------------------------------------------------- pixels
def _size_hw(size: int | tuple[int, int] | None, shape: tuple[int, ...]) -> tuple[int, int]:
    if size is None:
        return int(shape[0]), int(shape[1])
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def _resize(a: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if a.shape[:2] == hw:
        return a
    # Area interpolation when shrinking (no aliasing), bilinear when growing.
    shrink = hw[0] * hw[1] < a.shape[0] * a.shape[1]
    return cv2.resize(a, (hw[1], hw[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def image_to_vae_input(image: np.ndarray, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """An RGB image (HxWx3 uint8) -> (3, h, w) float32 in [-1, 1], resized to ``size`` (int: square; (h, w)).

    Raises:
        ValueError: not an HxWx3 uint8 array.
    """
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {a.shape} {a.dtype}")
    a = _resize(a.astype(np.float32), _size_hw(size, a.shape))
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))) / 127.5 - 1.0


def _layer_resized(
    layer: np.ndarray, size: int | tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    a = np.asarray(layer)
    if a.ndim != 3 or a.shape[2] != 4 or a.dtype != np.uint8:
        raise ValueError(f"expected an HxWx4 uint8 RGBA layer, got {a.shape} {a.dtype}")
    alpha = a[..., 3:4].astype(np.float32) / 255.0
    premul = np.concatenate([a[..., :3].astype(np.float32) * alpha, alpha], axis=2)
    premul = _resize(premul, _size_hw(size, a.shape))
    alpha_r = premul[..., 3:4]
    rgb = np.where(alpha_r > 0, premul[..., :3] / np.maximum(alpha_r, 1e-6), 0.0)
    rgb = np.clip(rgb, 0.0, 255.0).astype(np.float32)
    straight = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))) / 127.5 - 1.0
    return straight, torch.from_numpy(np.ascontiguousarray(alpha_r.transpose(2, 0, 1)))


def layer_to_vae_input(layer: np.ndarray, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """An RGBA layer (HxWx4 uint8, straight alpha) -> its straight colour as (3, h, w) float32 in [-1, 1].

    -1 (RGB 0) where alpha is 0, as the dataset stores it. Resized premultiplied, then un-premultiplied where the
    resized alpha is above 0. What the VAE encodes for a layer is :func:`layer_over_grey` (this times alpha).

    Raises:
        ValueError: not an HxWx4 uint8 array.
    """
    return _layer_resized(layer, size)[0]


def layer_over_grey(layer: np.ndarray, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """An RGBA layer (HxWx4 uint8, straight alpha) -> the VAE's input for it: (3, h, w) float32 in [-1, 1].

    The layer composited over mid-grey: its straight colour in [-1, 1] times its alpha, 0 where it is empty;
    equal to ``reflade.train.losses.premultiply_over_grey`` of the layer's straight RGBA at this size.

    Raises:
        ValueError: not an HxWx4 uint8 array.
    """
    straight, alpha = _layer_resized(layer, size)
    return straight * alpha


def vae_training_tensors(rows: Iterable[dict[str, Any]], size: int = 64) -> torch.Tensor:
    """The VAE's training set from dataset rows: every distinct source image and every row's layer over grey.

    Rows share their source image (one row per layer); each image is taken once (by ``source_sha256``).

    Args:
        rows: RLD rows (``image`` RGB PNG/JPEG, ``layer`` RGBA PNG), e.g. from ``schema.load_rows``.
        size: side of the square tensors, pixels (a multiple of 4).

    Returns:
        (N, 3, size, size) float32 in [-1, 1]: images first, then layers, in row order.
    """
    from reflade.engine.schema import decode_image

    images, layers, seen = [], [], set()
    for r in rows:
        key = r.get("source_sha256") or hashlib.sha256(r["image"]).hexdigest()
        if key not in seen:
            seen.add(key)
            images.append(image_to_vae_input(decode_image(r["image"], "RGB"), size))
        layers.append(layer_over_grey(decode_image(r["layer"], "RGBA"), size))
    if not images:
        return torch.empty(0, 3, size, size)
    return torch.stack(images + layers)
