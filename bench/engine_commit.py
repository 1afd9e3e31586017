"""Benchmark: the data engine's commit, in place (staged shards copied server-side into the version) against the
commit it replaced (every staged shard read back through the driver, written to its disk and uploaded again).

Starts its own SeaweedFS (``weed mini``) on free ports in a temporary folder (``_bench_store.object_store``) and
stages ``--shards`` shards with the product's writer (``reflade.engine.staging.stage_shard``, markers included) of
``--rows-per-shard`` rows each (``_bench_store.noise_row``), whose ``image`` and ``layer`` columns are PNGs of uniform
noise of about ``--row-mb`` MB together (incompressible; the commit never decodes them). Then, per round (``--repeat``), each path commits the same run into a registry of its
own:

- ``old``: ``_commit`` of ``engine/pipeline.py`` as it was at commit ``--old-commit`` (436d869), loaded from git;
- ``new``: ``reflade.engine.commit.commit``.

Measured per path: wall seconds of the commit, and bytes through the driver: request bodies sent and object bodies
received by its boto3 client (``Storage.traffic``), plus, for the old path, the staged objects its pyarrow
filesystem read whole (``pq.read_table`` of each staged and quarantine shard; pyarrow's reads are not seen by boto3,
so they are counted as those objects' sizes).

Writes JSON with machine information to ``--out`` (default ``bench/results/cpu-2core/engine_commit.json``).

    .venv/bin/python bench/engine_commit.py [--shards 32] [--rows-per-shard 16] [--row-mb 2] [--repeat 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import numpy as np
from _bench_machine import sibling
from _bench_store import noise_row, object_store

from reflade.engine.commit import commit
from reflade.engine.config import EngineConfig
from reflade.engine.ingest import IngestResult, InputItem
from reflade.engine.plan import RunPlan
from reflade.engine.staging import marker, shard_name, stage_shard
from reflade.platform.registry import Registry
from reflade.platform.storage import Storage

ROOT = Path(__file__).resolve().parent.parent


def noise_side(row_mb: float) -> int:
    """Side in pixels of the noise rows whose image and layer PNGs hold about ``row_mb`` MB together (7 bytes a
    pixel: RGB + RGBA)."""
    return max(8, round(math.sqrt(row_mb * 1e6 / 7)))


def stage_run(storage: Storage, shards: int, per_shard: int, side: int) -> RunPlan:
    """A finished run's staging: ``shards`` shards of ``per_shard`` noise rows of ``side`` px with their markers, as
    the engine's writer stages them."""
    rng = np.random.default_rng(0)
    ecfg = EngineConfig()
    config_hash = ecfg.fingerprint()
    run_id = uuid.uuid4().hex[:16]
    run_prefix = f"runs/engine/commit-bench/{run_id}/"
    items = []
    for s in range(shards):
        rows = []
        for i in range(per_shard):
            sha = hashlib.sha256(f"{s}-{i}".encode()).hexdigest()
            items.append(InputItem(sha[:16], sha, f"raw/{sha}", f"noise{s}-{i}.png", side * side * 3))
            rows.append(noise_row(rng, sha, config_hash, side))
        ids = [r["source_id"] for r in rows]
        done = marker(
            ids,
            images_kept=len(ids),
            layers_kept=len(ids),
            layers_rejected=0,
            counts={"prefilter": [len(ids)] * 2},
        )
        stage_shard(storage, run_prefix, shard_name(ids), rows, [], done)
    inp = IngestResult(items=items, uploaded=0, already_there=len(items), description="bench", parents=[])
    return RunPlan(
        dataset="commit-bench",
        family="classical",
        ecfg=ecfg,
        inp=inp,
        weights=[],
        config_hash=config_hash,
        run_id=run_id,
        run_prefix=run_prefix,
        backend_names={},
        storage_fields={},
        registry_prefix="registry",
        items=list(items),
    )


def old_pipeline(commit_id: str) -> types.ModuleType:
    """``engine/pipeline.py`` as it was at ``commit_id``, as a module (its imports are still importable)."""
    source = subprocess.run(
        ["git", "show", f"{commit_id}:engine/pipeline.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType("bench_old_pipeline")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{commit_id}:engine/pipeline.py", "exec"), module.__dict__)
    return module


