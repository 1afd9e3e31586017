"""One optimiser step, shared by the Ray Train worker loop (:mod:`reflade.train.ray_loop`), the plain loop
(:mod:`reflade.train.plain_loop`) and ``bench/gpu_check.py``: the loss of a phase as a module
(:class:`PhaseLoss`), the optimiser, the learning-rate schedule, the noise generator of a step, the EMA weights
and a fingerprint of the parameters.

Every random draw of a step comes from :func:`step_generator`, a function of (seed, rank, step), so a resumed
run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from reflade.train.config import TrainSettings

__all__ = [
    "PhaseLoss",
    "ema_init",
    "ema_update",
    "lr_at",
    "make_optimizer",
    "param_checksum",
    "step_generator",
    "train_step",
    "trainable_parameters",
]


class PhaseLoss(nn.Module):
    """The loss of a phase as a module, so DDP can wrap it: ``forward(latents, generator) -> loss``.

    ``latents`` as :func:`reflade.train.losses.encode_batch` returns them, the layer ``kind`` included (the
    transformer phase conditions on it; it is never dropped).

    Only the phase's parameters require gradients (DDP synchronises those); the frozen bundle parts are not
    submodules.
    """

    def __init__(self, bundle, settings: TrainSettings):
        super().__init__()
        self.model = bundle.model
        self._bundle = bundle  # a dataclass, not a Module: not registered
        self.phase = settings.phase
        self.drop_text = float(settings.drop_text)
        self.drop_canvas = float(settings.drop_canvas)
        self.bf16 = settings.bf16
        self.alpha_samples = int(settings.alpha_samples)
        self.timestep_sampling = settings.timestep_sampling
        want = {id(p) for p in trainable_parameters(bundle.model, settings.phase)}
        for p in bundle.model.parameters():
            p.requires_grad_(id(p) in want)

    def forward(
        self, latents: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        from reflade.train.losses import alpha_decoder_loss, flow_matching_loss

        loss = torch.zeros((), device=self._bundle.device)
        if self.phase in ("transformer", "both"):
            loss = loss + flow_matching_loss(
                self._bundle,
                latents,
                generator,
                self.drop_text,
                self.drop_canvas,
                mixed_precision=self.bf16,
                timestep_sampling=self.timestep_sampling,
            )
        if self.phase in ("alpha", "both"):
            loss = loss + alpha_decoder_loss(
                self._bundle, _alpha_subset(latents, self.alpha_samples, generator), mixed_precision=self.bf16
            )
        return loss


def _alpha_subset(
    latents: dict[str, torch.Tensor], k: int, generator: torch.Generator | None
) -> dict[str, torch.Tensor]:
    """The ``target`` and ``alpha`` of ``k`` samples of the batch drawn at random (all of them when ``k`` is 0 or
    covers the batch); drawn after the flow-matching loss's draws, so those stay as they were."""
    b = latents["target"].shape[0]
    if k <= 0 or k >= b:
        return latents
    dev = generator.device if generator is not None else torch.device("cpu")
    idx = torch.randperm(b, generator=generator, device=dev)[:k]
    return {key: latents[key][idx.to(latents[key].device)] for key in ("target", "alpha")}


def trainable_parameters(model: nn.Module, phase: str) -> list[nn.Parameter]:
    """The parameters a phase trains (``both``: transformer and alpha decoder)."""
    if phase == "both":
        return model.phase_parameters("transformer") + model.phase_parameters("alpha")
    return model.phase_parameters(phase)


def make_optimizer(params: list[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """The optimiser of ``settings.optimizer``; AdamW is the fused (one kernel) implementation on CUDA."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=0.9)
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01, fused=fused or None)


_COSINE_FINAL_FRACTION = 0.1
"""The cosine schedule ends at this fraction of the peak learning rate."""


def lr_at(step: int, settings: TrainSettings) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup, then constant or a cosine decay to a
    tenth of the peak at the last step (``settings.lr_schedule``)."""
    if settings.warmup_steps > 0 and step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    if settings.lr_schedule == "cosine":
        span = max(1, settings.steps - 1 - settings.warmup_steps)
        t = min(1.0, max(0.0, (step - settings.warmup_steps) / span))
        f = _COSINE_FINAL_FRACTION
        return settings.lr * (f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * t)))
    return settings.lr


def step_generator(settings: TrainSettings, rank: int, step: int, micro: int = 0) -> torch.Generator:
    """The CPU generator of one micro-batch: a function of (seed, rank, step), so a resumed run draws the same."""
    return torch.Generator().manual_seed(
        (settings.seed * 1_000_003 + rank * 10_007 + step * 131 + micro) % (2**63 - 1)
    )


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * weights`` for the tracked parameters."""
    named = dict(model.named_parameters())
    keys = list(ema)
    torch._foreach_lerp_([ema[k] for k in keys], [named[k].detach() for k in keys], 1.0 - decay)


def ema_init(model: nn.Module, phase: str) -> dict[str, torch.Tensor]:
    want = {id(p) for p in trainable_parameters(model, phase)}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in want}


def train_step(
    loss_module: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    settings: TrainSettings,
    step: int,
    *,
    rank: int = 0,
    ema: dict[str, torch.Tensor] | None = None,
    model: nn.Module | None = None,
) -> float:
    """One optimiser step over ``micro_batches`` (encoded latents; ``grad_accum`` of them).

    Args:
        loss_module: a :class:`PhaseLoss`, or the same wrapped in DDP (``prepare_model``): gradients are
            synchronised on the last micro-batch only.
        step: 0-based index of this optimiser step (learning rate, noise seed).
        ema, model: EMA weights to update from ``model`` (the unwrapped RefLayer) after the step.

    Returns:
        The mean loss over the micro-batches.
    """
    lr = lr_at(step, settings)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    total = 0.0
    for i, latents in enumerate(micro_batches):
        sync = i == n - 1
        ctx = loss_module.no_sync() if (not sync and hasattr(loss_module, "no_sync")) else _null()
        with ctx:
            loss = loss_module(latents, step_generator(settings, rank, step, i)) / n
            loss.backward()
        total += float(loss.detach())
    optimizer.step()
    if ema is not None and model is not None:
        ema_update(ema, model, settings.ema_decay)
    return total


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def param_checksum(model: nn.Module) -> float:
    """A float64 fingerprint of every parameter (position-weighted, so permutations differ)."""
    total = 0.0
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            total += float(p.detach().double().sum()) * (1.0 + 1e-3 * i)
    return total


@torch.no_grad()
def _load_ema(model: nn.Module, ema: dict[str, torch.Tensor]) -> None:
    named = dict(model.named_parameters())
    for k, v in ema.items():
        named[k].copy_(v)


def _cycle(items: list) -> Iterator:
    while True:
        yield from items
