"""The latent cache: the frozen encoders run once over the train split (a Ray Data pass over
:class:`LatentEncoder` actors, one GPU each when training uses GPUs) and their output is written as Parquet
(:data:`LATENT_COLUMNS`) under the run's folder; training then streams those instead of encoding every step
(:func:`reflade.train.trainer.run_training` with ``cache_latents``). :func:`_encode` turns a batch of either kind
into the latents of a step.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from reflade.platform.worker import worker_registry
from reflade.train.config import TrainSettings
from reflade.train.preprocess import batch_to_tensors

__all__ = ["LATENT_COLUMNS", "LatentEncoder", "encode_latents"]


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
    float32 numpy arrays, by the frozen encoders (a bundle or :class:`~reflade.train.bundle.FrozenEncoders`)."""
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

    ``config``: as :func:`~reflade.train.ray_loop.train_loop_per_worker`'s (``settings``, ``vae_ref``,
    ``weights_ref``, ``storage``, ``registry_prefix``, ``cache_dir``).
    """

    def __init__(self, config: dict[str, Any]):
        from reflade.train.model import build_encoders

        settings = TrainSettings(**config["settings"])
        if config.get("torch_threads"):
            torch.set_num_threads(int(config["torch_threads"]))
        device = "cuda" if torch.cuda.is_available() and settings.use_gpu else "cpu"
        # Endpoint, bucket and prefix from the driver; credentials from this process's environment
        # (never shipped in the train config).
        registry = worker_registry(config["storage"], config["registry_prefix"])
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
