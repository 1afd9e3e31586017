"""Training RefLayer: the driver (:func:`run_training`, behind ``reflade train``) that runs a Ray Train job
and registers its model.

Data: the dataset's ``train`` split is read in place from the object store (:func:`reflade.engine.schema.
read_dataset`) and decoded by a Ray Data ``map`` before the trainer (:func:`reflade.train.preprocess.
preprocess_row`). The frozen VAE and text encoder run inside the worker (:func:`reflade.train.losses.
encode_batch`), or once in a latent-caching pass that keeps the kind beside the latents.

The parts, one module each:

- :mod:`reflade.train.preprocess`: a dataset row -> the trainer's input; a batch of those -> tensors.
- :mod:`reflade.train.step`: one optimiser step (the loss of a phase, the optimiser, the learning-rate schedule,
  EMA), shared by both loops.
- :mod:`reflade.train.latents`: the latent cache.
- :mod:`reflade.train.plain_loop`: the single-process loop (the benchmark's baseline, learning curves).
- :mod:`reflade.train.ray_loop`: the Ray Train worker loop.
- :mod:`reflade.train.checkpoint`: ``state.pt``, saved and loaded safely, and the newest checkpoint of a run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from reflade.train.checkpoint import _latest_checkpoint, _load_state
from reflade.train.config import TrainSettings
from reflade.train.latents import _cached_latents
from reflade.train.preprocess import preprocess_row
from reflade.train.ray_loop import _build_bundle, train_loop_per_worker
from reflade.train.step import _load_ema

__all__ = ["run_training"]


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


def _resolvable(registry, text: str) -> bool:
    from reflade.platform.registry import Ref, RegistryError

    try:
        Ref.parse(text)
        registry.resolve(text)
        return True
    except (RegistryError, ValueError):
        return False
