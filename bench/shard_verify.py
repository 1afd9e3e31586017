"""Benchmark: what checking each dataset shard's sha256 against the registry manifest costs the readers.

Starts its own SeaweedFS (``weed mini``) on free ports in a temporary folder, registers one dataset version of
``--shards`` Parquet shards (rows of ``--side`` px noise images and layers, ``_bench_store.noise_row``:
incompressible, so bytes per row are the worst case), then times, median of ``--repeat`` runs each:

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
import statistics
import time
import uuid
from pathlib import Path

import numpy as np
from _bench_machine import sibling
from _bench_store import noise_row, object_store

from reflade.engine import shard_integrity
from reflade.engine.schema import iter_rows, load_rows, read_dataset, shard_files, write_shard
from reflade.platform.registry import Registry


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
    rng = np.random.default_rng(0)
    with object_store() as store:
        storage, work = store.storage, store.work
        registry = Registry(storage, prefix=f"bench-{uuid.uuid4().hex[:8]}")
        (work / "ds" / "shards").mkdir(parents=True)
        for s in range(shards):
            shas = [hashlib.sha256(f"bench-{s}-{i}".encode()).hexdigest() for i in range(rows_per_shard)]
            rows = [noise_row(rng, sha, "bench", side) for sha in shas]
            write_shard(rows, str(work / "ds" / "shards" / f"part-{s:03d}.parquet"))
        v = registry.create("dataset", "verify-bench", work / "ds", progress=False)
        files = shard_files(v)
        total_bytes = sum(f["size"] for f in files)
        paths = [storage.path(v.key(f["path"])) for f in files]
        blobs = [(work / "ds" / f["path"]).read_bytes() for f in files]
        clear = shard_integrity.VERIFIED.clear

        t = {}
        t["sha256_in_memory_s"] = median_time(lambda: [hashlib.sha256(b).digest() for b in blobs], repeat)
        t["load_rows_unverified_s"] = median_time(lambda: list(iter_rows(paths, storage.fs)), repeat)
        t["load_rows_verified_cold_s"] = median_time(lambda: load_rows(registry, v.ref), repeat, clear)
        t["load_rows_verified_warm_s"] = median_time(lambda: load_rows(registry, v.ref), repeat)
        t["verify_shards_cold_s"] = median_time(
            lambda: shard_integrity.verify_shards(registry, v), repeat, clear
        )
        t["verify_shards_warm_s"] = median_time(lambda: shard_integrity.verify_shards(registry, v), repeat)
        if use_ray:
            import ray
            import ray.data

            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ray.data.read_parquet(paths, filesystem=storage.fs).materialize()  # warm the workers up
            checked = shard_integrity.verify_shards
            shard_integrity.verify_shards = lambda *_: 0  # the reader as it was before the check
            try:
                t["read_dataset_unverified_s"] = median_time(
                    lambda: read_dataset(registry, v.ref).materialize(), repeat
                )
            finally:
                shard_integrity.verify_shards = checked
            t["read_dataset_verified_cold_s"] = median_time(
                lambda: read_dataset(registry, v.ref).materialize(), repeat, clear
            )
            t["read_dataset_verified_warm_s"] = median_time(
                lambda: read_dataset(registry, v.ref).materialize(), repeat
            )
            ray.shutdown()
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
