"""Training RefLayer: the Ray Train loop (DDP over workers, data streamed by Ray Data) and a plain loop.

Both loops call the same step function (:func:`train_step` over a :class:`PhaseLoss`), so the plain loop is the
honest baseline of the benchmark (Ray's overhead is everything else).

Data: the dataset's ``train`` split is read in place from the object store (:func:`reflade.engine.schema.
read_dataset`) and decoded by a Ray Data ``map`` before the trainer (:func:`preprocess_row`): the source image as
(3, R, R) in [-1, 1], the layer as straight RGBA (4, R, R) in [0, 1], one of the row's prompts (drawn by a seed
from the row's ``sample_id``) as its canvas (3, R, R) in [-1, 1] and its text, and the row's layer ``kind``
(foreground or background: both kinds train, each with the model's kind input set to it). The frozen VAE and text
encoder run inside the worker (:func:`reflade.train.losses.encode_batch`), or once in a latent-caching pass that
keeps the kind beside the latents.

Checkpoints (rank 0 writes, every rank reports; uploaded asynchronously so training does not wait for the object
store): ``state.pt`` with the trainable model's weights, the optimiser, the step, the EMA weights and the
settings. A run resumes from :func:`ray.train.get_checkpoint` (a restarted worker group after a failure, or a
rerun of the same run name with ``resume=True``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from reflade.platform.errors import ReportedError
from reflade.train.config import PHASES, TrainSettings

__all__ = [
    "PHASES",
    "PhaseLoss",
    "TrainSettings",
    "batch_to_tensors",
    "param_checksum",
    "preprocess_row",
    "run_training",
    "train_loop_per_worker",
    "train_plain",
    "train_step",
]

_STATE = "state.pt"
_CKPT_PREFIX = "checkpoint-"


# ---------------------------------------------------------------------------------------------- data
def _plain(value: Any) -> Any:
    """NumPy containers (as Ray Data hands nested columns over) -> plain Python."""
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return [_plain(v) for v in value]
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _layer_rgba(layer: np.ndarray, size: int) -> np.ndarray:
    """HxWx4 uint8 straight RGBA -> (4, size, size) float32 straight RGBA in [0, 1] (resized premultiplied)."""
    from reflade.train.vae import layer_to_vae_input

    rgb = (layer_to_vae_input(layer, size).numpy() + 1.0) / 2.0
    alpha = layer[..., 3].astype(np.float32) / 255.0
    if alpha.shape != (size, size):
        import cv2

        shrink = size * size < alpha.size
        alpha = cv2.resize(alpha, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.concatenate([rgb, alpha[None]], axis=0).astype(np.float32)


def preprocess_row(row: dict[str, Any], resolution: int, seed: int = 0) -> dict[str, Any]:
    """One dataset row -> the trainer's input: ``image`` (3,R,R), ``layer`` (4,R,R), ``canvas`` (3,R,R), ``text``
    and ``kind`` (the row's layer kind, ``foreground`` or ``background``: the model's kind input).

    One prompt of the row is chosen by a seed from ``(seed, sample_id)`` (the same one every epoch).

    Raises:
        ValueError: the row's ``kind`` is not a layer kind.
    """
    from reflade.engine.decompose import check_kind
    from reflade.engine.schema import decode_image
    from reflade.train.canvas import canvas_batch
    from reflade.train.vae import image_to_vae_input

    kind = check_kind(row.get("kind"), f"sample {row.get('sample_id', '?')}: kind")
    image = decode_image(bytes(row["image"]), "RGB")
    layer = decode_image(bytes(row["layer"]), "RGBA")
    h, w = image.shape[:2]
    prompts = _plain(row.get("prompts")) or []
    if prompts:
        digest = hashlib.sha256(f"{seed}:{row.get('sample_id', '')}".encode()).digest()
        prompt = dict(prompts[int.from_bytes(digest[:4], "little") % len(prompts)])
    else:
        prompt = {"type": "text", "text": ""}
    known = ("type", "granularity", "points", "box", "mask", "text")
    prompt = {k: prompt.get(k) for k in known if k in prompt}
    if prompt.get("points") is None:
        prompt.pop("points", None)
    canvas = canvas_batch([prompt], h, w, size=(resolution, resolution))[0]
    return {
        "image": image_to_vae_input(image, resolution).numpy(),
        "layer": _layer_rgba(layer, resolution),
        "canvas": canvas.numpy(),
        "text": str(prompt.get("text") or ""),
        "kind": kind,
    }


def batch_to_tensors(
    batch: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], list[str] | None]:
    """A numpy batch (``image``, ``layer``, ``canvas``, ``text``, ``kind``) -> tensors (B,3,R,R), (B,4,R,R),
    (B,3,R,R), the B texts and the B layer kinds (None for a batch without a ``kind`` column)."""

    def t(x):
        if isinstance(x, np.ndarray) and x.dtype == object:
            x = np.stack(list(x))
        elif isinstance(x, np.ndarray) and not x.flags.writeable:
            x = x.copy()  # Ray Data hands over read-only views of Arrow buffers; torch wants writable memory
        return torch.as_tensor(x)

    texts = [str(s) for s in batch["text"]]
    kinds = [str(k) for k in batch["kind"]] if "kind" in batch else None
    return t(batch["image"]).float(), t(batch["layer"]).float(), t(batch["canvas"]).float(), texts, kinds


# ---------------------------------------------------------------------------------------------- the step
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


LATENT_COLUMNS = {
    "lat_image": "image",
    "lat_canvas": "canvas",
    "lat_target": "target",
    "alpha": "alpha",
    "text_hidden": "text_hidden",
    "text_pooled": "text_pooled",
    "kind": "kind",
}
"""Columns of a cached-latents dataset -> the keys :func:`reflade.train.losses.encode_batch` returns (``kind``:
the layer kind's index into :data:`reflade.engine.schema.KINDS`, float32 like the others)."""


def encode_latents(
    encoders, batch: dict[str, Any], mixed_precision: bool | None = None
) -> dict[str, np.ndarray]:
    """A numpy batch as :func:`preprocess_row` makes it -> the cached-latents columns (:data:`LATENT_COLUMNS`),
    float32 numpy arrays, by the frozen encoders (a bundle or :class:`~reflade.train.model.FrozenEncoders`)."""
    from reflade.train.losses import encode_batch

    images, layers, canvases, texts, kinds = batch_to_tensors(batch)
    out = encode_batch(
        encoders, images, layers, canvases, texts, kinds=kinds, mixed_precision=mixed_precision
    )
    return {col: out[key].detach().float().cpu().numpy() for col, key in LATENT_COLUMNS.items() if key in out}


def _encode(bundle, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A batch -> the latents of a step: encoded here, or read from a cached-latents batch as they are (a cache
    written before the ``kind`` column trains every row as a foreground)."""
    if "lat_image" in batch:
        return {
            key: torch.as_tensor(np.ascontiguousarray(batch[col]), dtype=torch.float32)
            for col, key in LATENT_COLUMNS.items()
            if col in batch
        }
    from reflade.train.losses import encode_batch

    images, layers, canvases, texts, kinds = batch_to_tensors(batch)
    return encode_batch(bundle, images, layers, canvases, texts, kinds=kinds)


def _batch_len(batch: dict[str, Any]) -> int:
    return len(batch["text"]) if "text" in batch else len(batch["lat_image"])


class LatentEncoder:
    """Ray Data actor of the latent-caching pass: the frozen encoders, on a GPU when the pool has one.

    ``config``: as :func:`train_loop_per_worker`'s (``settings``, ``vae_ref``, ``weights_ref``, ``storage``,
    ``registry_prefix``, ``cache_dir``).
    """

    def __init__(self, config: dict[str, Any]):
        from reflade.train.model import build_encoders

        settings = TrainSettings(**config["settings"])
        if config.get("torch_threads"):
            torch.set_num_threads(int(config["torch_threads"]))
        device = "cuda" if torch.cuda.is_available() and settings.use_gpu else "cpu"
        registry = _worker_registry(config)
        kw: dict[str, Any] = {
            "registry": registry,
            "cache_dir": config.get("cache_dir"),
            "seed": settings.seed,
        }
        if settings.resolution:
            kw["resolution"] = settings.resolution
        if settings.preset == "tiny":
            kw["vae"] = config.get("vae_ref")
        else:
            kw["weights"] = config.get("weights_ref")
        self.encoders = build_encoders(settings.preset, device=device, **kw)
        self.mixed_precision = settings.bf16

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        return encode_latents(self.encoders, batch, self.mixed_precision)


# ---------------------------------------------------------------------------------------------- plain loop
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
        bundle: a :class:`~reflade.train.model.RefLayerBundle` (trained in place).
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


def _cycle(items: list) -> Iterator:
    while True:
        yield from items


@torch.no_grad()
def _load_ema(model: nn.Module, ema: dict[str, torch.Tensor]) -> None:
    named = dict(model.named_parameters())
    for k, v in ema.items():
        named[k].copy_(v)


# ---------------------------------------------------------------------------------------------- Ray loop
def _worker_registry(config: dict[str, Any]):
    """The registry inside a worker: endpoint, bucket and prefix from the driver, credentials from this
    process's environment (never shipped in the train config)."""
    from reflade.platform.worker import worker_registry

    return worker_registry(config["storage"], config["registry_prefix"])


def _build_bundle(
    settings: TrainSettings,
    vae_ref: str | None,
    registry,
    cache_dir: str | None,
    device=None,
    weights_ref: str | None = None,
):
    from reflade.train.model import build_reflayer

    kw: dict[str, Any] = {"registry": registry, "cache_dir": cache_dir, "seed": settings.seed}
    if settings.resolution:
        kw["resolution"] = settings.resolution
    if settings.preset == "tiny":
        kw["vae"] = vae_ref
    else:
        kw["weights"] = weights_ref
    return build_reflayer(settings.preset, device=device, **kw)


class CheckpointError(ReportedError, RuntimeError):
    """A checkpoint's ``state.pt`` cannot be loaded safely (or is not a training state)."""


_STATE_KEYS = ("model", "optimizer", "step", "ema", "settings")


def _save_state(
    folder: str, model: nn.Module, optimizer, step: int, ema, settings: TrainSettings, extra=None
) -> None:
    """Write ``state.pt``: tensors, numbers, strings and plain containers only, so that :func:`_load_state`
    reads it back with ``weights_only=True``."""
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "ema": ema,
            "settings": settings.to_dict(),
            **(extra or {}),
        },
        os.path.join(folder, _STATE),
    )


