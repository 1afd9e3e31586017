"""Benchmark: the data engine's whole product run (classical backends) on Ray against the same stage code in one
loop.

Inputs: ``--scenes`` synthetic scenes (``engine/synth.py``: 256x256, seeds 0..N-1, background ``auto``) plus
scikit-image's bundled colour photos (astronaut, coffee, chelsea, rocket), PNG-encoded in memory. Compared in ONE
run, on the same inputs, after an untimed warm-up of both arms (imports, pymatting's numba kernels, Ray workers):

(b) plain: ``run_stages_plain(records, ecfg, "classical")``: every stage, one process, one thread, the images in
    memory (first in each round of ``--repeat``);
(a) the product: ``run_engine`` (what ``reflade engine run`` calls) on a local Ray cluster this script starts
    (``num_cpus = --cores``, its own short temp dir) and a SeaweedFS of its own (``_engine_world.py``), with the
    images registered beforehand as a ``raw-images`` version (raw inputs sit in the bucket before a run). Timed:
    the whole call: ingest (the registry input's manifest), plan, the engine's dataset as ``build_dataset`` builds
    it (read from the bucket, pre-filter, the ``materialize`` barrier and near-duplicates, stages 2-6, the shard
    writer) run to the end, and the commit (a registered dataset version). Each run is a fresh dataset (nothing
    staged before). Its parts are reported (``RunResult.phases``; the writer's own seconds from the markers).
    Run once per setting:
      - ``defaults`` (the run compared with (b)): ``EngineConfig()`` on stock Ray: layout ``auto``, which on a
        CPU cluster is ``fused`` (stages 2-6 in one actor class ``LayerStages``, one actor per CPU);
      - ``--staged``: the staged layout once per ``--cpu-actors`` x ``--batch-size``, with idle Ray workers kept
        alive (``--keep-workers``), for comparison.
    Not timed: starting Ray (``ray_start_s``, reported: ``reflade engine run`` pays it unless a cluster is up)
    and reading the committed version back to compare it image by image with (b).
(c) ``--ceiling``: ``--cores`` plain processes (spawned, no Ray) run 1/cores of the images each at the same time:
    the speed-up this machine allows any parallel layout that added nothing.
(f) ``--floor`` (on by default): after each run of the defaults, Ray Data's own floor: ``from_items`` of the same
    records in the engine's order and blocks, one actor pool of the fused pool's size, with stage code that only
    sleeps each image's share of its batch's stage time in that run (from the markers): what Ray Data alone costs
    on this node for that schedule.

Thread counts are pinned to 1 in both arms (design.md, Pitfalls): ``OMP/MKL/OPENBLAS/NUMEXPR/NUMBA/OPENCV_FOR``
variables are set before anything imports numpy, ``cv2.setNumThreads(1)`` and ``torch.set_num_threads(1)`` in the
driver; every Ray worker inherits the variables from the raylet this script starts (``--thread-pinning
runtime-env``: as a job runtime_env + a ``worker_process_setup_hook`` instead); the counts seen in the driver, a Ray
task and a Ray actor are printed and stored.

The machine may be shared: each timed run records the CPU seconds of this process tree ("own": the driver, Ray's
daemons and workers, the object store), of other processes ("others") and idle, and waits first (``--wait-quiet``)
for the others to go quiet. Definitions are written into the JSON ("definitions").

    .venv/bin/python bench/engine.py [--scenes 256] [--no-photos] [--cpu-actors 1,2] [--batch-size 4] [--no-staged]
                                     [--quick]
"""

from __future__ import annotations

import os

# Pinned before numpy, OpenCV, numba or torch load (they read these once, at import).
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "NUMBA_NUM_THREADS": "1",
    "OPENCV_FOR_THREADS_NUM": "1",
}
os.environ.update(THREAD_ENV)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from _engine_cpu import CpuMeter, machine_info  # noqa: E402
from _engine_report import (  # noqa: E402
    DEFINITIONS,
    TARGET_OVERHEAD_PCT,
    TARGET_SPEEDUP,
    TIMED_STAGES,
    _arm,
    _public,
    _setting_label,
    print_tables,
    report,
    summarize_result,
    write,
)
from _engine_world import ProductWorld, read_back  # noqa: E402

