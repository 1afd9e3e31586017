"""bench/eval.py's own stack: an object store, a registry and what the evaluation scores (nothing of the caller's)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

BUCKET = "reflade-bench"


def make_dataset(folder: Path, items: int, size: int) -> dict[str, Any]:
    """Synthetic scenes (seeds 0, 1, ...) of ``size`` px until ``items`` test rows; the first ``items`` written as one
    shard under ``folder/shards`` (a dataset version's layout)."""
    from reflade.engine.config import EngineConfig
    from reflade.engine.pipeline import synthetic_rows
    from reflade.engine.schema import write_shard
    from reflade.engine.synth import make_scene

    rows: list[dict[str, Any]] = []
    scenes = 0
    while len(rows) < items:
        scene = make_scene(scenes, size=(size, size))
        rows += synthetic_rows(scene, f"scene-{scenes:06d}", "bench-eval", "test", EngineConfig())
        scenes += 1
    rows = rows[:items]
    (folder / "shards").mkdir(parents=True)
    write_shard(rows, str(folder / "shards" / "part-00000.parquet"))
    return {"rows": len(rows), "scenes": scenes, "foreground": sum(r["kind"] == "foreground" for r in rows)}


def start_world(root: Path, items: int, size: int) -> dict[str, Any]:
    """SeaweedFS on free ports with generated credentials (its location and a credentials file put in this process's
    environment, which Ray workers and child processes inherit), a registry under a fresh prefix holding the dataset
    (:func:`make_dataset`, registered as ``dataset/bench-eval``), the tiny RefLayer (random init, the product's tiny
    VAE, as tests/eval/test_eval_job.py builds it) and the stand-in feature networks. The caller stops ``server``."""
    from reflade.eval.network_convert import register_stand_ins
    from reflade.platform.config import load_config
    from reflade.platform.registry import Registry
    from reflade.platform.stack import SeaweedServer, find_free_base_port, generate_credentials
    from reflade.platform.storage import write_credentials_file
    from reflade.train.model import build_reflayer
    from reflade.train.text import MiniLMTextEncoder, minilm_folder
    from reflade.train.vae import build_tiny_vae

    data = make_dataset(root / "dataset", items, size)
    server = SeaweedServer(root / "seaweed" / "data", generate_credentials(), s3_port=find_free_base_port())
    server.start(timeout=60)
    try:
        server.create_bucket(BUCKET)
        write_credentials_file(root / "aws_credentials", server.credentials)
        where = {"REFLADE_STORAGE_ENDPOINT": server.endpoint, "REFLADE_STORAGE_BUCKET": BUCKET}
        os.environ.update(where, AWS_SHARED_CREDENTIALS_FILE=str(root / "aws_credentials"))
        keys = {
            "AWS_ACCESS_KEY_ID": server.credentials.access_key_id,
            "AWS_SECRET_ACCESS_KEY": server.credentials.secret_access_key,
        }
        cfg = load_config(
            env={**where, **keys, "REFLADE_REGISTRY_PREFIX": f"bench-eval-{uuid.uuid4().hex[:8]}"}
        )
        registry = Registry.from_config(cfg)
        dataset = registry.create("dataset", "bench-eval", root / "dataset", progress=False).ref
        text = MiniLMTextEncoder(minilm_folder())
        bundle = build_reflayer("tiny", vae=build_tiny_vae(size, seed=0), text=text, seed=0)
        model = registry.create("model", "reflayer", bundle.save(root / "model"), progress=False).ref
        networks = register_stand_ins(registry)
    except BaseException:
        server.stop()
        raise
    return {
        "server": server,
        "cfg": cfg,
        "data": data,
        "dataset": dataset,
        "model": model,
        "networks": networks,
    }
