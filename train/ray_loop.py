"""The Ray Train worker loop (:func:`train_loop_per_worker`): DDP over the workers, data streamed by Ray Data.

Each worker builds the bundle (the frozen VAE and text encoder run inside the worker, unless the latents are
cached), resumes from :func:`ray.train.get_checkpoint` (a restarted worker group after a failure, or a rerun of
the same run name with ``resume=True``), streams its shard of the train split epoch after epoch
(:func:`_epochs`: the first epoch is replayed from memory when it fits) and steps with
:func:`reflade.train.step.train_step`.

Checkpoints (:mod:`reflade.train.checkpoint`): rank 0 writes, every rank reports; uploaded asynchronously so
training does not wait for the object store.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from reflade.platform.worker import worker_registry
from reflade.train.checkpoint import _CKPT_PREFIX, _load_state, _save_state
from reflade.train.config import TrainSettings
from reflade.train.latents import _batch_len, _encode
from reflade.train.step import (
    PhaseLoss,
    _cycle,
    ema_init,
    lr_at,
    make_optimizer,
    param_checksum,
    train_step,
    trainable_parameters,
)

__all__ = ["train_loop_per_worker"]


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

    # Endpoint, bucket and prefix from the driver; credentials from this process's environment
    # (never shipped in the train config).
    registry = worker_registry(config["storage"], config["registry_prefix"])
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
    # Every rank replays or none does: a rank that streamed its next epoch alone would wait for the others at
    # the split's next epoch.
    agree = (lambda fits: min(_gather_floats(float(fits), device)) > 0) if world > 1 else None
    it = _epochs(shard, settings, rank, reads, agree)
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
    shard,
    settings: TrainSettings,
    rank: int,
    stats: dict[str, int] | None = None,
    agree: Callable[[bool], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """The worker's batches, epoch after epoch, without end.

    The first epoch streams the shard; its batches are kept while they total at most ``settings.replay_mib``,
    and if the whole epoch fits, later epochs replay them from memory instead of restarting Ray Data's read
    (which costs more than a small dataset's whole epoch of steps). Otherwise every epoch streams again.
    ``stats["shard_reads"]`` counts the streamed passes. ``agree(fits) -> bool``, with several ranks: a collective
    at the end of each streamed epoch, true only when every rank's epoch fit (Ray Data's streaming split starts an
    epoch only when every rank asks for it, so the ranks must all replay or all stream)."""
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
        fits = held is not None
        if agree is not None:
            fits = agree(fits)
        if fits and held is not None:
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
