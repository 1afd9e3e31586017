"""Benchmark: what checking each dataset shard's sha256 against the registry manifest costs the readers.

Starts its own SeaweedFS (``weed mini``) on free ports in a temporary folder, registers one dataset version of
``--shards`` Parquet shards (rows of ``--side`` px noise images: incompressible, so bytes per row are the worst
case), then times, median of ``--repeat`` runs each:

- ``load_rows``: the reader before the check (``iter_rows`` through pyarrow's S3 filesystem), the checked reader on a
  fresh process cache (every shard hashed) and again with the cache warm (bytes read, not hashed);
- ``verify_shards`` (the driver's check in ``read_dataset``): cache cold (every shard streamed and hashed) and warm
  (one LIST of the version's shards);
- with Ray (not with ``--no-ray``): ``read_dataset(...).materialize()`` with the check (cache cold and warm) and
  without it (``verify_shards`` replaced by a no-op for that measurement: the reader as it was);
- sha256 alone over the shards' bytes in memory.

Writes JSON with machine information to ``--out`` (default ``bench/results/cpu-2core/shard_verify.json``).

    .venv/bin/python bench/shard_verify.py [--shards 8] [--rows-per-shard 24] [--side 384] [--repeat 3] [--no-ray]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from _bench_machine import sibling

from reflade.engine import schema
from reflade.engine.schema import SCHEMA_VERSION, encode_png, make_sample_id, write_shard
from reflade.platform.config import StorageConfig
from reflade.platform.registry import Registry
from reflade.platform.stack import SeaweedServer, find_free_base_port, generate_credentials
from reflade.platform.storage import Storage

BUCKET = "reflade-bench"


def noise_row(i: int, side: int) -> dict:
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    mask = np.zeros((side, side), bool)
    mask[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = True
    layer = np.zeros((side, side, 4), np.uint8)
    layer[mask, :3] = image[mask]
    layer[mask, 3] = 255
    sha = hashlib.sha256(f"bench-{i}".encode()).hexdigest()
    q = side // 4
    return {
        "schema_version": SCHEMA_VERSION,
        "sample_id": make_sample_id(sha, 0, "foreground", "bench"),
        "source_id": sha[:16],
        "source_sha256": sha,
        "image": encode_png(image),
        "width": side,
        "height": side,
        "layer": encode_png(layer),
        "visible_mask": encode_png(mask),
        "kind": "foreground",
        "category": "noise",
        "prompts": [
            {"type": "box", "granularity": "fine", "points": [], "box": [q, q, 3 * q, 3 * q], "mask": None}
            | {"text": None}
        ],
        "split": "train",
        "scores": {},
        "provenance": {"engine_version": "bench", "config_hash": "bench", "backends": {}, "weights": []},
    }


def median_time(fn, repeat: int, before=None) -> float:
    times = []
    for _ in range(repeat):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(shards: int, rows_per_shard: int, side: int, repeat: int, use_ray: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix="reflade-bench-"))
    server = SeaweedServer(work / "data", generate_credentials(), s3_port=find_free_base_port())
    try:
        server.start(timeout=60)
        server.create_bucket(BUCKET)
        storage = Storage(
            StorageConfig(
                endpoint=server.endpoint,
                bucket=BUCKET,
                access_key_id=server.credentials.access_key_id,
                secret_access_key=server.credentials.secret_access_key,
            )
        )
        registry = Registry(storage, prefix=f"bench-{uuid.uuid4().hex[:8]}")
        (work / "ds" / "shards").mkdir(parents=True)
        for s in range(shards):
            rows = [noise_row(s * rows_per_shard + i, side) for i in range(rows_per_shard)]
            write_shard(rows, str(work / "ds" / "shards" / f"part-{s:03d}.parquet"))
        v = registry.create("dataset", "verify-bench", work / "ds", progress=False)
        files = schema.shard_files(v)
        total_bytes = sum(f["size"] for f in files)
        paths = [storage.path(v.key(f["path"])) for f in files]
        blobs = [(work / "ds" / f["path"]).read_bytes() for f in files]
        clear = schema._VERIFIED.clear

        t = {}
        t["sha256_in_memory_s"] = median_time(lambda: [hashlib.sha256(b).digest() for b in blobs], repeat)
        t["load_rows_unverified_s"] = median_time(lambda: list(schema.iter_rows(paths, storage.fs)), repeat)
        t["load_rows_verified_cold_s"] = median_time(lambda: schema.load_rows(registry, v.ref), repeat, clear)
        t["load_rows_verified_warm_s"] = median_time(lambda: schema.load_rows(registry, v.ref), repeat)
        t["verify_shards_cold_s"] = median_time(lambda: schema.verify_shards(registry, v), repeat, clear)
        t["verify_shards_warm_s"] = median_time(lambda: schema.verify_shards(registry, v), repeat)
        if use_ray:
            import ray
            import ray.data

            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ray.data.read_parquet(paths, filesystem=storage.fs).materialize()  # warm the workers up
            checked = schema.verify_shards
            schema.verify_shards = lambda *_: 0  # the reader as it was before the check
            try:
                t["read_dataset_unverified_s"] = median_time(
                    lambda: schema.read_dataset(registry, v.ref).materialize(), repeat
                )
            finally:
                schema.verify_shards = checked
            t["read_dataset_verified_cold_s"] = median_time(
                lambda: schema.read_dataset(registry, v.ref).materialize(), repeat, clear
            )
            t["read_dataset_verified_warm_s"] = median_time(
                lambda: schema.read_dataset(registry, v.ref).materialize(), repeat
            )
            ray.shutdown()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    mb = total_bytes / 1e6
    return {
        "dataset": {"shards": shards, "rows": shards * rows_per_shard, "side_px": side, "bytes": total_bytes},
        "repeat": repeat,
        "seconds": t,
        "sha256_MB_per_s": mb / t["sha256_in_memory_s"],
        "load_rows_overhead_cold": t["load_rows_verified_cold_s"] / t["load_rows_unverified_s"] - 1,
        "load_rows_overhead_warm": t["load_rows_verified_warm_s"] / t["load_rows_unverified_s"] - 1,
        "read_dataset_overhead_cold": (
            t["read_dataset_verified_cold_s"] / t["read_dataset_unverified_s"] - 1 if use_ray else None
        ),
        "read_dataset_overhead_warm": (
            t["read_dataset_verified_warm_s"] / t["read_dataset_unverified_s"] - 1 if use_ray else None
        ),
        "machine": sibling("registry").machine_info(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--rows-per-shard", type=int, default=24)
    p.add_argument("--side", type=int, default=384)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--note", default="", help="Written into the JSON (e.g. what else the machine ran).")
    p.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "cpu-2core" / "shard_verify.json"
    )
    a = p.parse_args()
    result = run(a.shards, a.rows_per_shard, a.side, a.repeat, not a.no_ray)
    result["note"] = a.note
    print(
        f"{result['dataset']['bytes'] / 1e6:.1f} MB in {a.shards} shards; sha256 {result['sha256_MB_per_s']:.0f} MB/s"
    )
    for k, s in result["seconds"].items():
        print(f"  {k:<32} {s:8.3f} s")
    for k in (
        "load_rows_overhead_cold",
        "load_rows_overhead_warm",
        "read_dataset_overhead_cold",
        "read_dataset_overhead_warm",
    ):
        if result[k] is not None:
            print(f"  {k:<32} {100 * result[k]:+7.1f} %")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
