"""bench/engine.py's product arm: the world a product run needs (an object store of its own, a registry, the
benchmark's images registered as a raw-images version) and one product run (``run_engine``, the function
``reflade engine run`` calls, on the Ray cluster the benchmark started), read back image by image afterwards
(untimed) for the comparison with the plain loop.

The object store is a real SeaweedFS (``weed mini``) on free ports in a temporary folder, started by this process
(its CPU counts as the benchmark's own). Ray workers take its location and a 0600 credentials file from the
environment, set here before the benchmark starts Ray (design.md: credentials never travel in a runtime_env)."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from reflade.engine.config import EngineConfig
from reflade.engine.run import run_engine
from reflade.engine.run_result import RunResult
from reflade.engine.staging import done_markers
from reflade.platform.config import StorageConfig, load_config
from reflade.platform.registry import Registry
from reflade.platform.stack import SeaweedServer, find_free_base_port, generate_credentials
from reflade.platform.storage import Storage, write_credentials_file

BUCKET = "reflade-bench"
REGISTRY_PREFIX = "registry"


class ProductWorld:
    """An object store and a registry for product runs; ``close()`` stops the store and removes its folder."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="rlb-s3-", dir="/tmp"))
        self.server = SeaweedServer(self.tmp / "data", generate_credentials(), s3_port=find_free_base_port())
        self.server.start(timeout=60)
        self.server.create_bucket(BUCKET)
        creds = self.tmp / "aws_credentials"
        write_credentials_file(creds, self.server.credentials)
        # Inherited by the raylet the benchmark starts next, and so by every Ray worker.
        os.environ["REFLADE_STORAGE_ENDPOINT"] = self.server.endpoint
        os.environ["REFLADE_STORAGE_BUCKET"] = BUCKET
        os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(creds)
        self.storage = Storage(
            StorageConfig(
                endpoint=self.server.endpoint,
                bucket=BUCKET,
                access_key_id=self.server.credentials.access_key_id,
                secret_access_key=self.server.credentials.secret_access_key,
            )
        )
        self.registry = Registry(self.storage, REGISTRY_PREFIX)
        self.runs = 0

    def register_input(self, records: list[dict[str, Any]], name: str) -> tuple[str, dict[str, str]]:
        """Register ``records`` (``source_id``, ``data``: PNG bytes) as ``raw-images/<name>``, the way raw inputs
        sit in the bucket before a run; returns the reference and {engine source id: record source id}."""
        folder = self.tmp / "inputs" / name
        folder.mkdir(parents=True)
        for r in records:
            (folder / f"{r['source_id']}.png").write_bytes(r["data"])
        version = self.registry.create("raw-images", name, src=folder, progress=False)
        shutil.rmtree(folder)
        return version.ref, {r["sha256"][:16]: r["source_id"] for r in records}

    def config(self, ecfg: EngineConfig):
        cfg = load_config(None, env={})
        cfg.storage.endpoint = self.server.endpoint
        cfg.storage.bucket = BUCKET
        cfg.storage.access_key_id = self.server.credentials.access_key_id
        cfg.storage.secret_access_key = self.server.credentials.secret_access_key
        cfg.registry.prefix = REGISTRY_PREFIX
        eng = cfg.section("engine")
        for k, v in ecfg.__dict__.items():
            setattr(eng, k, v)
        return cfg

    def run(self, ref: str, ecfg: EngineConfig) -> tuple[RunResult, list[str], float]:
        """One product run over ``ref`` into a dataset of its own (a fresh run: nothing staged before); returns
        the result, the run's log lines and its wall seconds."""
        self.runs += 1
        lines: list[str] = []
        t0 = time.perf_counter()
        result = run_engine(
            self.config(ecfg),
            ref,
            f"bench-{self.runs:03d}",
            progress=False,
            log=lambda m: lines.append(str(m)),
        )
        return result, lines, time.perf_counter() - t0

    def close(self) -> None:
        self.server.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def read_back(world: ProductWorld, result: RunResult, ids: dict[str, str]) -> dict[str, Any]:
    """What a product run committed, per image and per stage (untimed, after the run): ``per_image`` as
    ``bench/engine.py``'s ``summarize`` gives it for the plain arm ([ok, stage, reason code, layers kept], by the
    benchmark's source ids), stage seconds from the run's markers (the stage code's ``Work.timings`` and the
    writer's ``write``), and each image's share of its batch's stage time (for the floor)."""
    import pyarrow.parquet as pq

    v = world.registry.resolve(result.dataset)
    layers: dict[str, int] = defaultdict(int)
    for f in v.files:
        if f["path"].startswith("shards/"):
            table = pq.read_table(io.BytesIO(world.registry.read_bytes(v, f["path"])), columns=["source_id"])
            for sid in table.column("source_id").to_pylist():
                layers[ids[sid]] += 1
    quarantine = pq.read_table(io.BytesIO(world.registry.read_bytes(v, "quarantine.parquet"))).to_pylist()
    per_image = {bench_id: [True, "", "", layers.get(bench_id, 0)] for bench_id in ids.values()}
    for q in quarantine:
        if q["entity_id"] is None and q["source_id"] in ids:
            per_image[ids[q["source_id"]]] = [False, q["stage"], q["reason_code"], 0]
    markers = done_markers(world.storage, f"runs/engine/{v.name}/{result.run_id}/")
    stage_s: dict[str, float] = defaultdict(float)
    image_s: dict[str, float] = {}
    for m in markers.values():
        work = {k: s for k, s in m["timings"].items() if k != "write"}
        for k, s in m["timings"].items():
            stage_s[k] += s
        for sid in m["source_ids"]:
            image_s[ids[sid]] = sum(work.values()) / len(m["source_ids"])
    return {
        "per_image": per_image,
        "stage_s": dict(stage_s),
        "image_stage_s": image_s,
        "shards": len(markers),
    }
