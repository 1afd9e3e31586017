"""The plain training loop: one process, the same step function as the Ray Train loop
(:func:`reflade.train.step.train_step` over a :class:`~reflade.train.step.PhaseLoss`), so it is the honest
baseline of the training benchmark (Ray's overhead is everything else), and the loop of the learning curve and of
the overfit test.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from reflade.train.config import TrainSettings
from reflade.train.latents import _batch_len, _encode
from reflade.train.step import (
    PhaseLoss,
    _cycle,
    _load_ema,
    ema_init,
    make_optimizer,
    train_step,
    trainable_parameters,
)

__all__ = ["train_plain"]


def train_plain(
    bundle,
    batches: Iterable[dict[str, Any]],
    settings: TrainSettings,
    *,
    log: Callable[[str], Any] | None = None,
    evaluate: Callable[[int, float], Any] | None = None,
    evaluate_every: int = 0,
) -> dict[str, Any]:
    """A single-process loop with the same step function as the Ray loop (the benchmark's baseline).

    Args:
        bundle: a :class:`~reflade.train.bundle.RefLayerBundle` (trained in place).
        batches: numpy batches as :func:`preprocess_row` makes them (``image``, ``layer``, ``canvas``, ``text``,
            ``kind``) or cached-latents batches (:data:`LATENT_COLUMNS`), cycled until ``settings.steps``
            optimiser steps are done.
        evaluate: called as ``evaluate(steps_done, train_seconds)`` before the first step, every
            ``evaluate_every`` steps and after the last, with the weights that would be registered then (the EMA
            weights when ``ema_decay`` is on, swapped in for the call); ``train_seconds`` excludes the
            evaluations. For learning curves.
        evaluate_every: steps between evaluations (0: only before the first step and after the last).

    Returns:
        ``loss`` (last step), ``losses``, ``steps``, ``samples``, ``wall_s`` (training only), ``steps_per_s``,
        ``samples_per_s``; with ``evaluate``: ``evaluations`` (what it returned, in order) and ``evaluate_s``.
    """
    torch.manual_seed(settings.seed)
    bundle.set_gradient_checkpointing(settings.gradient_checkpointing)
    bundle.model.train()
    loss_module = PhaseLoss(bundle, settings)
    params = trainable_parameters(bundle.model, settings.phase)
    optimizer = make_optimizer(params, settings)
    ema = ema_init(bundle.model, settings.phase) if settings.ema_decay > 0 else None
    batches = list(batches)
    if not batches:
        raise ValueError("no batches to train on")
    losses, samples = [], 0
    evaluations: list[Any] = []
    eval_s = 0.0
    it = _cycle(batches)
    t0 = time.perf_counter()

    def run_evaluation(done: int) -> None:
        nonlocal eval_s
        t = time.perf_counter()
        with _swapped_in(bundle.model, ema):
            evaluations.append(evaluate(done, t - t0 - eval_s))
        bundle.model.train()
        eval_s += time.perf_counter() - t

    if evaluate is not None:
        run_evaluation(0)
    for step in range(settings.steps):
        micro = []
        for _ in range(settings.grad_accum):
            b = next(it)
            micro.append(_encode(bundle, b))
            samples += _batch_len(b)
        losses.append(train_step(loss_module, optimizer, micro, settings, step, ema=ema, model=bundle.model))
        if log and (step + 1) % settings.report_every == 0:
            log(f"step {step + 1}/{settings.steps} loss {losses[-1]:.4f}")
        done = step + 1
        if evaluate is not None and (
            done == settings.steps or (evaluate_every and done % evaluate_every == 0)
        ):
            run_evaluation(done)
    wall = time.perf_counter() - t0 - eval_s
    if ema is not None:
        _load_ema(bundle.model, ema)
    out = {
        "loss": losses[-1],
        "losses": losses,
        "steps": settings.steps,
        "samples": samples,
        "wall_s": wall,
        "steps_per_s": settings.steps / wall,
        "samples_per_s": samples / wall,
    }
    if evaluate is not None:
        out.update(evaluations=evaluations, evaluate_s=eval_s)
    return out


class _swapped_in:
    """The EMA weights in the model for a ``with`` block, the trained ones back after it (no-op without EMA)."""

    def __init__(self, model: nn.Module, ema: dict[str, torch.Tensor] | None):
        self.model, self.ema, self.saved = model, ema, None

    def __enter__(self):
        self.model.eval()
        if self.ema is not None:
            named = dict(self.model.named_parameters())
            self.saved = {k: named[k].detach().clone() for k in self.ema}
            _load_ema(self.model, self.ema)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            _load_ema(self.model, self.saved)
        return False