def measure(storage: Storage, fn) -> dict:
    t0 = time.perf_counter()
    with storage.traffic() as t:
        result = fn()
    return {
        "wall_s": time.perf_counter() - t0,
        "boto3_sent_bytes": t.sent,
        "boto3_received_bytes": t.received,
        "by_op": t.by_op,
        "dataset": result.dataset,
    }


def run(shards: int, per_shard: int, row_mb: float, repeat: int, old_commit: str) -> dict:
    old = old_pipeline(old_commit)
    side = noise_side(row_mb)
    rounds = []
    with object_store() as store:
        storage = store.storage
        t0 = time.perf_counter()
        plan = stage_run(storage, shards, per_shard, side)
        stage_s = time.perf_counter() - t0
        staged = sum(o["Size"] for o in storage.list(f"{plan.run_prefix}staged/"))
        quarantined = sum(o["Size"] for o in storage.list(f"{plan.run_prefix}quarantine/"))
        log = lambda *_: None  # noqa: E731
        for _ in range(repeat):
            reg_old = Registry(storage, prefix=f"bench-old-{uuid.uuid4().hex[:8]}")
            reg_new = Registry(storage, prefix=f"bench-new-{uuid.uuid4().hex[:8]}")
            o = measure(
                storage,
                lambda r=reg_old: old._commit(
                    storage,
                    r,
                    plan.run_prefix,
                    plan.run_id,
                    plan.dataset,
                    plan.inp,
                    [],
                    plan.config_hash,
                    plan.family,
                    [],
                    plan.ecfg,
                    0,
                    0,
                    time.monotonic(),
                    log,
                ),
            )
            o["pyarrow_read_bytes"] = staged + quarantined  # every staged and quarantine shard read whole
            o["driver_bytes"] = o["boto3_sent_bytes"] + o["boto3_received_bytes"] + o["pyarrow_read_bytes"]
            n = measure(
                storage, lambda r=reg_new: commit(plan, storage, r, t_start=time.monotonic(), log=log)
            )
            n["driver_bytes"] = n["boto3_sent_bytes"] + n["boto3_received_bytes"]
            rounds.append({"old": o, "new": n})

    def best(path: str) -> dict:
        return min((r[path] for r in rounds), key=lambda m: m["wall_s"])

    return {
        "staged": {
            "shards": shards,
            "rows": shards * per_shard,
            "row_mb": row_mb,
            "row_side_px": side,
            "staged_bytes": staged,
            "quarantine_bytes": quarantined,
            "stage_s": stage_s,
        },
        "old_commit": old_commit,
        "repeat": repeat,
        "rounds": rounds,
        "old": best("old"),
        "new": best("new"),
        "speedup": best("old")["wall_s"] / best("new")["wall_s"],
        "machine": sibling("registry").machine_info(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=32)
    p.add_argument("--rows-per-shard", type=int, default=16)
    p.add_argument("--row-mb", type=float, default=2.0, help="MB of image + layer bytes per row")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument(
        "--old-commit", default="436d869", help="git commit whose engine/pipeline.py holds the old _commit"
    )
    p.add_argument("--note", default="", help="Written into the JSON (e.g. what else the machine ran).")
    p.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "cpu-2core" / "engine_commit.json"
    )
    a = p.parse_args()
    result = run(a.shards, a.rows_per_shard, a.row_mb, a.repeat, a.old_commit)
    result["note"] = a.note
    st = result["staged"]
    print(
        f"{st['staged_bytes'] / 1e6:.0f} MB staged in {st['shards']} shards ({st['stage_s']:.1f} s to stage)"
    )
    for path in ("old", "new"):
        m = result[path]
        print(
            f"  {path}: {m['wall_s']:7.2f} s, through the driver {m['driver_bytes'] / 1e6:9.3f} MB "
            f"(boto3 sent {m['boto3_sent_bytes'] / 1e6:.3f} MB, received {m['boto3_received_bytes'] / 1e6:.3f} MB)"
        )
    print(f"  speedup {result['speedup']:.1f}x")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
