"""The ``train`` configuration section (YAML key ``train``, variables ``REFLADE_TRAIN_<FIELD>``) and the settings of
one training run.

:class:`TrainSettings` is what :func:`reflade.train.trainer.run_training` takes; :class:`TrainConfig` is the
configuration section registered under the entry-point group ``reflade.config``: the same fields plus what a run
trains on and with (dataset, VAE or base weights, latent caching, threads). ``reflade train`` reads the section and
applies its flags on top: defaults < YAML file < ``REFLADE_TRAIN_*`` variables < command-line flags.

This module imports neither torch nor Ray: the configuration loader imports every registered section at each
``reflade`` invocation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["LR_SCHEDULES", "PHASES", "TIMESTEP_SAMPLINGS", "TrainConfig", "TrainSettings"]

PHASES = ("transformer", "alpha", "both")
"""What a run trains: the transformer (flow matching), the alpha decoder, or both (sum of the losses)."""
LR_SCHEDULES = ("constant", "cosine")
"""Learning-rate schedules after the warmup."""
TIMESTEP_SAMPLINGS = ("logit-normal", "uniform")
"""How the flow-matching loss draws noise levels before the shift (``reflade.train.losses.sample_sigmas``): SD3's
``sigmoid(N(0, 1))``, or uniform in [0, 1)."""


@dataclass(kw_only=True)
class TrainSettings:
    """Settings of one RefLayer training run."""

    preset: str = "tiny"
    """Model preset (``tiny`` or ``sd3-medium``)."""
    phase: str = "both"
    """What trains: ``transformer`` (flow matching), ``alpha`` (alpha decoder) or ``both`` (sum of the losses). The
    pipeline decodes alpha with the alpha decoder, so a model meant to decompose trains both (a ``transformer``-only
    run leaves the alpha decoder as initialised: the sigmoid of the VAE decoder's mean colour, not an alpha)."""
    alpha_samples: int = 0
    """Samples of each micro-batch the alpha decoder's loss reads, drawn at random per step (0: all of them). The
    alpha decoder (the VAE decoder's shape, at full resolution) costs several times the tiny transformer per sample
    and converges in far fewer samples, so a few per step train it at a fraction of the cost."""
    steps: int = 100
    """Optimiser steps in all (a resumed run counts the steps done before)."""
    batch_size: int = 4
    """Samples per micro-batch per worker."""
    lr: float = 1e-4
    """Peak learning rate (after warmup; constant afterwards)."""
    warmup_steps: int = 10
    """Linear warmup from lr / warmup_steps to lr over this many steps (0: none)."""
    lr_schedule: str = "constant"
    """After the warmup: ``constant``, or ``cosine`` (half a cosine from ``lr`` down to a tenth of it at the last
    of ``steps``)."""
    optimizer: str = "adamw"
    """``adamw`` (weight decay 0.01) or ``sgd`` (momentum 0.9)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (gradients are synchronised on the last one only)."""
    ema_decay: float = 0.0
    """Decay of the exponential moving average of the weights (0: off); the EMA weights are the registered ones."""
    bf16: bool | None = None
    """bf16 autocast; None: on for CUDA, off on the CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more compute)."""
    timestep_sampling: str = "logit-normal"
    """How the flow-matching loss draws noise levels: ``logit-normal`` (SD3's) or ``uniform``."""
    drop_text: float = 0.1
    """Per-sample probability of replacing the text by the empty one (classifier-free guidance)."""
    drop_canvas: float = 0.1
    """Per-sample probability of replacing the canvas by the empty one (classifier-free guidance)."""
    resolution: int | None = None
    """Training resolution in pixels; None: the preset's (64 for tiny)."""
    workers: int = 1
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); otherwise CPU workers (gloo)."""
    cpus_per_worker: float = 0.5
    """CPUs each worker reserves; leave room for Ray Data's read tasks (a full CPU each hangs a 2-CPU node)."""
    checkpoint_every: int = 50
    """Checkpoint every this many steps (and always at the last step)."""
    report_every: int = 5
    """Print and log metrics every this many steps (and at checkpoints and the last step)."""
    report_interval_s: float = 2.5
    """Least seconds between two metrics-only ``ray.train.report`` calls (checkpoints and the last step always
    report). Ray Train 2.60's controller collects one pending report per worker every
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s): reports closer together than that block the worker."""
    replay_mib: float = 1024.0
    """Each worker keeps the batches of its first pass over its data shard in memory and replays them in later
    epochs, when they total at most this many MiB (0: Ray Data reads the shard again every epoch). Ray Data
    restarts a dataset's execution at every epoch, about 2 s on a 2-core machine: more than a whole epoch of a small
    dataset's steps (the demo: 142 rows, 18 steps of 0.09 s). Replayed epochs keep the first pass's order, as
    :func:`~reflade.train.plain_loop.train_plain` cycles its batches."""
    seed: int = 0
    """Seed of the initial weights, the noise, the dropout and the prompt choice."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (the configuration loader calls this after the YAML file and the environment).

        Raises:
            ValueError: a field out of its range, named with its value.
        """
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {self.timestep_sampling!r}"
            )
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        for name in ("steps", "batch_size", "grad_accum", "workers", "checkpoint_every", "report_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if int(self.alpha_samples) < 0:
            raise ValueError(f"alpha_samples must be >= 0, got {self.alpha_samples}")
        if self.replay_mib < 0:
            raise ValueError(f"replay_mib must be >= 0, got {self.replay_mib}")
        if self.report_interval_s < 0:
            raise ValueError(f"report_interval_s must be >= 0, got {self.report_interval_s}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be positive, got {self.cpus_per_worker}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (what travels to the workers and into checkpoints and metadata)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainSettings)}


@dataclass(kw_only=True)
class TrainConfig(TrainSettings):
    """The ``train`` configuration section: a run's :class:`TrainSettings` plus its inputs and resources.

    Example (YAML)::

        train:
          dataset: dataset/reflade-demo
          steps: 2000
          batch_size: 8
          workers: 2
          cache_latents: true
    """

    dataset: str | None = None
    """Dataset reference whose ``train`` split is streamed (e.g. ``dataset/reflade-demo``); ``--dataset``."""
    vae: str | None = None
    """tiny preset: the VAE reference (None: ``weights/tiny-vae@latest``); ``--vae``."""
    weights: str | None = None
    """sd3-medium: the SD3 checkpoint reference (None: ``weights/sd3-medium@latest``); ``--weights``."""
    cache_latents: bool = False
    """Encode the train split once (VAE latents, text embeddings) before training; ``--cache-latents``."""
    cache_workers: int = 1
    """Encoder actors of the latent-caching pass (one GPU each with ``use_gpu``)."""
    torch_threads: int | None = None
    """Intra-op torch threads of each worker (None: torch's own choice); ``--threads``."""

    def validate(self) -> None:
        """Check every field, as :meth:`TrainSettings.validate` does, plus the section's own.

        Raises:
            ConfigError: (a ValueError) naming the section's key, e.g. ``train.steps must be at least 1, got 0``.
        """
        from reflade.platform.config import ConfigError

        try:
            super().validate()
            if self.cache_workers < 1:
                raise ValueError(f"cache_workers must be at least 1, got {self.cache_workers}")
            if self.torch_threads is not None and self.torch_threads < 1:
                raise ValueError(f"torch_threads must be at least 1, got {self.torch_threads}")
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"train.{e}") from None

    def settings(self) -> TrainSettings:
        """The :class:`TrainSettings` part (what :func:`~reflade.train.trainer.run_training` takes)."""
        return TrainSettings(**self.to_dict())