from reflade.engine.config import EngineConfig  # noqa: E402
from reflade.engine.pipeline import (  # noqa: E402
    fused_pool_size,
    input_blocks,
    largest_first,
    resolve_layout,
    run_stages_plain,
)
from reflade.engine.synth import make_scene, scene_to_png_bytes  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "engine.json"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
PHASES = ("ingest", "plan", "connect", "barrier", "stages", "commit")
WARMUP_SEED0 = 100_000  # warm-up scenes use seeds from here: never among the timed seeds
IDLE_PROBE_S = 5.0  # before each timed Ray run: how long the idle cluster's own CPU use is measured
KEEP_WORKERS_CONFIG = {"idle_worker_killing_time_threshold_ms": 600_000}


# ---------------------------------------------------------------------------------------------- threads
def pin_threads() -> None:
    """Pin every thread pool this process may use to one thread (also the Ray workers' setup hook)."""
    os.environ.update(THREAD_ENV)
    import cv2 as _cv2

    _cv2.setNumThreads(1)
    if "torch" in sys.modules:  # torch reads OMP_NUM_THREADS when it loads; set it too if it is already in
        sys.modules["torch"].set_num_threads(1)


def thread_report() -> dict[str, Any]:
    """Thread counts as this process sees them (torch is imported here only to ask it)."""
    import numba
    import torch

    return {
        "pid": os.getpid(),
        "env": {k: os.environ.get(k) for k in THREAD_ENV},
        "cv2_threads": cv2.getNumThreads(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": int(numba.config.NUMBA_NUM_THREADS),
    }


class _ThreadProbe:
    """A Ray Data UDF that reports the thread counts of the worker it runs in (task or actor)."""

    def __call__(self, batch):
        import pandas as pd

        return pd.DataFrame([{"report": json.dumps(thread_report())}])


def _fmt_threads(t: dict[str, Any]) -> str:
    env = " ".join(f"{k.split('_NUM')[0]}={v}" for k, v in t["env"].items())
    return f"cv2={t['cv2_threads']} torch={t['torch_threads']} numba={t['numba_threads']} | {env}"


# ---------------------------------------------------------------------------------------------- inputs
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


# ---------------------------------------------------------------------------------------------- results
def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-image outcome and per-stage time sums from the pickled ``Work`` each output row carries."""
    stage_s: dict[str, float] = defaultdict(float)
    per_image: dict[str, list] = {}
    image_stage_s: dict[str, float] = {}
    quarantined: Counter[str] = Counter()
    layers_kept = 0
    for r in rows:
        work = pickle.loads(r["work"])
        for stage, secs in work.timings.items():
            stage_s[stage] += secs
        image_stage_s[r["source_id"]] = sum(work.timings.values())
        kept_layers = sum(bool(lay.ok) for lay in work.layers) if r["ok"] else 0
        layers_kept += kept_layers
        code = (r["reason"] or "").split(":", 1)[0]
        per_image[r["source_id"]] = [bool(r["ok"]), r["stage"] or "", code, kept_layers]
        if not r["ok"]:
            quarantined[f"{r['stage']}:{code}"] += 1
    total = sum(stage_s.values())
    return {
        "images": len(rows),
        "images_kept": sum(v[0] for v in per_image.values()),
        "images_quarantined": sum(not v[0] for v in per_image.values()),
        "quarantine_reasons": dict(sorted(quarantined.items())),
        "layers_kept": layers_kept,
        "stage_time_s": total,
        "stage_s": {s: stage_s.get(s, 0.0) for s in TIMED_STAGES},
        "stage_share": {s: (stage_s.get(s, 0.0) / total if total else 0.0) for s in TIMED_STAGES},
        "per_image": per_image,
        "image_stage_s": image_stage_s,
    }


def arm_figures(summary: dict[str, Any], wall: float, cores: float, cpu: dict[str, float]) -> dict[str, Any]:
    """Throughput and overheads of one timed run (see DEFINITIONS)."""
    n = summary["images"]
    stage = summary["stage_time_s"]
    capacity = cpu["machine_cpus"] * cpu["wall_s"]
    return {
        "wall_s": wall,
        "cores": cores,
        "images_per_s": n / wall if wall else 0.0,
        "overhead_per_image_ms": 1000 * (wall * cores - stage) / n if n else 0.0,
        "overhead_pct": 100 * (wall * cores - stage) / stage if stage else 0.0,
        "own_cpu_per_image_ms": 1000 * cpu["own_cpu_s"] / n if n else 0.0,
        "idle_pct": 100 * cpu["idle_cpu_s"] / capacity if capacity else 0.0,
        "foreign_pct": 100 * cpu["foreign_load"],
        "cpu": cpu,
    }


def compare(plain: dict[str, Any], ray_run: dict[str, Any]) -> list[str]:
    """Per-image differences between the arms (same code, same inputs: any difference is a bug)."""
    a, b = ray_run["per_image"], plain["per_image"]
    diffs = [f"{sid}: only in {'ray' if sid in a else 'plain'}" for sid in sorted(set(a) ^ set(b))]
    diffs += [
        f"{sid}: ray {a[sid]} != plain {b[sid]} (ok, stage, reason code, layers kept)"
        for sid in sorted(set(a) & set(b))
        if a[sid] != b[sid]
    ]
    return diffs


# ---------------------------------------------------------------------------------------------- arms
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


def floor_figures(
    run: dict[str, Any], slept_s: float, cores: float, by_title: dict[str, float]
) -> dict[str, Any]:
    """The floor's figures (DEFINITIONS: floor_idle_pct, floor_cpu_pct) from one floor run, the
    stage time it slept in all and the CPU seconds per process title; the pool's actors are the ``ray::MapWorker``
    titles (their CPU, start-up and Ray Data's per-batch work, is time the run waits for, inside the idle share)."""
    if slept_s <= 0:
        raise ValueError("the floor run slept no stage time: nothing to compare with")
    actors_cpu = sum(v for k, v in by_title.items() if k.startswith("ray::MapWorker"))
    others_cpu = sum(v for k, v in by_title.items() if not k.startswith("ray::MapWorker"))
    idle_pct = 100 * (run["wall_s"] * cores - slept_s) / slept_s
    cpu_pct = 100 * others_cpu / slept_s
    return {
        **run,
        "slept_s": slept_s,
        "actors_cpu_s": actors_cpu,
        "ray_cpu_s": others_cpu,
        "floor_idle_pct": idle_pct,
        "floor_cpu_pct": cpu_pct,
        "cpu_by_process": by_title,
    }


def probe_ray_threads(ray, cpus_per_actor: float, cpus_per_task: float) -> dict[str, Any]:
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items([{"x": 0}])
    task = ds.map_batches(_ThreadProbe(), num_cpus=cpus_per_task, batch_format="pandas").take_all()
    actor = ds.map_batches(
        _ThreadProbe, compute=ActorPoolStrategy(size=1), num_cpus=cpus_per_actor, batch_format="pandas"
    ).take_all()
    return {"ray_task": json.loads(task[0]["report"]), "ray_actor": json.loads(actor[0]["report"])}


def start_ray(ray, cores: int, keep_workers: bool, pinning: str = "inherit") -> str:
    """A local cluster of our own (never one from RAY_ADDRESS or `ray start`); returns its temp dir.

    ``pinning``: ``inherit`` (the raylet this process starts, and so every worker, inherits THREAD_ENV, set at
    the top of this file before anything imported numpy; OpenCV and torch read those variables at import) or
    ``runtime-env`` (the same variables as a job runtime_env plus a worker_process_setup_hook; Ray then starts
    each worker through its runtime-env agent and does not reuse its pre-started workers for the actors: about
    1 s more per actor start here). Either way ``probe_ray_threads`` checks the counts in a task and an actor."""
    # The setup hook and the probe are pickled by value, so workers need not import this file (bench/ is no
    # package); needed only when this module is imported rather than run as __main__.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    tmp = tempfile.mkdtemp(prefix="rlb-", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    kw = {"_system_config": dict(KEEP_WORKERS_CONFIG)} if keep_workers else {}
    ray.init(
        address="local",
        num_cpus=cores,
        include_dashboard=False,
        _temp_dir=tmp,
        runtime_env=(
            {"env_vars": dict(THREAD_ENV), "worker_process_setup_hook": pin_threads}
            if pinning == "runtime-env"
            else None
        ),
        log_to_driver=True,
        logging_level="warning",
        **kw,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    return tmp


# ---------------------------------------------------------------------------------------------- report
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


# ---------------------------------------------------------------------------------------------- main
def product_figures(res, back: dict[str, Any]) -> dict[str, Any]:
    """A product run's outcome in the plain arm's terms (``summarize``), from what it committed (``read_back``)."""
    stage_s = {st: back["stage_s"].get(st, 0.0) for st in TIMED_STAGES}
    total = sum(stage_s.values())
    per_image = back["per_image"]
    quarantined = Counter(f"{v[1]}:{v[2]}" for v in per_image.values() if not v[0])
    return {
        "images": len(per_image),
        "images_kept": sum(v[0] for v in per_image.values()),
        "images_quarantined": sum(not v[0] for v in per_image.values()),
        "quarantine_reasons": dict(sorted(quarantined.items())),
        "layers_kept": res.layers_kept,
        "stage_time_s": total,
        "stage_s": stage_s,
        "stage_share": {s: (stage_s[s] / total if total else 0.0) for s in TIMED_STAGES},
        "write_s": back["stage_s"].get("write", 0.0),
        "shards": back["shards"],
        "dataset": res.dataset,
        "per_image": per_image,
        "image_stage_s": back["image_stage_s"],
    }


def run(args) -> int:
    pin_threads()
    import torch

    torch.set_num_threads(1)
    meter = CpuMeter()
    records = make_records(args.scenes, args.photos)
    warm = make_records(0, False, seeds=range(WARMUP_SEED0, WARMUP_SEED0 + args.warmup))
    settings = make_settings(args)
    result: dict[str, Any] = {
        "benchmark": "engine",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
        "params": {
            "scenes": args.scenes,
            "scene_size": [256, 256],
            "scene_background": "auto",
            "scene_seeds": f"0..{args.scenes - 1}",
            "photos": list(PHOTOS) if args.photos else [],
            "images": len(records),
            "cores": args.cores,
            "backends": "classical",
            "repeat": args.repeat,
            "warmup_images": len(warm),
            "product": "run_engine (ingest, plan, build_dataset run to the end, commit) against a SeaweedFS of its "
            "own, the images registered as a raw-images version beforehand",
            "wait_quiet_s": args.wait_quiet,
            "quiet_below": args.quiet_below,
            "keep_workers_system_config": KEEP_WORKERS_CONFIG,
            "thread_pinning": args.thread_pinning,
        },
        "definitions": DEFINITIONS,
        "targets": {"speedup": TARGET_SPEEDUP, "ray_overhead_pct": TARGET_OVERHEAD_PCT},
        "machine": machine_info(),
        "threads": {"driver": thread_report()},
        "plain": None,
        "plain_runs": [],
        "ceiling": None,
        "ceiling_runs": [],
        "ray": [],
        "best": None,
        "summary": None,
        "mismatches": [],
    }
    m = result["machine"]
    print(
        f"data engine, classical backends | {m['cpu_count']} CPUs ({m['cpu_model']}) | Python {m['python']} | "
        f"ray {m['ray']}"
    )
    print(
        f"{len(records)} images ({args.scenes} scenes 256x256"
        + (f" + {len(PHOTOS)} photos" if args.photos else "")
        + f"), warm-up on {len(warm)} other scenes, {args.repeat} run(s) per arm and setting"
    )
    print(f"threads, driver (plain arm):  {_fmt_threads(result['threads']['driver'])}")

    def timed(fn):
        quiet = meter.wait_quiet(args.wait_quiet, args.quiet_below) if args.wait_quiet > 0 else None
        out, cpu, by_title = meter.measure(fn)
        return out, cpu, by_title, quiet

    base = EngineConfig(batch_size=args.batch_size[0])
    state: dict[str, Any] = {"per_image": None, "plain_cpu": None, "ray_start_s": None}

    def plain_round(rep: int) -> None:
        """(b): one timed plain run (no product run is going on)."""
        (rows, wall), cpu, _, quiet = timed(lambda: run_plain(records, base))
        fig = summarize(rows)
        if state["per_image"] is None:
            state["per_image"] = fig["per_image"]
        elif fig["per_image"] != state["per_image"]:
            raise SystemExit("the plain arm is not deterministic: two runs disagree")
        del rows
        fig.update(arm_figures(fig, wall, 1, cpu), batch_size=base.batch_size, repeat=rep, quiet=quiet)
        result["plain_runs"].append(_public(fig))
        result["plain"] = max(result["plain_runs"], key=lambda r: r["images_per_s"])
        state["plain_cpu"] = sum(r["own_cpu_per_image_ms"] for r in result["plain_runs"]) / len(
            result["plain_runs"]
        )
        write(result, args.out)
        print(
            f"(b) plain: {fig['images_per_s']:.2f} images/s ({wall:.1f} s, {fig['own_cpu_per_image_ms']:.0f} CPU "
            f"ms/image, others used {fig['foreign_pct']:.0f} % of the machine); wrote {args.out}"
        )

    def ray_round(ray, world: ProductWorld, s: dict[str, Any], rep: int) -> bool:
        """(a): one timed product run after an untimed one on the warm-up images; False on a mismatch."""
        plain = result["plain"]
        ecfg = EngineConfig(
            batch_size=s["batch_size"],
            layout=s["layout"],
            fused_actors=s["fused_actors"],
            cpu_actors=s["cpu_actors"],
            num_cpus_per_actor=s["num_cpus_per_actor"],
            num_cpus_per_task=s["num_cpus_per_task"],
        )
        if s["layout"] == "fused":
            s["actors"] = fused_pool_size(ecfg)  # the engine's choice on this cluster
        with warnings.catch_warnings():  # the warm-up's few blocks cannot feed every actor: Ray Data says so
            warnings.filterwarnings("ignore", message=".*only received.*input", category=UserWarning)
            world.run(state["warm_ref"], ecfg)
        time.sleep(1.0)  # the warm-up's actors exit
        _, idle_cpu, _ = meter.measure(lambda: time.sleep(IDLE_PROBE_S))
        (res, lines, wall), cpu, by_title, quiet = timed(lambda: world.run(state["input_ref"], ecfg))
        fig = product_figures(res, read_back(world, res, state["ids"]))
        fig.update(
            arm_figures(fig, wall, args.cores, cpu),
            setting=s,
            repeat=rep,
            quiet=quiet,
            phases_s={k: res.phases[k] for k in PHASES if k in res.phases},
            phase_share={k: res.phases[k] / wall for k in PHASES if k in res.phases},
            ray_start_s=state["ray_start_s"],
            speedup=fig["images"] / wall / plain["images_per_s"],
            contention=fig["stage_time_s"] / plain["stage_time_s"],
            cpu_by_process=by_title,
            cluster_idle_cores=idle_cpu["own_cpu_s"] / idle_cpu["wall_s"],
            log=lines,
        )
        fig["parallel_efficiency"] = fig["speedup"] / args.cores
        fig["cpu_overhead_pct"] = (
            100 * (fig["own_cpu_per_image_ms"] - state["plain_cpu"]) / state["plain_cpu"]
        )
        fig["cpu_bound_speedup"] = args.cores * state["plain_cpu"] / fig["own_cpu_per_image_ms"]
        diffs = compare({"per_image": state["per_image"]}, fig)
        fig["matches_plain"] = not diffs
        if diffs:
            result["mismatches"].append({"setting": s, "differences": diffs[:50], "count": len(diffs)})
        if args.floor and s.get("defaults") and s["layout"] == "fused":
            time.sleep(1.0)  # the measured run's actors exit
            seconds = dict(fig["image_stage_s"])
            frun, fcpu, ftitles, fquiet = timed(lambda: run_floor(ray, records, seconds, ecfg, s["actors"]))
            floor = floor_figures(frun, sum(seconds.values()), args.cores, ftitles)
            floor.update(quiet=fquiet, own_cpu_s=fcpu["own_cpu_s"], foreign_pct=100 * fcpu["foreign_load"])
            fig["floor"] = floor
            fig["above_floor_pct"] = fig["overhead_pct"] - floor["floor_idle_pct"]
            print(
                f"    floor (Ray Data alone: stage code that only sleeps): {floor['wall_s']:.1f} s, actors "
                f"constructed at {'/'.join(f'{t:.2f}' for t in floor['actor_constructed_s'])} s, first "
                f"batch {floor['first_batch_s']:.1f} s; core time unused {floor['floor_idle_pct']:.1f} % of stage "
                f"time (this run's overhead {fig['overhead_pct']:.1f} %: {fig['above_floor_pct']:.1f} % above it); "
                f"CPU of Ray's processes {floor['floor_cpu_pct']:.1f} % of stage time"
            )
        result["ray"].append(_public(fig))
        summarize_result(result)
        write(result, args.out)
        print(
            f"{_arm(s)} {_setting_label(s)}: {fig['images_per_s']:.2f} images/s ({wall:.1f} s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in fig["phases_s"].items())
            + f"; {fig['own_cpu_per_image_ms']:.0f} CPU ms/image, others used {fig['foreign_pct']:.0f} % of the "
            f"machine), {fig['speedup']:.2f}x plain, {res.dataset}"
            + ("" if not diffs else f", {len(diffs)} MISMATCHES")
        )
        time.sleep(1.0)  # let the finished run's actors exit before the next one starts
        return not diffs

    # Warm-up of the plain arm (imports, numba kernels, first-call caches); Ray's is per run (its workers).
    run_plain(warm, base)
    import ray

    status = 0
    groups = [
        [s for s in settings if s["keep_workers"] == keep]
        for keep in sorted({s["keep_workers"] for s in settings})
    ]

    def ceiling_round(rep: int) -> None:
        quiet = meter.wait_quiet(args.wait_quiet, args.quiet_below) if args.wait_quiet > 0 else None
        c = run_ceiling(records, warm, base, args.cores)
        plain = result["plain"]
        c.update(
            repeat=rep,
            quiet=quiet,
            speedup=c["images_per_s"] / plain["images_per_s"],
            contention=c["stage_time_s"] / plain["stage_time_s"],
        )
        result["ceiling_runs"].append(c)
        result["ceiling"] = max(result["ceiling_runs"], key=lambda r: r["images_per_s"])
        write(result, args.out)
        print(
            f"(c) ceiling: {args.cores} plain processes at once: {c['images_per_s']:.2f} images/s "
            f"({c['wall_s']:.1f} s, {c['cpu_per_image_ms']:.0f} CPU ms/image, stage time x{c['contention']:.2f} "
            f"of one process alone), {c['speedup']:.2f}x plain"
        )

    world = ProductWorld()  # before Ray starts: its workers inherit the object store's location
    try:
        state["input_ref"], state["ids"] = world.register_input(records, "bench-input")
        state["warm_ref"], _ = world.register_input(warm, "bench-warmup")
        for rep in range(args.repeat):  # rounds: plain, then every setting (one cluster per configuration)
            plain_round(rep)
            if args.ceiling:
                ceiling_round(rep)
            for group in groups:
                t0 = time.perf_counter()
                tmp = start_ray(ray, args.cores, group[0]["keep_workers"], args.thread_pinning)
                state["ray_start_s"] = time.perf_counter() - t0
                try:
                    check_threads(ray, group[0], result, rep)
                    for s in group:
                        if not ray_round(ray, world, s, rep):
                            status = 1
                finally:
                    ray.shutdown()
                    shutil.rmtree(tmp, ignore_errors=True)
    finally:
        world.close()

    print()
    print_tables(result)
    report(result, args)
    return status


def check_threads(ray, setting: dict[str, Any], result: dict[str, Any], rep: int) -> None:
    """Thread counts in a Ray task and a Ray actor: 1 everywhere, or the benchmark stops."""
    probe = probe_ray_threads(ray, setting["num_cpus_per_actor"], setting["num_cpus_per_task"])
    unpinned = [
        f"{where}: {key}={t[key]}"
        for where, t in probe.items()
        for key in ("cv2_threads", "torch_threads", "numba_threads")
        if t[key] != 1
    ]
    if unpinned:
        raise SystemExit("threads not pinned to 1 in the Ray workers: " + ", ".join(unpinned))
    if rep == 0:
        result["threads"].setdefault("ray_task", probe["ray_task"])
        result["threads"].setdefault("ray_actor", probe["ray_actor"])
        print(f"threads, Ray task:            {_fmt_threads(probe['ray_task'])}")
        print(f"threads, Ray actor:           {_fmt_threads(probe['ray_actor'])}")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(
            "Images per second through the data engine's six stages (classical backends): (a) the whole product "
            "run (run_engine: read from the bucket, pre-filter, barrier, stages 2-6, shard writer, commit) on a "
            "local Ray cluster this script starts (--cores CPUs) and an object store of its own, with the engine's "
            "defaults (layout auto: fused on a CPU cluster) on stock Ray, then the staged layout once per "
            "--cpu-actors x --batch-size with idle workers kept, for comparison; against (b) the same stage code in "
            "one plain process (run_stages_plain). Thread counts are pinned to 1 in both arms and printed. Prints a "
            "table (images/s, speed-up, per-stage shares, Ray overhead, CPU used by this run and by other "
            "processes) and writes JSON with machine info to --out after each run."
        ),
    )
    ap.add_argument(
        "--scenes", type=int, default=256, help="synthetic scenes, seeds 0..N-1, 256x256 (default 256)"
    )
    ap.add_argument(
        "--photos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add scikit-image's colour photos: " + ", ".join(PHOTOS) + " (default on)",
    )
    ap.add_argument(
        "--batch-size",
        type=_int_list,
        default=[EngineConfig().batch_size],
        help="images per Ray Data batch, comma-separated to compare several (default "
        f"{EngineConfig().batch_size}); the plain arm uses the first",
    )
    ap.add_argument(
        "--cpu-actors",
        type=_int_list,
        default=[1],
        help="staged runs: actors per stage pool, comma-separated to compare several (default 1)",
    )
    ap.add_argument(
        "--cpus-per-actor",
        type=float,
        default=None,
        help="CPUs reserved per stage actor (default: 0.5 when the pools fit, else cores/(3*actors+1))",
    )
    ap.add_argument(
        "--cpus-per-task",
        type=float,
        default=None,
        help="CPUs reserved per stage task (default: as --cpus-per-actor)",
    )
    ap.add_argument("--cores", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    ap.add_argument(
        "--stock",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the engine's defaults (EngineConfig(): layout auto, i.e. fused on a CPU cluster, one actor "
        "per CPU) on stock Ray: the run compared with (b) (default on)",
    )
    ap.add_argument(
        "--keep-workers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="for the staged runs, keep idle Ray workers alive ("
        + ", ".join(f"{k}={v}" for k, v in KEEP_WORKERS_CONFIG.items())
        + "; default on)",
    )
    ap.add_argument(
        "--staged",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the staged layout (engine.layout: staged: one actor pool per model stage) once per "
        "--cpu-actors x --batch-size, for comparison (default on)",
    )
    ap.add_argument(
        "--thread-pinning",
        choices=("inherit", "runtime-env"),
        default="inherit",
        help="how the Ray workers get the pinned thread variables: inherited from the raylet this script "
        "starts (default), or a job runtime_env + worker_process_setup_hook (slower actor start-up); the counts "
        "are checked in a task and an actor either way",
    )
    ap.add_argument(
        "--ceiling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run (c): --cores plain processes at once, each on 1/cores of the images, no Ray: the "
        "speed-up this machine allows any parallel layout (default on)",
    )
    ap.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after each run of the defaults, run Ray Data's own floor (from_items, one actor pool) with stage code that only sleeps each "
        "image's stage time: Ray Data's own cost on this node for that schedule, and how much of the run's "
        "overhead the product adds above it (default on)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="timed runs per arm and setting; the fastest of each is compared (default 1)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each timed run, wait up to this many seconds for other processes to use less "
        "than --quiet-below of the machine (0: never wait; default 60)",
    )
    ap.add_argument(
        "--quiet-below",
        type=float,
        default=0.1,
        help="share of the machine's CPUs others may use for it to count as quiet (default 0.1)",
    )
    ap.add_argument(
        "--warmup", type=int, default=6, help="untimed warm-up scenes before each arm's runs (default 6)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a short run for tests: 16 scenes, no photos, one Ray setting (the engine defaults on stock "
        "Ray), no staged runs, 2 warm-up scenes, no waiting",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result file (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.quick:
        args.scenes = min(args.scenes, 16)
        args.photos = False
        args.cpu_actors = args.cpu_actors[:1]
        args.batch_size = args.batch_size[:1]
        args.repeat = 1
        args.wait_quiet = 0.0
        args.stock = True
        args.staged = False
        args.ceiling = False
        args.warmup = min(args.warmup, 2)
    if args.scenes < 0 or (args.scenes == 0 and not args.photos):
        ap.error("need at least one image: --scenes >= 1 or --photos")
    if args.cores < 1 or args.repeat < 1 or args.warmup < 1:
        ap.error("--cores, --repeat and --warmup must be >= 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
