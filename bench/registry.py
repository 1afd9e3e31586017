"""Benchmark: registry operations against raw boto3 on the same SeaweedFS.

Starts its own SeaweedFS (``weed mini``) on free ports in a temporary folder (``_bench_store.object_store``), then
times, in one run:

(a) the registry: creating N versions of one name (small files, distinct content) and resolving M references
    (a mix of ``kind/name``, ``kind/name@N`` and ``kind/name@alias``);
(b) raw boto3 on the same server and bucket: N ``PutObject`` of the same bytes and M ``GetObject`` of small
    objects.

Prints a table (operation, count, total s, per-op ms, ops/s, HTTP requests per op, ratio registry/raw) and
writes JSON with machine information to ``bench/results/registry.json``. Every operation is sequential, one
thread, so the numbers are per-request latencies of this machine and server, not throughput under load.

    .venv/bin/python bench/registry.py [--versions 200] [--resolves 1000] [--size 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import botocore
from _bench_machine import cpu_model, usable_cpus
from _bench_store import BUCKET, object_store

from reflade.platform.registry import Registry
from reflade.platform.stack import weed_binary
from reflade.platform.storage import Storage

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "registry.json"


class RequestCounter:
    """Counts the HTTP requests a boto3 client sends (retries included)."""

    def __init__(self, client):
        self.n = 0
        client.meta.events.register("before-send.s3", self._count)

    def _count(self, **_):
        self.n += 1


def timed(label: str, count: int, fn, counter: RequestCounter) -> dict:
    """Run ``fn(i)`` for i in range(count), sequentially; return the row for the table."""
    before = counter.n
    t0 = time.perf_counter()
    for i in range(count):
        fn(i)
    total = time.perf_counter() - t0
    return {
        "operation": label,
        "count": count,
        "total_s": total,
        "per_op_ms": 1000 * total / count,
        "ops_per_s": count / total,
        "requests_per_op": (counter.n - before) / count,
    }


def machine_info() -> dict:
    try:
        out = subprocess.run([weed_binary(), "version"], capture_output=True, text=True, timeout=30).stdout
        weed = out.strip().splitlines()[0] if out.strip() else "unknown"
    except (OSError, subprocess.SubprocessError) as e:
        weed = f"unknown ({type(e).__name__})"
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "cpu_model": cpu_model(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "seaweedfs": weed,
        "boto3": boto3.__version__,
        "botocore": botocore.__version__,
    }


def print_table(rows: list[dict]) -> None:
    head = f"{'operation':<38} {'count':>6} {'total s':>8} {'per-op ms':>10} {'ops/s':>8} {'req/op':>7} {'reg/raw':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = f"{r['ratio_registry_raw']:.2f}x" if r.get("ratio_registry_raw") is not None else ""
        print(
            f"{r['operation']:<38} {r['count']:>6} {r['total_s']:>8.3f} {r['per_op_ms']:>10.2f} "
            f"{r['ops_per_s']:>8.1f} {r['requests_per_op']:>7.2f} {ratio:>8}"
        )


def run(versions: int, resolves: int, size: int, seed: int) -> dict:
    rng = random.Random(seed)
    with object_store() as store:
        work, cfg, storage, startup_s = store.work, store.config, store.storage, store.startup_s
        registry = Registry(storage, prefix=f"bench-{uuid.uuid4().hex[:8]}")
        raw = Storage(cfg).client  # a plain boto3 client, same endpoint and botocore settings
        reg_count, raw_count = RequestCounter(storage.client), RequestCounter(raw)

        # Inputs, not timed: distinct small files.
        src = work / "src"
        src.mkdir()
        blobs = [os.urandom(size) for _ in range(versions)]
        paths = []
        for i, b in enumerate(blobs):
            p = src / f"{i:05d}" / "part.bin"
            p.parent.mkdir()
            p.write_bytes(b)
            paths.append(p)
        raw_keys = [f"raw/{i:05d}/part.bin" for i in range(versions)]

        # Warm both clients' connection pools (not timed).
        for _ in range(5):
            raw.put_object(Bucket=BUCKET, Key="warmup", Body=b"w")
            raw.get_object(Bucket=BUCKET, Key="warmup")["Body"].read()
            storage.get_bytes("warmup")

        rows = []
        # (b) raw PUT first, then (a) registry create: both write the same bytes.
        raw_put = timed(
            "raw boto3 PutObject",
            versions,
            lambda i: raw.put_object(Bucket=BUCKET, Key=raw_keys[i], Body=blobs[i]),
            raw_count,
        )
        created: list[int] = []
        reg_create = timed(
            "registry create version",
            versions,
            lambda i: created.append(registry.create("dataset", "bench", paths[i], progress=False).version),
            reg_count,
        )
        assert created == list(range(1, versions + 1)), "versions were not numbered 1..N"
        reg_create["ratio_registry_raw"] = reg_create["per_op_ms"] / raw_put["per_op_ms"]

        # Aliases to resolve (not timed).
        registry.set_alias("dataset/bench@1", "production")
        registry.set_alias(f"dataset/bench@{max(1, versions // 2)}", "candidate")

        # The same mixed sequence of references for the registry; raw GETs of small objects for comparison.
        refs = []
        for i in range(resolves):
            r = i % 3
            if r == 0:
                refs.append(("latest", "dataset/bench"))
            elif r == 1:
                refs.append(("version", f"dataset/bench@{rng.randint(1, versions)}"))
            else:
                refs.append(("alias", f"dataset/bench@{rng.choice(['production', 'candidate'])}"))
        get_keys = [raw_keys[rng.randrange(versions)] for _ in range(resolves)]

        raw_get = timed(
            "raw boto3 GetObject (small)",
            resolves,
            lambda i: raw.get_object(Bucket=BUCKET, Key=get_keys[i])["Body"].read(),
            raw_count,
        )
        reg_resolve = timed(
            "registry resolve (mixed)", resolves, lambda i: registry.resolve(refs[i][1]), reg_count
        )
        reg_resolve["ratio_registry_raw"] = reg_resolve["per_op_ms"] / raw_get["per_op_ms"]
        by_form = []
        for form, label in (
            ("latest", "kind/name"),
            ("version", "kind/name@N"),
            ("alias", "kind/name@alias"),
        ):
            subset = [r for f, r in refs if f == form]
            row = timed(
                f"  registry resolve {label}",
                len(subset),
                lambda i, s=subset: registry.resolve(s[i]),
                reg_count,
            )
            row["ratio_registry_raw"] = row["per_op_ms"] / raw_get["per_op_ms"]
            by_form.append(row)

        # Sanity: the benchmark measured working operations.
        assert registry.resolve("dataset/bench").version == versions
        assert registry.read_bytes(f"dataset/bench@{versions}", "part.bin") == blobs[-1]

        rows = [raw_put, reg_create, raw_get, reg_resolve, *by_form]
        return {
            "benchmark": "registry",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "params": {
                "versions": versions,
                "resolves": resolves,
                "file_size_bytes": size,
                "seed": seed,
                "sequential": True,
                "max_attempts": cfg.max_attempts,
            },
            "machine": machine_info(),
            "seaweedfs_startup_s": startup_s,
            "rows": rows,
            "notes": [
                "One thread, one request at a time: per-op latency on this machine, server on localhost.",
                "registry create = list versions + content-index lookup + file PUT + conditional manifest PUT"
                " + content-index PUT; its cost grows with the number of existing versions (the listing).",
                "resolve kind/name lists the versions (latest is read from the listing); @N reads the manifest;"
                " @alias reads the alias then the manifest.",
                "The section (kind/name, @N, @alias) rows are timed in a second pass after the mixed pass.",
            ],
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(
            "Time the artifact registry against raw boto3 on a SeaweedFS this script starts (free ports, temp "
            "folder, stopped at the end): (a) create VERSIONS registry versions of one name (small distinct "
            "files) and resolve RESOLVES references (mixed kind/name, kind/name@N, kind/name@alias); (b) raw "
            "boto3 PutObject of the same VERSIONS objects and RESOLVES GetObject calls. Prints a table with the "
            "registry/raw ratio and writes JSON (with machine info) to --out."
        ),
    )
    ap.add_argument(
        "--versions", type=int, default=200, help="versions to create, and raw PUTs (default 200)"
    )
    ap.add_argument(
        "--resolves", type=int, default=1000, help="references to resolve, and raw GETs (default 1000)"
    )
    ap.add_argument("--size", type=int, default=1024, help="bytes per file/object (default 1024)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the reference mix (default 0)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result file (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.versions < 2 or args.resolves < 3 or args.size < 1:
        ap.error("need --versions >= 2, --resolves >= 3 and --size >= 1")

    result = run(args.versions, args.resolves, args.size, args.seed)
    m = result["machine"]
    print(
        f"registry vs raw boto3 | {m['cpu_count']} CPUs ({m['cpu_model']}) | Python {m['python']} | {m['seaweedfs']}"
    )
    print(f"{args.versions} versions of {args.size} B, {args.resolves} resolves, sequential, one thread\n")
    print_table(result["rows"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
