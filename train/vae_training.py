"""Training the tiny configuration's VAE (:mod:`reflade.train.vae`): :func:`train_vae` (reconstruction + KL,
warmup then cosine decay; ``scaling_factor`` and ``shift_factor`` set from the training latents at the end), its
measures (:func:`psnr`, :func:`latent_stats`), and the VAE phase of the platform (:func:`run_vae_phase`: train on
a dataset version, register ``weights/tiny-vae@N`` with :func:`register_vae`; :func:`load_vae` loads it back).
"""

from __future__ import annotations

import hashlib
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from reflade.train.vae import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    DEFAULT_STEPS,
    DOWNSCALE,
    LATENT_CHANNELS,
    LICENSE,
    SOURCE,
    VAE_NAME,
    build_tiny_vae,
    vae_training_tensors,
)

__all__ = [
    "latent_stats",
    "load_vae",
    "psnr",
    "register_vae",
    "run_vae_phase",
    "train_vae",
]

_WARMUP_STEPS = 20
_FINAL_LR_FRACTION = 0.1
"""Cosine decay from ``lr`` to this fraction of it at the last step."""
_LOSS_WINDOW = 50
"""The reported training loss is the mean over the last this many steps."""


def _lr_at(step: int, steps: int, lr: float) -> float:
    if step < _WARMUP_STEPS:
        return lr * (step + 1) / _WARMUP_STEPS
    t = (step - _WARMUP_STEPS) / max(1, steps - _WARMUP_STEPS)
    return lr * (_FINAL_LR_FRACTION + (1 - _FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def _reconstruct(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    return vae.decode(vae.encode(x).latent_dist.mode()).sample


@torch.no_grad()
def psnr(vae: AutoencoderKL, tensors: torch.Tensor, batch_size: int = 64) -> float:
    """Reconstruction PSNR (dB) of ``tensors`` through ``vae`` (encoder mode, no sampling).

    Args:
        tensors: (N, 3, H, W) in [-1, 1].

    Returns:
        10 log10(1 / MSE), MSE over every pixel of the set, both sides mapped to [0, 1] and the output clamped.
    """
    if len(tensors) == 0:
        raise ValueError("psnr of an empty set")
    was_training = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    se, n = 0.0, 0
    for i in range(0, len(tensors), batch_size):
        x = tensors[i : i + batch_size].to(device)
        y = _reconstruct(vae, x).clamp(-1, 1)
        se += float(((y - x) / 2).double().pow(2).sum())
        n += x.numel()
    vae.train(was_training)
    return 10.0 * math.log10(1.0 / max(se / n, 1e-12))


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, tensors: torch.Tensor, batch_size: int = 64) -> tuple[float, float]:
    """Mean and standard deviation of the encoder's latents (mode) over ``tensors``, all channels together."""
    device = next(vae.parameters()).device
    total, total_sq, n = 0.0, 0.0, 0
    for i in range(0, len(tensors), batch_size):
        z = vae.encode(tensors[i : i + batch_size].to(device)).latent_dist.mode().double()
        total += float(z.sum())
        total_sq += float(z.pow(2).sum())
        n += z.numel()
    mean = total / n
    return mean, math.sqrt(max(total_sq / n - mean * mean, 1e-12))


def train_vae(
    tensors: torch.Tensor,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    kl_weight: float = 1e-6,
    seed: int = 0,
    device: str = "cpu",
    holdout: torch.Tensor | None = None,
    vae: AutoencoderKL | None = None,
    progress: bool = True,
    log: Callable[[str], Any] | None = print,
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Train the tiny VAE: AdamW on L1 + MSE reconstruction + ``kl_weight`` x KL, warmup then cosine decay.

    Batches are drawn with replacement from ``tensors`` and flipped left-right at random. Deterministic for a
    seed on the CPU (the initial weights, the batches, the flips and the posterior samples all come from it).
    At the end ``shift_factor`` and ``scaling_factor`` are set from the latents of ``tensors``.

    Args:
        tensors: (N, 3, H, W) float in [-1, 1], H and W multiples of 4 (see :func:`vae_training_tensors`).
        steps: optimiser steps.
        batch_size: samples per step.
        lr: peak learning rate.
        kl_weight: weight of the KL term, scaled as in LDM/SD VAE training (sum of KL against sum of errors).
        seed: seed of everything random here.
        device: torch device, "cpu" or "cuda".
        holdout: (M, 3, H, W) images never trained on, for ``psnr_holdout``; None holds out every tenth of
            ``tensors`` (which may share a source with trained ones: pass a real hold-out where it matters), or
            measures on ``tensors`` themselves when there are fewer than 10.
        vae: the model to train (default: :func:`build_tiny_vae` seeded with ``seed``).
        progress: draw a progress bar (steps/s and loss) on stderr.
        log: receives one-line summaries; None for silence.

    Returns:
        The trained VAE (eval mode, on ``device``) and its metrics: ``loss`` (mean of the last steps),
        ``psnr_holdout``, ``psnr_holdout_init`` (before training), ``psnr_train``, ``steps``, ``samples``,
        ``wall_s``, ``steps_per_s``, ``parameters``, ``scaling_factor``, ``shift_factor``.

    Raises:
        ValueError: empty or misshaped ``tensors``, non-positive ``steps`` or ``batch_size``.
    """
    from tqdm.auto import tqdm

    if tensors.ndim != 4 or tensors.shape[1] != 3 or len(tensors) == 0:
        raise ValueError(f"expected (N, 3, H, W) training tensors with N > 0, got {tuple(tensors.shape)}")
    if tensors.shape[2] % DOWNSCALE or tensors.shape[3] % DOWNSCALE:
        raise ValueError(f"image sides must be multiples of {DOWNSCALE}, got {tuple(tensors.shape[2:])}")
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    say = log or (lambda _msg: None)
    if holdout is None and len(tensors) >= 10:
        held = torch.zeros(len(tensors), dtype=torch.bool)
        held[::10] = True
        holdout, tensors = tensors[held], tensors[~held]
    elif holdout is None:  # too few to hold any out
        holdout = tensors

    dev = torch.device(device)
    vae = (vae if vae is not None else build_tiny_vae(tensors.shape[-1], seed=seed)).to(dev)
    vae.requires_grad_(True)
    n_params = sum(p.numel() for p in vae.parameters())
    gen = torch.Generator().manual_seed(seed)
    data = tensors.to(dev)
    psnr_init = psnr(vae, holdout)
    say(
        f"tiny VAE: {n_params / 1e6:.2f} M parameters, latents {LATENT_CHANNELS}x"
        f"{tensors.shape[2] // DOWNSCALE}x{tensors.shape[3] // DOWNSCALE}; {len(tensors)} training images, "
        f"{len(holdout)} held out; {steps} steps of {batch_size} on {dev}"
        + (f" ({torch.get_num_threads()} threads)" if dev.type == "cpu" else "")
    )

    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=1e-4)
    vae.train()
    losses: list[float] = []
    # In a job's log (not a terminal) every refresh is a line: refresh every 10 s there.
    bar = tqdm(
        total=steps,
        desc="train vae",
        unit="step",
        disable=not progress,
        file=sys.stderr,
        leave=False,
        mininterval=0.1 if sys.stderr.isatty() else 10.0,
    )
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr)
            idx = torch.randint(len(data), (batch_size,), generator=gen)
            flip = torch.rand(batch_size, generator=gen) < 0.5
            x = data[idx.to(dev)]
            x = torch.where(flip.to(dev)[:, None, None, None], x.flip(-1), x)
            posterior = vae.encode(x).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=gen).to(dev)
            z = posterior.mean + posterior.std * noise
            y = vae.decode(z).sample
            rec = F.l1_loss(y, x) + F.mse_loss(y, x)
            # KL summed over a sample's latent elements and divided by its pixel elements, as the reconstruction
            # terms are means: kl_weight then means what it means in LDM/SD VAE training (both sums there).
            kl = posterior.kl().mean() / x[0].numel()
            loss = rec + kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{np.mean(losses[-_LOSS_WINDOW:]):.4f}")
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    vae.eval()
    vae.requires_grad_(False)

    shift, std = latent_stats(vae, tensors)
    vae.register_to_config(shift_factor=float(shift), scaling_factor=float(1.0 / std))
    metrics = {
        "loss": float(np.mean(losses[-_LOSS_WINDOW:])),
        "psnr_holdout": psnr(vae, holdout),
        "psnr_holdout_init": psnr_init,
        "psnr_train": psnr(
            vae, tensors[: max(len(holdout), 64)]
        ),  # on as many training tensors (at least 64)
        "steps": steps,
        "batch_size": batch_size,
        "samples": steps * batch_size,
        "wall_s": wall,
        "steps_per_s": steps / wall,
        "parameters": n_params,
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": vae.config.shift_factor,
    }
    say(
        f"tiny VAE trained in {wall:.1f} s ({metrics['steps_per_s']:.2f} steps/s): loss {metrics['loss']:.4f}, "
        f"held-out PSNR {metrics['psnr_holdout']:.2f} dB (untrained {psnr_init:.2f} dB), "
        f"scaling_factor {metrics['scaling_factor']:.4f}, shift_factor {metrics['shift_factor']:.4f}"
    )
    return vae, metrics


def _holdout_split(rows: list[dict[str, Any]], fraction: float = 0.1) -> tuple[list, list]:
    """Split rows by source image (never one source on both sides): about ``fraction`` of sources held out."""
    sources = sorted({r["source_sha256"] for r in rows})
    if len(sources) < 2:
        return rows, []
    n_out = max(1, round(len(sources) * fraction))
    held = set(sorted(sources, key=lambda s: hashlib.sha256(s.encode()).hexdigest())[:n_out])
    return [r for r in rows if r["source_sha256"] not in held], [
        r for r in rows if r["source_sha256"] in held
    ]


def run_vae_phase(
    cfg,
    dataset_ref: str,
    *,
    steps: int = DEFAULT_STEPS,
    size: int = 64,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    kl_weight: float = 1e-6,
    seed: int = 0,
    device: str = "cpu",
    name: str = VAE_NAME,
    progress: bool = True,
    log: Callable[[str], Any] | None = print,
):
    """Train the tiny VAE on a dataset version and register it as ``weights/<name>`` (default tiny-vae).

    Trains on every row outside the ``test`` split (``train`` and ``quality``); measures ``psnr_holdout`` on the
    ``test`` split, or, when that is empty, on about a tenth of the training source images (whole sources, kept
    out of training).

    Args:
        cfg: the platform ``Config`` (storage, registry), or a ``Registry``.
        dataset_ref: ``dataset/NAME[@VERSION|@ALIAS]`` (a ``:SPLIT`` suffix is ignored).
        steps, size, batch_size, lr, kl_weight, seed, device: see :func:`train_vae`; ``size`` is the side in
            pixels the images are resized to.

    Returns:
        The registered ``Version`` (``reused`` when identical weights were registered before).

    Raises:
        RegistryError: unknown dataset; SchemaError: not a dataset; ValueError: no training rows.
    """
    from reflade.engine.schema import load_rows
    from reflade.platform.registry import Registry

    registry = cfg if isinstance(cfg, Registry) else Registry.from_config(cfg)
    say = log or (lambda _msg: None)
    dataset = registry.resolve(dataset_ref)
    rows = load_rows(registry, dataset.ref)  # the exact reference: every split
    train_rows = [r for r in rows if r["split"] != "test"]
    test_rows = [r for r in rows if r["split"] == "test"]
    if not train_rows:
        raise ValueError(f"{dataset.ref} has no rows outside the test split to train the VAE on")
    if test_rows:
        holdout_rows, holdout_from = test_rows, "test split"
    else:
        train_rows, holdout_rows = _holdout_split(train_rows)
        holdout_from = "a tenth of the training sources"
        if not holdout_rows:  # a single source image: nothing can be held out
            holdout_rows, holdout_from = train_rows, "training rows (a single source image)"
    say(f"{dataset.ref}: {len(train_rows)} training rows, {len(holdout_rows)} held-out rows ({holdout_from})")
    train_x = vae_training_tensors(train_rows, size)
    holdout_x = vae_training_tensors(holdout_rows, size)
    vae, metrics = train_vae(
        train_x,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        kl_weight=kl_weight,
        seed=seed,
        device=device,
        holdout=holdout_x,
        progress=progress,
        log=log,
    )
    metadata = {
        "size": size,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "kl_weight": kl_weight,
        "seed": seed,
        "train_images": len(train_x),
        "holdout_images": len(holdout_x),
        "holdout_from": holdout_from,
    }
    version = register_vae(registry, vae, [dataset.ref], metrics, metadata=metadata, name=name)
    say(f"{'reused' if version.reused else 'registered'} {version.ref}")
    return version


def register_vae(
    registry,
    vae: AutoencoderKL,
    parents: Sequence[str],
    metrics: dict[str, Any],
    *,
    metadata: dict[str, Any] | None = None,
    name: str = VAE_NAME,
):
    """Save a trained VAE (``save_pretrained``: ``config.json`` + safetensors) and register ``weights/<name>``.

    Args:
        parents: lineage, e.g. the dataset version it was trained on.
        metrics: from :func:`train_vae`; its PSNRs, loss and speed go into the manifest's metrics.
        metadata: more facts for the manifest; the latent layout and the pixel convention are added.

    Returns:
        The ``Version``; identical weights registered before give that version back (``reused``).
    """
    size = int(vae.config.sample_size)
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    meta = {
        **(metadata or {}),
        "latent_shape": [int(vae.config.latent_channels), size // down, size // down],
        "downscale": down,
        "block_out_channels": list(vae.config.block_out_channels),
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": float(vae.config.shift_factor),
        "pixel_convention": "RGB in [-1, 1]; a layer over mid-grey, i.e. rgb * alpha (layer_over_grey)",
    }
    keys = ("psnr_holdout", "psnr_holdout_init", "psnr_train", "loss", "wall_s", "steps_per_s")
    with tempfile.TemporaryDirectory(prefix="reflade-vae-") as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        return registry.create(
            "weights",
            name,
            tmp,
            parents=list(parents),
            metadata=meta,
            metrics={k: metrics[k] for k in keys if k in metrics},
            license=LICENSE,
            source=SOURCE,
            progress=False,
        )


def load_vae(
    registry, ref: str = f"weights/{VAE_NAME}", cache_dir: str | Path | None = None
) -> AutoencoderKL:
    """Load a registered VAE by reference, frozen (eval mode, no gradients), on the CPU.

    The version's folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) is fetched into the local
    weights cache (``cache_dir``; None: the platform's default cache) unless a verified copy is there already.

    Raises:
        RegistryError: unknown reference; IntegrityError: files corrupt in the object store.
    """
    from reflade.platform.weights import fetch_weights

    local = fetch_weights(registry, ref, cache_dir)
    # low_cpu_mem_usage needs `accelerate`, which this project does not install.
    vae = AutoencoderKL.from_pretrained(local.path, local_files_only=True, low_cpu_mem_usage=False)
    vae.eval()
    vae.requires_grad_(False)
    return vae
