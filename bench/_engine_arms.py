"""bench/engine.py's inputs and arms: the records both arms read (synthetic scenes and bundled photos), (b) the plain
loop, (c) the machine's ceiling (plain processes side by side, no Ray), (f) Ray Data's own floor (stage code that
only sleeps), and the settings of (a), the product runs."""

from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Any

import cv2
import numpy as np
from _engine_report import summarize

from reflade.engine.config import EngineConfig
from reflade.engine.pipeline import input_blocks, largest_first, resolve_layout, run_stages_plain
from reflade.engine.synth import make_scene, scene_to_png_bytes

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
WARMUP_SEED0 = 100_000  # warm-up scenes use seeds from here: never among the timed seeds


def make_records(n_scenes: int, photos: bool, seeds: range | None = None) -> list[dict[str, Any]]:
    """Records for both arms: source_id, sha256, name and the PNG bytes inline."""
    out = []

    def add(source_id: str, png: bytes) -> None:
        out.append(
            {
                "source_id": source_id,
                "sha256": hashlib.sha256(png).hexdigest(),
                "name": f"{source_id}.png",
                "data": png,
            }
        )

    for seed in seeds if seeds is not None else range(n_scenes):
        add(
            f"scene-{seed:06d}", scene_to_png_bytes(make_scene(seed=seed, size=(256, 256), background="auto"))
        )
    if photos:
        import skimage.data

        for name in PHOTOS:
            rgb = getattr(skimage.data, name)()
            ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
            if not ok:
                raise RuntimeError(f"PNG encoding of {name} failed")
            add(f"photo-{name}", buf.tobytes())
    return out


def run_plain(records: list[dict[str, Any]], ecfg: EngineConfig) -> tuple[list[dict[str, Any]], float]:
    t0 = time.perf_counter()
    rows = run_stages_plain(records, ecfg, "classical", batch_size=ecfg.batch_size)
    return rows, time.perf_counter() - t0


def _ceiling_child(i, records, warm, ecfg, barrier, queue) -> None:
    """One of --cores plain processes: warm up, wait for the others, run its share, report."""
    run_plain(warm, ecfg)
    barrier.wait()
    t0 = time.perf_counter()
    c0 = time.process_time()
    rows, _ = run_plain(records, ecfg)
    fig = summarize(rows)
    queue.put((i, time.perf_counter() - t0, time.process_time() - c0, fig["images"], fig["stage_time_s"]))


def run_ceiling(records, warm, ecfg: EngineConfig, cores: int) -> dict[str, Any]:
    """(c) the machine's ceiling: --cores plain processes (spawned, no Ray) each run 1/cores of the images at once;
    what any parallel layout could reach here if it added nothing (it shows what cores do to each other: shared
    caches, memory bandwidth, SMT siblings)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # not fork: OpenMP (torch, OpenCV) in this process forbids it
    barrier, queue = ctx.Barrier(cores + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_ceiling_child, args=(i, records[i::cores], warm, ecfg, barrier, queue))
        for i in range(cores)
    ]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    parts = [queue.get() for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    images = sum(x[3] for x in parts)
    return {
        "processes": cores,
        "wall_s": wall,
        "images": images,
        "images_per_s": images / wall,
        "stage_time_s": sum(x[4] for x in parts),
        "cpu_per_image_ms": 1000 * sum(x[2] for x in parts) / images,
    }


def resources(cpu_actors: int, cores: float) -> tuple[float, float]:
    """CPUs per stage actor and per stage task: the engine's defaults (0.5, 0.5) when they fit, else the
    three actor pools (cpu_actors each) plus one task slot share the cores, in steps of 0.05."""
    if 3 * cpu_actors * 0.5 + 0.5 <= cores:
        return 0.5, 0.5
    per = math.floor(cores / (3 * cpu_actors + 1) * 20) / 20
    if per <= 0:
        raise ValueError(f"{cpu_actors} actors per pool do not fit on {cores} CPUs")
    return per, per


def engine_order(records: list[dict[str, Any]], order: str = "largest") -> list[dict[str, Any]]:
    """The records in the order the engine feeds its stages (``largest``: largest file first), or as given."""
    return largest_first(records, lambda r: len(r["data"])) if order == "largest" else records


class SleepStages:
    """``--floor``: stands in for the pre-filter and stages 2-6 in the fused actor. Sleeps, for each batch, the
    stage time its images took in the run just measured; uses no CPU and returns only the ids, so what is left of
    the run is Ray Data's own cost."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds = seconds
        self.constructed = time.time()  # when Ray Data got this actor as far as its constructor

    def __call__(self, batch):
        import pandas as pd

        ids = list(batch["source_id"])
        time.sleep(sum(self.seconds.get(i, 0.0) for i in ids))
        return pd.DataFrame({"source_id": ids, "pid": os.getpid(), "constructed": self.constructed})


def run_floor(ray, records, seconds: dict[str, float], ecfg: EngineConfig, actors: int) -> dict[str, Any]:
    """The floor run (see DEFINITIONS, "floor"): from_items in the engine's order and blocks -> one actor pool of
    ``SleepStages`` sized as the fused pool, consumed with ``iter_batches``."""
    from ray.data import ActorPoolStrategy

    n_blocks = input_blocks(len(records), ecfg.batch_size)
    t0_epoch, t0 = time.time(), time.perf_counter()
    ds = ray.data.from_items(engine_order(records), override_num_blocks=n_blocks).map_batches(
        SleepStages,
        fn_constructor_args=(seconds,),
        compute=ActorPoolStrategy(size=actors),
        num_cpus=ecfg.num_cpus_per_actor,
        batch_size=ecfg.batch_size,
        batch_format="pandas",
    )
    first, rows, constructed = None, 0, {}
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        first = time.perf_counter() - t0 if first is None else first
        rows += batch.num_rows
        for pid, t in zip(
            batch.column("pid").to_pylist(), batch.column("constructed").to_pylist(), strict=True
        ):
            constructed[pid] = t
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "first_batch_s": first if first is not None else wall,
        "images": rows,
        # Per actor of the pool that ran a batch: when its constructor ran, seconds after the run started.
        "actor_constructed_s": sorted(t - t0_epoch for t in constructed.values()),
    }


def make_settings(args) -> list[dict[str, Any]]:
    """The product runs, grouped by cluster configuration (stock Ray first)."""
    d = EngineConfig()
    out = []
    if args.stock:  # the engine with its default resources, on stock Ray
        out.append(
            {
                "layout": resolve_layout(d, "classical"),
                "defaults": True,
                "fused_actors": d.fused_actors,
                "cpu_actors": d.cpu_actors,
                "num_cpus_per_actor": d.num_cpus_per_actor,
                "num_cpus_per_task": d.num_cpus_per_task,
                "batch_size": d.batch_size,
                "keep_workers": False,
            }
        )
    if args.staged:  # the staged layout (one pool per model stage), for comparison
        for bs in args.batch_size:
            for actors in args.cpu_actors:
                cpa, cpt = resources(actors, args.cores)
                out.append(
                    {
                        "layout": "staged",
                        "defaults": False,
                        "fused_actors": d.fused_actors,
                        "cpu_actors": actors,
                        "num_cpus_per_actor": args.cpus_per_actor or cpa,
                        "num_cpus_per_task": args.cpus_per_task or cpt,
                        "batch_size": bs,
                        "keep_workers": args.keep_workers,
                    }
                )
    return sorted(out, key=lambda s: s["keep_workers"])  # stable: one cluster per configuration