def _load_state(
    folder: str | os.PathLike, map_location: Any = "cpu", where: str | None = None
) -> dict[str, Any]:
    """Read a checkpoint's ``state.pt`` with ``torch.load(weights_only=True)``.

    Anyone who can write to the bucket can write a checkpoint: a full unpickler would run whatever code a planted
    ``state.pt`` names on every worker that resumes from it. The restricted unpickler accepts tensors, numbers,
    strings, ``None`` and plain containers (all a training state holds) and refuses anything else.

    Args:
        folder: the checkpoint's local folder.
        map_location: where the tensors go (``torch.load``'s argument).
        where: the checkpoint's name for messages (default: ``folder``).

    Raises:
        CheckpointError: the file is missing, holds other objects than those, or lacks a training state's keys.
    """
    import pickle

    path = os.path.join(folder, _STATE)
    where = where or str(folder)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {where} has no {_STATE}") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing to load {_STATE} of checkpoint {where}: it holds objects other than tensors, numbers, "
            f"strings and plain containers, which a training state never does ({first}). Someone other than "
            "`reflade train` wrote it: check who can write to the bucket, and remove the checkpoint."
        ) from None
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{_STATE} of checkpoint {where} is not a training state (missing {missing})")
    return state


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function (see the module docstring).

    ``config``: ``settings`` (dict of :class:`TrainSettings`), ``vae_ref``, ``storage`` (endpoint, bucket,
    region: no credentials), ``registry_prefix``, ``cache_dir``; ``metrics_jsonl`` (a local file rank 0 appends
    every report's metrics to, one JSON line each, for benchmarks on one node).
    """
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint, CheckpointUploadMode

    settings = TrainSettings(**config["settings"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("torch_threads") or torch.get_num_threads())))
    device = ray.train.torch.get_device()

    registry = _worker_registry(config)
    bundle = _build_bundle(
        settings,
        config.get("vae_ref"),
        registry,
        config.get("cache_dir"),
        weights_ref=config.get("weights_ref"),
    )
    bundle.to(device)
    bundle.set_gradient_checkpointing(settings.gradient_checkpointing)
    bundle.model.train()
    if settings.bf16 is None:
        settings.bf16 = device.type == "cuda"

    loss_module = PhaseLoss(bundle, settings)
    params = trainable_parameters(bundle.model, settings.phase)
    optimizer = make_optimizer(params, settings)
    ema = ema_init(bundle.model, settings.phase) if settings.ema_decay > 0 else None
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume_checkpoint"):
        ckpt = Checkpoint(path=config["resume_checkpoint"], filesystem=registry.storage.fs)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = _load_state(d, map_location=device, where=ckpt.path)
        bundle.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        if ema is not None and state.get("ema"):
            ema = {k: v.to(device) for k, v in state["ema"].items()}
    resumed_from = start
    # DDP after loading: prepare_model broadcasts rank 0's weights, the optimizer holds the same tensors.
    ddp_kwargs = {"find_unused_parameters": False}
    wrapped = (
        ray.train.torch.prepare_model(loss_module, move_to_device=False, parallel_strategy_kwargs=ddp_kwargs)
        if world > 1
        else loss_module
    )

    shard = ray.train.get_dataset_shard("train")
    step = start
    samples = 0
    window: list[float] = []
    t0 = time.perf_counter()
    last_report_t, last_report_step, last_report_samples = t0, step, 0
    last_ray_report_t = t0

    reads = {"shard_reads": 0}
    it = _epochs(shard, settings, rank, reads)
    step_times: list[float] = []
    last_report_call_s = None
    while step < settings.steps:
        t_step = time.perf_counter()
        micro, count = [], 0
        for _ in range(settings.grad_accum):
            b = next(it)
            micro.append(_encode(bundle, b))
            count += _batch_len(b)
        loss = train_step(wrapped, optimizer, micro, settings, step, rank=rank, ema=ema, model=bundle.model)
        step += 1
        samples += count
        window.append(loss)
        step_times.append(time.perf_counter() - t_step)
        do_ckpt = step % settings.checkpoint_every == 0 or step == settings.steps
        if not (do_ckpt or step % settings.report_every == 0):
            continue
        now = time.perf_counter()
        dt = max(now - last_report_t, 1e-9)
        steps_per_s = (step - last_report_step) / dt
        metrics = {
            "step": step,
            "loss": float(np.mean(window)),
            "steps_per_s": steps_per_s,
            "samples_per_s": (samples - last_report_samples) * world / dt,
            "lr": lr_at(step - 1, settings),
            "rank": rank,
            "world_size": world,
            "resumed_from": resumed_from,
            "param_checksum": param_checksum(bundle.model),
            "eta_s": (settings.steps - step) / steps_per_s if steps_per_s > 0 else None,
            "wall_s": now - t0,
            # Seconds of each optimiser step since the last report (data + encode + step), and of the last
            # ray.train.report call (a checkpoint's included): the step time around a checkpoint.
            "step_times_s": list(step_times),
            "last_report_call_s": last_report_call_s,
            "max_rss_mib": _max_rss_mib(),
            # Passes streamed over this worker's shard so far (1 once the first epoch is replayed from memory).
            "shard_reads": reads["shard_reads"],
        }
        if world > 1:
            metrics["max_rss_mib_per_rank"] = _gather_floats(metrics["max_rss_mib"], device)
            # Every rank's fingerprint of its weights: DDP keeps them equal, a divergence shows here.
            metrics["param_checksum_per_rank"] = _gather_floats(metrics["param_checksum"], device)
        window.clear()
        step_times.clear()
        last_report_t, last_report_step, last_report_samples = now, step, samples
        if rank == 0:
            print(
                f"[reflade train] step {step}/{settings.steps} loss {metrics['loss']:.4f} "
                f"{steps_per_s:.2f} steps/s {metrics['samples_per_s']:.1f} samples/s"
                + (f" ETA {metrics['eta_s']:.0f}s" if metrics["eta_s"] is not None else ""),
                flush=True,
            )
        if rank == 0 and config.get("metrics_jsonl"):
            with open(config["metrics_jsonl"], "a") as f:
                f.write(json.dumps({**metrics, "checkpoint": do_ckpt}) + "\n")
        t_report = time.perf_counter()
        if do_ckpt:
            # Only rank 0 writes the state; the other ranks report without a checkpoint (DDP keeps them equal).
            tmp = tempfile.mkdtemp(prefix="reflade-ckpt-") if rank == 0 else None
            checkpoint = None
            if tmp is not None:
                _save_state(tmp, bundle.model, optimizer, step, ema, settings)
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report(
                metrics,
                checkpoint=checkpoint,
                checkpoint_dir_name=f"{_CKPT_PREFIX}{step:08d}-{uuid.uuid4().hex[:6]}",
                checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                delete_local_checkpoint_after_upload=True,
            )
            last_ray_report_t = time.perf_counter()
        elif step == settings.steps or _since(t_report - last_ray_report_t, world, device) >= (
            settings.report_interval_s
        ):
            # Every rank calls report (Ray Train expects the same sequence on all ranks): the decision uses the
            # step and rank 0's clock.
            ray.train.report(metrics)
            last_ray_report_t = time.perf_counter()
        else:
            last_report_call_s = None
            continue
        last_report_call_s = time.perf_counter() - t_report


def _batch_bytes(batch: dict[str, Any]) -> int:
    """Bytes a numpy batch holds (an object column counts its items' own bytes, not the pointers)."""
    total = 0
    for v in batch.values():
        arr = np.asarray(v)
        if arr.dtype == object:
            total += sum(len(x) if isinstance(x, (bytes, str)) else np.asarray(x).nbytes for x in arr.ravel())
        else:
            total += arr.nbytes
    return total


def _epochs(
    shard, settings: TrainSettings, rank: int, stats: dict[str, int] | None = None
) -> Iterator[dict[str, Any]]:
    """The worker's batches, epoch after epoch, without end.

    The first epoch streams the shard; its batches are kept while they total at most ``settings.replay_mib``,
    and if the whole epoch fits, later epochs replay them from memory instead of restarting Ray Data's read
    (which costs more than a small dataset's whole epoch of steps). Otherwise every epoch streams again.
    ``stats["shard_reads"]`` counts the streamed passes."""
    limit = int(settings.replay_mib * 2**20)
    stats = {} if stats is None else stats
    while True:
        stats["shard_reads"] = stats.get("shard_reads", 0) + 1
        held: list[dict[str, Any]] | None = [] if limit > 0 else None
        size = n = 0
        for b in shard.iter_batches(batch_size=settings.batch_size, batch_format="numpy"):
            n += 1
            if held is not None:
                size += _batch_bytes(b)
                if size <= limit:
                    held.append(b)
                else:
                    held = None
            yield b
        if n == 0:
            raise RuntimeError(f"rank {rank}: the train split gave no rows")
        if held is not None:
            print(
                f"[reflade train] rank {rank}: replaying the first epoch's {n} batches ({size / 2**20:.1f} MiB) "
                "from memory from now on",
                flush=True,
            )
            yield from _cycle(held)


def _since(seconds: float, world: int, device) -> float:
    """Rank 0's ``seconds`` on every rank (a collective when there are several ranks)."""
    return seconds if world == 1 else _gather_floats(seconds, device)[0]


def _max_rss_mib() -> float:
    """Peak resident memory of this process, MiB (Linux reports kilobytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _gather_floats(value: float, device) -> list[float]:
    """One float from every rank, in rank order (a collective: every rank calls it at the same step)."""
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(x.item()) for x in out]


# ---------------------------------------------------------------------------------------------- driver
def _latest_checkpoint(storage, run_path: str):
    """The newest ``checkpoint-<step>-*`` folder of a run in the object store, as a Ray Checkpoint (or None)."""
    from pyarrow import fs as pafs
    from ray.train import Checkpoint

    try:
        infos = storage.fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    except OSError:
        return None
    dirs = [
        i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(_CKPT_PREFIX)
    ]
    if not dirs:
        return None

    def step_of(p: str) -> int:
        try:
            return int(p.rsplit("/", 1)[-1][len(_CKPT_PREFIX) :].split("-")[0])
        except ValueError:
            return -1

    best = max(dirs, key=step_of)
    return Checkpoint(path=best, filesystem=storage.fs)


def run_training(
    cfg,
    dataset_ref: str,
    settings: TrainSettings,
    *,
    vae_ref: str | None = None,
    weights_ref: str | None = None,
    resume: bool = False,
    run_name: str | None = None,
    cache_latents: bool = False,
    cache_workers: int = 1,
    cache_dir: str | os.PathLike | None = None,
    torch_threads: int | None = None,
    metrics_jsonl: str | os.PathLike | None = None,
    log: Callable[[str], Any] | None = print,
):
    """Train RefLayer with Ray Train on a dataset version and register ``model/reflayer`` (alias ``candidate``).

    Args:
        cfg: the platform configuration (object store, registry prefix).
        dataset_ref: dataset version; its ``train`` split is streamed.
        settings: :class:`TrainSettings`.
        vae_ref: tiny preset: the VAE (default ``weights/tiny-vae@latest``).
        weights_ref: sd3-medium: the diffusers SD3 checkpoint imported into the registry (default
            ``weights/sd3-medium@latest``); its transformer, VAE and text encoders.
        cache_latents: first run the frozen encoders over the train split in a Ray Data pass (actor pool of
            ``cache_workers``, one GPU each with ``settings.use_gpu``) and write the latents and text embeddings
            as Parquet under the run's folder (``latents/``); training then streams those instead of encoding
            every step. A resumed run reuses a complete cache.
        resume: continue run ``run_name`` from its last checkpoint (Ray Train v2 restores a run of the same name
            and storage path; the latest ``checkpoint-*`` folder found there is the fallback).
        run_name: name of the run under ``runs/train/`` in the bucket (default: a new unique one).
        cache_dir: local weights cache of the workers and of this process.
        torch_threads: intra-op threads of each worker's torch (default: torch's own choice in the worker).
        metrics_jsonl: a local file rank 0 appends each report's metrics to (JSON lines; one-node benchmarks).

    Returns:
        The registered ``Version`` (its ``metrics``: final loss, steps, samples/s, wall time).

    Raises:
        ValueError: ``resume`` without ``run_name``; RuntimeError: training failed or left no checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from reflade.engine.schema import read_dataset
    from reflade.platform.registry import Registry

    log = log or (lambda *_: None)
    registry = Registry.from_config(cfg)
    storage = registry.storage
    dataset = registry.resolve(dataset_ref)
    if settings.preset == "tiny":
        if weights_ref:
            raise ValueError("weights_ref is for sd3-medium; the tiny preset takes vae_ref")
        vae_ref = registry.resolve(vae_ref or "weights/tiny-vae@latest").ref
    else:
        if vae_ref:
            raise ValueError("sd3-medium takes its VAE from weights_ref, not vae_ref")
        weights_ref = registry.resolve(weights_ref or "weights/sd3-medium@latest").ref
    if cache_workers < 1:
        raise ValueError(f"cache_workers must be at least 1, got {cache_workers}")
    if resume and not run_name:
        raise ValueError("resume=True needs the run_name of the run to continue")
    run_name = run_name or f"reflayer-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    storage_path = storage.path("runs/train")
    run_path = f"{storage_path}/{run_name}"
    previous = _latest_checkpoint(storage, run_path)
    if previous is not None and not resume:
        raise ValueError(f"run {run_name} already has checkpoints: pass resume=True to continue it")

    from reflade.train.model import PRESETS

    resolution = int(settings.resolution or PRESETS[settings.preset].resolution)
    seed = settings.seed
    ds = read_dataset(registry, dataset.ref, "train").map(
        preprocess_row, fn_kwargs={"resolution": resolution, "seed": seed}
    )
    config = {
        "settings": settings.to_dict(),
        "vae_ref": vae_ref,
        "weights_ref": weights_ref,
        "storage": {
            "endpoint": storage.config.endpoint,
            "bucket": storage.config.bucket,
            "region": storage.config.region,
        },
        "registry_prefix": registry.prefix.rstrip("/"),
        "cache_dir": str(cache_dir) if cache_dir else None,
        # Ray Train v2 restores a run of the same name and storage path by itself (its checkpoint-manager
        # snapshot); this path is the fallback when no snapshot is there (resume_from_checkpoint is gone in v2).
        "resume_checkpoint": previous.path if (resume and previous is not None) else None,
        "run_path": run_path,
        "torch_threads": torch_threads,
        "metrics_jsonl": str(metrics_jsonl) if metrics_jsonl else None,
    }
    if cache_latents:
        ds = _cached_latents(
            ds, storage, f"runs/train/{run_name}/latents", config, settings, cache_workers, log
        )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.use_gpu,
            resources_per_worker={
                "CPU": settings.cpus_per_worker,
                **({"GPU": 1} if settings.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage.fs,
            failure_config=FailureConfig(max_failures=2),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ds},
    )
    log(
        f"training {settings.preset} ({settings.phase}) on {dataset.ref}: {settings.steps} steps, "
        f"{settings.workers} worker(s), run {run_name}"
        + (f", resuming from {previous.path}" if previous else "")
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise RuntimeError(f"training run {run_name} failed: {result.error}") from result.error
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"training run {run_name} reported no checkpoint")
    final = dict(result.metrics or {})

    log(f"fit done in {wall:.1f}s; loading the final checkpoint and registering")
    bundle = _build_bundle(
        settings, vae_ref, registry, str(cache_dir) if cache_dir else None, weights_ref=weights_ref
    )
    with checkpoint.as_directory() as d:
        state = _load_state(d, where=checkpoint.path)
    bundle.model.load_state_dict(state["model"])
    if state.get("ema"):
        _load_ema(bundle.model, state["ema"])

    parents = [dataset.ref] + ([vae_ref] if vae_ref else []) + ([weights_ref] if weights_ref else [])
    text_source = bundle.config.get("sources", {}).get("text_encoder")
    if text_source and _resolvable(registry, text_source):
        parents.append(registry.resolve(text_source).ref)
    metrics = {
        "loss": final.get("loss"),
        "steps": int(state["step"]),
        "samples_per_s": final.get("samples_per_s"),
        "steps_per_s": final.get("steps_per_s"),
        "shard_reads": final.get("shard_reads"),
        "wall_s": wall,
    }
    metadata = {
        "settings": settings.to_dict(),
        "preset": settings.preset,
        "resolution": resolution,
        "bundle": json.loads(json.dumps(bundle.config, default=str)),
        "run": {"name": run_name, "path": run_path, "checkpoint": checkpoint.path},
        "cached_latents": bool(cache_latents),
        "weights": "ema" if state.get("ema") else "raw",
    }
    with tempfile.TemporaryDirectory(prefix="reflade-model-") as tmp:
        bundle.save(tmp)
        version = registry.create(
            "model",
            "reflayer",
            tmp,
            parents=parents,
            metadata=metadata,
            metrics={k: v for k, v in metrics.items() if v is not None},
            source=f"reflade train ({run_name})",
            progress=False,
        )
    registry.set_alias(version.ref, "candidate")
    log(
        f"registered {version.ref} (alias candidate): loss {metrics['loss']}, {metrics['steps']} steps, "
        f"fit {wall:.1f}s, total {time.perf_counter() - t0:.1f}s"
    )
    version.run_name = run_name
    version.result = result
    return version


def _cached_latents(
    ds, storage, key: str, config: dict[str, Any], settings: TrainSettings, workers: int, log
):
    """The latent-caching pass: encode ``ds`` once into Parquet under ``key`` (or reuse a complete cache there)
    and return the dataset that reads it back."""
    import ray.data
    from ray.data import ActorPoolStrategy

    marker = f"{key}/_COMPLETE.json"
    path = storage.path(key)
    if storage.exists(marker):
        info, _ = storage.get_json(marker)
        log(f"reusing the cached latents of {info.get('rows')} rows at {storage.uri(key)}")
    else:
        t0 = time.perf_counter()
        leftovers = [o["Key"] for o in storage.list(f"{key}/")]
        if leftovers:  # an interrupted earlier pass: start the cache over rather than mix two writes
            log(f"removing {len(leftovers)} files of an incomplete latent cache")
            storage.delete(leftovers)
        log(f"caching latents and text embeddings ({workers} encoder actor(s)) to {storage.uri(key)} ...")
        encoded = ds.map_batches(
            LatentEncoder,
            fn_constructor_kwargs={"config": config},
            batch_size=max(1, settings.batch_size),
            batch_format="numpy",
            compute=ActorPoolStrategy(size=workers),
            num_cpus=settings.cpus_per_worker,
            num_gpus=1 if settings.use_gpu else 0,
        )
        encoded.write_parquet(path, filesystem=storage.fs)
        rows = ray.data.read_parquet(path, filesystem=storage.fs, file_extensions=["parquet"]).count()
        storage.put_json(
            marker, {"rows": rows, "seconds": time.perf_counter() - t0, "columns": list(LATENT_COLUMNS)}
        )
        log(f"cached {rows} rows in {time.perf_counter() - t0:.1f}s")
    return ray.data.read_parquet(path, filesystem=storage.fs, file_extensions=["parquet"])


def _resolvable(registry, text: str) -> bool:
    from reflade.platform.registry import Ref, RegistryError

    try:
        Ref.parse(text)
        registry.resolve(text)
        return True
    except (RegistryError, ValueError):
        return False


__all__ += [
    "LATENT_COLUMNS",
    "LatentEncoder",
    "encode_latents",
    "lr_at",
    "make_optimizer",
    "trainable_parameters",
    "ema_update",
    "ema_init",
    "step_generator",
]
