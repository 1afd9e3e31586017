"""Benchmark: the data engine's six stages (classical backends) on Ray Data against the same code in one loop.

Inputs: ``--scenes`` synthetic scenes (``engine/synth.py``: 256x256, seeds 0..N-1, background ``auto``) plus
scikit-image's bundled colour photos (astronaut, coffee, chelsea, rocket), PNG-encoded in memory. Compared in ONE
run, on the same inputs, after an untimed warm-up of both arms (imports, pymatting's numba kernels, Ray workers):

(b) plain: ``run_stages_plain(records, ecfg, "classical")``: every stage, one process, one thread (first in each
    round of ``--repeat``, with no Ray cluster up);
(a) Ray Data on a local cluster this script starts (``num_cpus = --cores``, its own short temp dir):
    ``from_items`` (PNG bytes inline, largest first, as the engine orders its input) -> ``PreFilterStage`` (task)
    -> ``MarkDuplicates`` (task) -> ``add_layer_stages(ds, ecfg, "classical")`` (the engine's own pipeline),
    consumed with ``iter_batches``.
    Run once per setting:
      - ``defaults`` (the run compared with (b)): ``EngineConfig()`` on stock Ray: layout ``auto``, which on a
        CPU cluster is ``fused`` (stages 2-6 in one actor class ``LayerStages``, one actor per CPU, 0.5 CPU
        each; Ray Data fuses the pre-filter and MarkDuplicates tasks into the same actors);
      - ``--staged``: the staged layout (scene / completion / matting actor pools, prompts and post-filter
        tasks) once per ``--cpu-actors`` x ``--batch-size`` (CPUs per actor/task sized so the pools fit on
        --cores), with idle Ray workers kept alive (``--keep-workers``, see below), for comparison.
(c) ``--ceiling``: ``--cores`` plain processes (spawned, no Ray) run 1/cores of the images each at the same time:
    the speed-up this machine allows any parallel layout that added nothing (cores slow each other down through
    shared caches, memory bandwidth and SMT siblings); printed beside the Ray run's share of it.
(f) ``--floor`` (on by default): after each run of the defaults, the same pipeline shape (``from_items`` of the same
    records in the same blocks, one actor pool of the same size) with stage code that only sleeps each image's stage
    time from that run: what Ray Data alone costs on this node for that schedule (core time left unused, and CPU
    of its own processes), and how much of the run's overhead the engine's pipeline adds above it.

Thread counts are pinned to 1 in both arms (design.md, Pitfalls): ``OMP/MKL/OPENBLAS/NUMEXPR/NUMBA/OPENCV_FOR``
variables are set before anything imports numpy, ``cv2.setNumThreads(1)`` and ``torch.set_num_threads(1)`` in the
driver; every Ray worker inherits the variables from the raylet this script starts (``--thread-pinning
runtime-env``: as a job runtime_env + a ``worker_process_setup_hook`` instead, which slows actor start-up); the counts
seen in the driver, a Ray task and a Ray actor are printed and stored.

Near-duplicates: found once, from the pre-filter hashes of arm (b), and the same map is given to both arms'
``MarkDuplicates``; arm (a) has no ``materialize()`` barrier unless ``--barrier`` (the production pipeline's shape).

``--keep-workers``: Ray keeps about ``num_cpus`` idle workers and kills the others after 1 s idle
(``idle_worker_killing_time_threshold_ms``). On 2 CPUs the staged pipeline holds 3 stage actors and 3 Ray Data service
actors, so the workers that run the stage tasks are killed between batches and restarted (a Python start and the
stage imports each time). With the flag, that threshold is raised for the cluster this script starts.

The machine may be shared: each timed run records the CPU seconds of this process tree ("own": the driver, Ray's
daemons and workers), of other processes ("others") and idle, and waits first (``--wait-quiet``) for the others to
go quiet. Definitions (also written into the JSON, "definitions"):
  stage time    = sum over images of ``Work.timings`` (the stage code only: prefilter, scene, completion, matting,
                  prompts, postfilter; wall clock inside each stage), per arm;
  overhead %    = 100 * (wall * cores - stage time) / stage time, cores = 1 for (b) and --cores for (a): every
                  core-second not spent in stage code (idle cores, actor start-up, (de)serialisation, pandas <->
                  Arrow, scheduling, the driver; in (b) the pickling between stages and the frames). Stage times
                  are wall clock: where processes outnumber cores they include waiting for a core, and the
                  overhead then reads low (even negative); the CPU figures below do not have that flaw;
  steady ovh %  = the same over the steady window of (a), from the first output batch to the last, with the stage
                  time of the images that arrived in it: the per-image overhead without the run's fixed start-up
                  (cluster, actors, first batch);
  fixed ovh     = whole-run overhead - steady ovh % * stage time, in core-seconds: the cost per run (actor processes
                  started, their imports, the first batch), with the image count from which the whole-run overhead
                  would fall under the target at the steady rate;
  cluster idle  = CPU used by the driver and Ray's daemons and service actors while no dataset runs (5 s measured
                  before the timed run), as a share of a core and of the run's stage time;
  floor         = (f)'s unused core time, (wall * cores - slept) / slept: the overhead Ray Data alone leaves on
                  this schedule, comparable with the run's overhead; and, apart, the CPU of every process but its
                  actors (driver, daemons, service actors) / slept, which on busy cores slows the stage code;
  cpu ms/img    = CPU seconds of this process tree per image; cpu overhead % = (a) against (b);
  contention    = stage time (a) / stage time (b);
  speed-up      = images/s (a) / images/s (b); targets: >= 1.6 on 2 cores, Ray overhead < 5 %.

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
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from reflade.engine.config import EngineConfig  # noqa: E402
from reflade.engine.pipeline import (  # noqa: E402
    LayerStages,
    MarkDuplicates,
    PreFilterStage,
    add_layer_stages,
    fused_pool_size,
    input_blocks,
    largest_first,
    resolve_layout,
    run_stages_plain,
)
from reflade.engine.stages.prefilter import find_near_duplicates  # noqa: E402
from reflade.engine.synth import make_scene, scene_to_png_bytes  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "engine.json"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
TIMED_STAGES = ("prefilter", "scene", "completion", "matting", "prompts", "postfilter")
WARMUP_SEED0 = 100_000  # warm-up scenes use seeds from here: never among the timed seeds
TARGET_SPEEDUP = 1.6
TARGET_OVERHEAD_PCT = 5.0
IDLE_PROBE_S = 5.0  # before each timed Ray run: how long the idle cluster's own CPU use is measured
SAMPLE_INTERVAL_S = 1.0  # CpuMeter: how often it reads the process tree (a process that exits between two
# readings loses at most this long of its CPU from the figures; the stage actors live to the end of a run)
KEEP_WORKERS_CONFIG = {"idle_worker_killing_time_threshold_ms": 600_000}
DEFINITIONS = {
    "stage_time_s": "sum over images of Work.timings (stage code only, wall clock: "
    + ", ".join(TIMED_STAGES)
    + ")",
    "overhead_pct": "100 * (wall_s * cores - stage_time_s) / stage_time_s; cores = 1 for plain, --cores for ray. "
    "Reads low (even negative) when processes outnumber cores: stage times then include waiting",
    "overhead_per_image_ms": "1000 * (wall_s * cores - stage_time_s) / images",
    "own_cpu_per_image_ms": "1000 * CPU seconds of this process tree (driver, Ray's daemons and workers, reaped "
    "ones included) during the run / images",
    "cpu_overhead_pct": "100 * (own_cpu_per_image_ms(ray) - mean own_cpu_per_image_ms(plain)) / the latter: the "
    "extra CPU the Ray arm burns per image (worker start-up, serialisation, Arrow/pandas, "
    "daemons, driver)",
    "idle_pct": "100 * idle CPU seconds of the machine / (machine CPUs * wall_s): cores nobody used",
    "foreign_pct": "100 * CPU seconds of other processes / (machine CPUs * wall_s): the machine may be shared",
    "contention": "stage_time_s(ray) / stage_time_s(plain)",
    "speedup": "images_per_s(ray) / images_per_s(plain)",
    "parallel_efficiency": "speedup / cores",
    "wall_s": "ray: from from_items() to the last output batch (actor start-up included); plain: the whole call",
    "first_batch_s": "ray: from from_items() to the first output batch",
    "steady_images_per_s": "ray: images after the first output batch / time from the first to the last batch",
    "cpu_by_process": "ray: CPU seconds per process title (sampled every 1 s; a worker is named by its last "
    "title, ray::IDLE for a task worker between tasks)",
    "cpu_bound_speedup": "cores * mean own_cpu_per_image_ms(plain) / own_cpu_per_image_ms(ray): the speed-up on "
    "a quiet machine if no core idled (an upper bound; unbiased by other processes, which "
    "take a larger share of the CPU from one plain process than from several Ray workers)",
    "steady_overhead_pct": "ray: 100 * (steady window * cores - stage time of the images that arrived in it) / "
    "that stage time; the steady window runs from the first output batch to the last (cluster and actor "
    "start-up, a fixed cost per run, excluded)",
    "fixed_overhead_core_s": "ray: (wall_s * cores - stage_time_s) - steady_overhead_pct / 100 * stage_time_s: the "
    "part of the whole run's overhead that the steady per-image rate does not explain, a cost per run (starting the "
    "actors' processes and imports before the first batch)",
    "break_even_images": "ray: images from which the whole-run overhead would fall under the target at this run's "
    "steady per-image overhead: fixed_overhead_core_s / ((target - steady_overhead_pct) / 100 * stage_time_s / "
    "images); null when the steady overhead is not under the target",
    "cluster_idle_cores": "ray: CPU seconds per second used by this process tree (the driver, Ray's daemons and its "
    "service actors) while no dataset runs, measured for IDLE_PROBE_S just before the timed run",
    "cluster_background_pct": "ray: 100 * cluster_idle_cores * wall_s / stage_time_s: the share of the overhead "
    "that the idle cluster's own processes would take over this run's wall time, whatever the pipeline",
    "floor": "ray, defaults runs with --floor: the same Ray Data pipeline shape (from_items of the same records in "
    "the same blocks, one actor pool of the same size, CPUs and batch size) with stage code that only sleeps each "
    "image's stage time from the run just measured: no CPU, no output but the ids. What Ray Data costs on this "
    "node whatever the stages do",
    "actor_constructed_s": "floor: per actor of the pool, when its constructor ran (seconds after from_items()): "
    "Ray Data's start-up for an actor class that imports nothing of the engine",
    "floor_idle_pct": "floor: 100 * (wall_s * cores - slept_s) / slept_s: the core time the floor run left unused "
    "(the pool's start-up with Ray Data's imports, scheduling, gaps between batches, the tail); the same formula as "
    "overhead_pct, so comparable with it: what Ray Data alone leaves of the overhead the target is judged by",
    "floor_cpu_pct": "floor: 100 * CPU seconds of every process of the tree but the pool's actors (the driver with "
    "Ray Data's executor, Ray's daemons and service actors, this script's 1 Hz sampler) / slept_s. In the floor "
    "run it uses cores the sleeping stages leave free; in a measured run, whose cores are busy, it takes them from "
    "the stage code, whose times (wall clock) then include the wait: it shows up in contention and in the speed-up, "
    "not in overhead_pct",
    "above_floor_pct": "overhead_pct - floor_idle_pct: the part of the whole-run overhead that the engine's pipeline "
    "adds above Ray Data's own (its imports and first calls, moving its records, pickling)",
    "best": "the run compared: the engine defaults (EngineConfig(), stock Ray), else the fastest Ray run; "
    "plain: the fastest plain run",
}


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


# ---------------------------------------------------------------------------------------------- CPU accounting
class CpuMeter:
    """CPU seconds of this process tree (the driver, Ray's raylet/GCS and its workers) and of the whole machine:
    the machine may be shared, so every timed section also says how busy the others kept it."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.root = psutil.Process()
        self.cpus = psutil.cpu_count() or 1
        self._seen: dict[int, tuple[str, float]] = {}
        self._base: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _tree(self) -> dict[int, tuple[str, float]]:
        """pid -> (title, CPU seconds) of this process and its descendants. One walk costs about 3 ms of CPU here
        (psutil reads every process of the machine to find the descendants), and the sampler competes with the
        Ray arm's workers for the cores: hence SAMPLE_INTERVAL_S."""
        out = {}
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                title = "driver" if p.pid == self.root.pid else (p.cmdline() or [p.name()])[0]
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
            out[p.pid] = (os.path.basename(title) if "/" in title else title, t.user + t.system)
        return out

    def snapshot(self) -> tuple[float, Any, float]:
        """(time, machine CPU times, CPU seconds of this tree: live processes plus the tree's reaped ones)."""
        tree = self._tree()
        with self._lock:
            self._seen.update(tree)
            own = sum(c for _, c in self._seen.values())
        return time.perf_counter(), self.psutil.cpu_times(), own

    def start(self) -> None:
        """Remember every process of the tree from now on (workers that exit mid-run keep their last reading)."""
        self._seen = {}
        self._base = {pid: c for pid, (_, c) in self._tree().items()}
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            tree = self._tree()
            with self._lock:
                self._seen.update(tree)

    def stop(self) -> dict[str, float]:
        """CPU seconds per process title since start()."""
        self._stop.set()
        if self._thread:
            self._thread.join()
            self._thread = None
        self._seen.update(self._tree())
        by_title: dict[str, float] = defaultdict(float)
        for pid, (title, c) in self._seen.items():
            by_title[title] += c - self._base.get(pid, 0.0)
        return {k: round(v, 2) for k, v in sorted(by_title.items(), key=lambda kv: -kv[1]) if v >= 0.05}

    def delta(self, a, b) -> dict[str, float]:
        (t0, c0, o0), (t1, c1, o1) = a, b

        def d(name: str) -> float:
            return getattr(c1, name, 0.0) - getattr(c0, name, 0.0)

        busy = d("user") + d("nice") + d("system") + d("irq") + d("softirq")
        own = o1 - o0
        wall = t1 - t0
        return {
            "wall_s": wall,
            "machine_cpus": self.cpus,
            "own_cpu_s": own,
            "foreign_cpu_s": max(0.0, busy - own),
            "idle_cpu_s": d("idle") + d("iowait"),
            "steal_cpu_s": d("steal"),
            "foreign_load": max(0.0, busy - own) / (self.cpus * wall) if wall else 0.0,
        }

    def measure(self, fn):
        """Run ``fn()``; return its result, the CPU accounting and the CPU seconds per process title."""
        self.start()
        a = self.snapshot()
        try:
            out = fn()
        finally:
            by_title = self.stop()
        b = self.snapshot()
        return out, self.delta(a, b), by_title

    def wait_quiet(self, max_wait: float, below: float, window: float = 2.0) -> dict[str, Any]:
        """Wait (at most ``max_wait`` s) until other processes use less than ``below`` of the machine."""
        t0 = time.perf_counter()
        while True:
            self._seen = {}
            a = self.snapshot()
            time.sleep(window)
            load = self.delta(a, self.snapshot())["foreign_load"]
            waited = time.perf_counter() - t0
            if load < below or waited >= max_wait:
                return {
                    "waited_s": round(waited, 1),
                    "foreign_load_before": round(load, 3),
                    "quiet": load < below,
                }


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


def near_duplicates(rows: list[dict[str, Any]], ecfg: EngineConfig) -> dict[str, str]:
    """The map ``run_stages_plain`` computed (from the pre-filter hashes of the images that passed it)."""
    pairs = [
        (r["source_id"], int(r["phash"]))
        for r in rows
        if not (not r["ok"] and r["stage"] == "prefilter") and int(r["phash"])
    ]
    return find_near_duplicates(pairs, ecfg.dup_hamming)


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


def overhead_parts(fig: dict[str, Any], idle_cores: float) -> dict[str, Any]:
    """A Ray run's overhead split into a cost per run and a cost per image, and the idle cluster's share of it
    (see DEFINITIONS: fixed_overhead_core_s, break_even_images, cluster_idle_cores, cluster_background_pct)."""
    stage, n = fig["stage_time_s"], fig["images"]
    total = fig["wall_s"] * fig["cores"] - stage
    steady = fig.get("steady_overhead_pct")
    fixed = total - steady / 100 * stage if steady is not None else None
    break_even = None
    if fixed is not None and steady < TARGET_OVERHEAD_PCT and n and stage:
        break_even = max(n, math.ceil(fixed / ((TARGET_OVERHEAD_PCT - steady) / 100 * stage / n)))
    return {
        "fixed_overhead_core_s": fixed,
        "break_even_images": break_even,
        "cluster_idle_cores": idle_cores,
        "cluster_background_pct": 100 * idle_cores * fig["wall_s"] / stage if stage else None,
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


class TimedLayerStages(LayerStages):
    """``LayerStages`` that appends the wall-clock times (``time.time()``) of its constructor and of each call (with
    the calling thread's CPU time, ``time.thread_time()``) to a file of its own under ``log_dir`` (set on the class
    before the dataset is built: the class is pickled by value, its attributes with it). Used by ``--timeline``
    only: the figures of a run without it never include this."""

    log_dir = ""

    def __init__(self, *args):
        t = time.time()
        super().__init__(*args)
        self._log = os.path.join(self.log_dir, f"{os.getpid()}.txt")
        self._append(f"init {t} {time.time()}\n")

    def _append(self, line: str) -> None:
        with open(self._log, "a") as f:
            f.write(line)

    def __call__(self, batch):
        t, c = time.time(), time.thread_time()
        out = super().__call__(batch)
        self._append(f"call {t} {time.time()} {time.thread_time() - c}\n")
        return out


def actor_timeline(log_dir: str, t0_epoch: float, wall: float) -> list[dict[str, Any]]:
    """Per fused actor, from ``TimedLayerStages``' files: when its constructor started (seconds after the run
    started) and how long it took, its first call and the mean of the later ones, the mean gap between calls (the
    pre-filter and MarkDuplicates, fused before it in the same task, included), how long it sat idle at the end
    of the run, and the CPU time of the calling thread during the calls (``busy_cpu_s``: under ``busy_s`` when
    other processes or the actor's own Ray threads took the core)."""
    out = []
    for f in sorted(Path(log_dir).glob("*.txt")):
        init, calls, cpu = None, [], 0.0
        for line in f.read_text().splitlines():
            kind, a, b, *rest = line.split()
            if kind == "init":
                init = (float(a), float(b))
            else:
                calls.append((float(a), float(b)))
                cpu += float(rest[0])
        if init is None:
            continue
        gaps = [calls[i + 1][0] - calls[i][1] for i in range(len(calls) - 1)]
        later = [b - a for a, b in calls[1:]]
        out.append(
            {
                "constructor_start_s": init[0] - t0_epoch,
                "constructor_s": init[1] - init[0],
                "calls": len(calls),
                "first_call_start_s": calls[0][0] - t0_epoch if calls else None,
                "first_call_s": calls[0][1] - calls[0][0] if calls else None,
                "later_call_mean_s": sum(later) / len(later) if later else None,
                "busy_s": sum(b - a for a, b in calls),
                "busy_cpu_s": cpu,
                "gap_mean_ms": 1000 * sum(gaps) / len(gaps) if gaps else None,
                "idle_at_end_s": wall - (calls[-1][1] - t0_epoch) if calls else wall,
            }
        )
    return out


def _fmt_timeline(tl: list[dict[str, Any]]) -> str:
    def f(key: str, scale: float = 1.0, fmt: str = ".2f") -> str:
        return "/".join("-" if a[key] is None else format(a[key] * scale, fmt) for a in tl)

    return (
        f"actors' timeline (s after the run started): constructor at {f('constructor_start_s')} taking "
        f"{f('constructor_s')}, first call at {f('first_call_start_s')} taking {f('first_call_s')} (later calls "
        f"{f('later_call_mean_s')}), gap between calls {f('gap_mean_ms', fmt='.0f')} ms, idle at the end "
        f"{f('idle_at_end_s')}; CPU of the calling thread / wall of the calls "
        + "/".join(f"{a['busy_cpu_s'] / a['busy_s']:.2f}" if a["busy_s"] else "-" for a in tl)
    )


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
    ``SleepStages`` sized as the fused pool, consumed like ``run_ray``."""
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


def build_dataset(
    ray,
    records,
    setting: dict[str, Any],
    ecfg: EngineConfig,
    dups: dict[str, str] | None,
    n_blocks: int,
    fused_class: type | None = None,
):
    """from_items (largest first, as the engine) -> pre-filter (task) -> [barrier + dedup] -> MarkDuplicates
    (task) -> stages 2-6."""
    task = {"num_cpus": ecfg.num_cpus_per_task, "batch_format": "pandas", "batch_size": ecfg.batch_size}
    # In the order the engine feeds its stages (largest first; setting "order": "given" keeps the input order,
    # for comparison); near-duplicates stay resolved in input order either way.
    items = [
        dict(r, ok=True, stage="", reason="") for r in engine_order(records, setting.get("order", "largest"))
    ]
    ds = ray.data.from_items(items, override_num_blocks=n_blocks)
    ds = ds.map_batches(PreFilterStage(ecfg), **task)
    if dups is None:  # the production shape: near-duplicates need every hash, a barrier
        ds = ds.materialize()
        hashes = ds.select_columns(["source_id", "phash", "ok", "stage"]).take_all()
        order = {r["source_id"]: i for i, r in enumerate(records)}
        hashes.sort(key=lambda h: order[h["source_id"]])
        dups = near_duplicates(hashes, ecfg)
    ds = ds.map_batches(MarkDuplicates(dups), **task)
    return add_layer_stages(ds, ecfg, "classical", layout=setting["layout"], fused_class=fused_class)


def run_ray(
    ray,
    records,
    setting: dict[str, Any],
    ecfg: EngineConfig,
    dups: dict[str, str] | None,
    timeline: bool = False,
) -> dict[str, Any]:
    """One execution: the output rows, wall time, time to the first batch, steady throughput, Ray Data's stats
    (and with ``timeline``, fused layout only, the actors' timeline: ``actor_timeline``)."""
    n_blocks = input_blocks(len(records), ecfg.batch_size)  # as the engine splits its input
    keep = ["source_id", "ok", "stage", "reason", "work"]
    tables, arrivals = [], []
    log_dir = tempfile.mkdtemp(prefix="rlb-tl-") if timeline and setting["layout"] == "fused" else None
    if log_dir:
        TimedLayerStages.log_dir = log_dir
    t0_epoch = time.time()
    t0 = time.perf_counter()
    try:
        ds = build_dataset(ray, records, setting, ecfg, dups, n_blocks, TimedLayerStages if log_dir else None)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            arrivals.append((time.perf_counter() - t0, batch.num_rows))
            tables.append(batch.select(keep))
        wall = time.perf_counter() - t0
        # An actor writes a call's line before it returns the batch: every line is there once the last batch is.
        tl = actor_timeline(log_dir, t0_epoch, wall) if log_dir else None
    finally:
        if log_dir:
            shutil.rmtree(log_dir, ignore_errors=True)
    try:
        stats = ds.stats()
    except Exception as e:  # stats are a diagnosis aid, never a reason to lose the figures
        stats = f"unavailable: {type(e).__name__}: {e}"
    first = arrivals[0][0] if arrivals else wall
    steady = None
    if len(arrivals) > 1 and arrivals[-1][0] > first:
        steady = sum(n for _, n in arrivals[1:]) / (arrivals[-1][0] - first)
    return {
        "rows": [r for t in tables for r in t.to_pylist()],
        "timeline": tl,
        "wall": wall,
        "first": first,
        "steady": steady,
        "steady_window_s": (arrivals[-1][0] - first) if len(arrivals) > 1 else 0.0,
        "first_batch_ids": set(tables[0].column("source_id").to_pylist()) if tables else set(),
        "stats": stats,
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
def machine_info() -> dict[str, Any]:
    import numba
    import pymatting
    import ray
    import torch

    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus_usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": cpus_usable,
        "cpu_model": _cpu_model(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "ray": ray.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "numba": numba.__version__,
        "pymatting": getattr(pymatting, "__version__", "unknown"),
        "torch": torch.__version__,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _setting_label(s: dict[str, Any]) -> str:
    if s["layout"] == "fused":
        actors = s.get("actors") or s["fused_actors"] or "1/CPU"
        label = f"fused, {actors} actors x {s['num_cpus_per_actor']:g} CPU bs={s['batch_size']}"
    else:
        label = (
            f"staged, {s['cpu_actors']}/pool cpu/actor={s['num_cpus_per_actor']:g} "
            f"cpu/task={s['num_cpus_per_task']:g} bs={s['batch_size']}"
        )
    label = ("defaults: " if s.get("defaults") else "") + label
    label += "" if s["keep_workers"] else " stock"
    label += " input order" if s.get("order") == "given" else ""
    return label + (" +barrier" if s.get("barrier") else "")


def _arm(s: dict[str, Any]) -> str:
    return "(a) ray"


def print_tables(result: dict[str, Any]) -> None:
    plain_runs = result.get("plain_runs", [])
    runs = result.get("ray", [])
    best, plain = result.get("best"), result.get("plain")
    head = (
        f"{'arm':<9} {'setting':<50} {'imgs':>4} {'wall s':>6} {'img/s':>5} {'steady':>6} {'speedup':>7} "
        f"{'stage s':>7} {'ovh ms/img':>10} {'ovh %':>6} {'st.ovh%':>7} {'cpu ms/img':>10} {'cpu x':>5} {'idle %':>6} {'others %':>8} "
        f"{'kept':>4} {'quar':>4} {'layers':>6}"
    )
    print(head)
    print("-" * len(head))
    rows = [
        ("(b) plain", f"1 process, bs={r['batch_size']}" + (" *" if r is plain else ""), r)
        for r in plain_runs
    ]
    rows += [
        (_arm(r["setting"]), _setting_label(r["setting"]) + (" *" if r is best else ""), r) for r in runs
    ]
    for arm, label, r in rows:
        speed = f"{r['speedup']:.2f}x" if r.get("speedup") is not None else ""
        steady = f"{r['steady_images_per_s']:.2f}" if r.get("steady_images_per_s") else ""
        cpu_x = f"{r['cpu_bound_speedup']:.2f}" if r.get("cpu_bound_speedup") is not None else ""
        st_ovh = f"{r['steady_overhead_pct']:.1f}" if r.get("steady_overhead_pct") is not None else ""
        print(
            f"{arm:<9} {label:<50} {r['images']:>4} {r['wall_s']:>6.1f} {r['images_per_s']:>5.2f} {steady:>6} "
            f"{speed:>7} {r['stage_time_s']:>7.1f} {r['overhead_per_image_ms']:>10.1f} {r['overhead_pct']:>6.1f} {st_ovh:>7} "
            f"{r['own_cpu_per_image_ms']:>10.1f} {cpu_x:>5} {r['idle_pct']:>6.1f} {r['foreign_pct']:>8.1f} "
            f"{r['images_kept']:>4} {r['images_quarantined']:>4} {r['layers_kept']:>6}"
        )
    print("* the runs compared: the fastest plain run and the engine defaults (else the fastest Ray run)")
    if plain and best:
        print(
            f"\nper-stage time (sum over images), plain vs the best Ray setting ({_setting_label(best['setting'])})"
        )
        h2 = f"{'stage':<11} {'plain s':>8} {'share':>6} {'ray s':>8} {'share':>6} {'ray/plain':>9}"
        print(h2)
        print("-" * len(h2))
        for st in TIMED_STAGES:
            p, a = plain["stage_s"][st], best["stage_s"][st]
            print(
                f"{st:<11} {p:>8.2f} {plain['stage_share'][st]:>6.1%} {a:>8.2f} {best['stage_share'][st]:>6.1%} "
                f"{(a / p if p else 0):>9.2f}"
            )
        print(
            f"{'total':<11} {plain['stage_time_s']:>8.2f} {1:>6.0%} {best['stage_time_s']:>8.2f} {1:>6.0%} "
            f"{best['contention']:>9.2f}"
        )
        print(
            "\nCPU seconds per process, best Ray run: "
            + ", ".join(f"{k} {v:.1f}" for k, v in list(best.get("cpu_by_process", {}).items())[:8])
        )


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)


def _public(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if k not in ("per_image", "image_stage_s")}


def _pick(runs: list[dict[str, Any]], **match) -> dict[str, Any] | None:
    same = [r for r in runs if all(r["setting"].get(k) == v for k, v in match.items())]
    if not same:
        return None
    r = max(same, key=lambda r: r["images_per_s"])
    return {
        k: r.get(k)
        for k in (
            "setting",
            "images_per_s",
            "steady_images_per_s",
            "speedup",
            "overhead_pct",
            "steady_overhead_pct",
            "cpu_overhead_pct",
            "cpu_bound_speedup",
            "foreign_pct",
            "fixed_overhead_core_s",
        )
    }


def make_settings(args) -> list[dict[str, Any]]:
    """The Ray runs, grouped by cluster configuration (stock Ray first)."""
    d = EngineConfig()
    out = []
    if args.stock:  # the pipeline the engine builds, with its default resources, on stock Ray
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
                "barrier": args.barrier,
                "order": "largest",
            }
        )
        if args.given_order:  # the same, fed in input order instead of largest first
            out.append(dict(out[-1], defaults=False, order="given"))
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
                        "barrier": args.barrier,
                        "order": "largest",
                    }
                )
    return sorted(out, key=lambda s: s["keep_workers"])  # stable: one cluster per configuration


def paired_speedups(result: dict[str, Any]) -> list[float]:
    """Per round of ``--repeat``: the compared setting's images/s over the same round's plain run (minutes apart,
    so a slow drift of the machine's speed hits both); the headline speed-up compares the fastest of each arm."""
    key = result["best"]["setting"]
    plain_by_round = {p["repeat"]: p for p in result.get("plain_runs", [])}
    return [
        r["images_per_s"] / plain_by_round[r["repeat"]]["images_per_s"]
        for r in result["ray"]
        if r["setting"] == key and r["repeat"] in plain_by_round
    ]


def summarize_result(result: dict[str, Any]) -> None:
    """The comparison: the fastest plain run against the engine's defaults (else the fastest Ray run)."""
    plain = result["plain"]
    runs = result["ray"]
    if not runs:
        return
    defaults = [r for r in runs if r["setting"].get("defaults")]
    best = max(defaults or runs, key=lambda r: r["images_per_s"])
    # Speed-ups of every Ray run against the fastest plain run so far (a later plain round may be faster).
    for r in result["ray"]:
        r["speedup"] = r["images_per_s"] / plain["images_per_s"]
        r["parallel_efficiency"] = r["speedup"] / r["cores"]
        r["contention"] = r["stage_time_s"] / plain["stage_time_s"]
    result["best"] = best
    result["summary"] = {
        "plain_images_per_s": plain["images_per_s"],
        "ray_images_per_s": best["images_per_s"],
        "speedup": best["speedup"],
        "ray_overhead_pct": best["overhead_pct"],
        "ray_steady_overhead_pct": best["steady_overhead_pct"],
        "ray_cpu_overhead_pct": best["cpu_overhead_pct"],
        "ray_fixed_overhead_core_s": best.get("fixed_overhead_core_s"),
        "break_even_images": best.get("break_even_images"),
        "cluster_idle_cores": best.get("cluster_idle_cores"),
        "cluster_background_pct": best.get("cluster_background_pct"),
        "cpu_bound_speedup": best["cpu_bound_speedup"],
        "ray_floor_idle_pct": (best.get("floor") or {}).get("floor_idle_pct"),
        "ray_floor_cpu_pct": (best.get("floor") or {}).get("floor_cpu_pct"),
        "ray_overhead_above_floor_pct": best.get("above_floor_pct"),
        "best_setting": best["setting"],
        "compared_is_engine_defaults": bool(best["setting"].get("defaults")),
        "fastest_staged": _pick(result["ray"], layout="staged"),
        "fastest_given_order": _pick(result["ray"], order="given"),
        "paired_speedups": paired_speedups(result),
        "speedup_target_met": best["speedup"] >= TARGET_SPEEDUP,
        "overhead_target_met": best["overhead_pct"] < TARGET_OVERHEAD_PCT,
        "steady_overhead_target_met": best["steady_overhead_pct"] is not None
        and best["steady_overhead_pct"] < TARGET_OVERHEAD_PCT,
        "cpu_bound_speedup_reaches_target": best["cpu_bound_speedup"] >= TARGET_SPEEDUP,
        "kept_counts_match": not result["mismatches"],
        "others_load_pct": {"plain": plain["foreign_pct"], "ray": best["foreign_pct"]},
    }
    ceiling = result.get("ceiling")
    if ceiling:
        ceiling["speedup"] = ceiling["images_per_s"] / plain["images_per_s"]
        result["summary"]["ceiling_speedup"] = ceiling["speedup"]
        result["summary"]["share_of_ceiling"] = best["speedup"] / ceiling["speedup"]


# ---------------------------------------------------------------------------------------------- main
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
            "barrier": args.barrier,
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
    state: dict[str, Any] = {"dups": {}, "per_image": None, "plain_cpu": None}

    def plain_round(rep: int) -> None:
        """(b): one timed plain run (Ray is not running)."""
        (rows, wall), cpu, _, quiet = timed(lambda: run_plain(records, base))
        fig = summarize(rows)
        if state["per_image"] is None:
            state["dups"] = near_duplicates(rows, base)
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
        result["params"]["near_duplicates"] = len(state["dups"])
        write(result, args.out)
        print(
            f"(b) plain: {fig['images_per_s']:.2f} images/s ({wall:.1f} s, {fig['own_cpu_per_image_ms']:.0f} CPU "
            f"ms/image, others used {fig['foreign_pct']:.0f} % of the machine); wrote {args.out}"
        )

    def ray_round(ray, s: dict[str, Any], rep: int) -> bool:
        """(a) or (a'): one timed Ray run after an untimed one on the warm-up images; False on a mismatch."""
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
        with warnings.catch_warnings():  # the warm-up's 2 blocks cannot feed 2 actors: Ray Data says so
            warnings.filterwarnings("ignore", message=".*only received.*input", category=UserWarning)
            run_ray(ray, warm, s, ecfg, {})
        time.sleep(1.0)  # the warm-up's actors exit
        _, idle_cpu, _ = meter.measure(lambda: time.sleep(IDLE_PROBE_S))
        idle_cores = idle_cpu["own_cpu_s"] / idle_cpu["wall_s"]
        out, cpu, by_title, quiet = timed(
            lambda: run_ray(ray, records, s, ecfg, None if s["barrier"] else state["dups"], args.timeline)
        )
        fig = summarize(out.pop("rows"))
        wall = out["wall"]
        # Stage time of the images that arrived after the first batch (the steady window's work).
        steady_stage = sum(t for sid, t in fig["image_stage_s"].items() if sid not in out["first_batch_ids"])
        fig.update(
            arm_figures(fig, wall, args.cores, cpu),
            setting=s,
            repeat=rep,
            quiet=quiet,
            first_batch_s=out["first"],
            steady_images_per_s=out["steady"],
            steady_window_s=out["steady_window_s"],
            steady_stage_s=steady_stage,
            steady_overhead_pct=(
                100 * (out["steady_window_s"] * args.cores - steady_stage) / steady_stage
                if steady_stage and out["steady_window_s"]
                else None
            ),
            speedup=fig["images"] / wall / plain["images_per_s"],
            contention=fig["stage_time_s"] / plain["stage_time_s"],
            cpu_by_process=by_title,
            ray_data_stats=out["stats"],
        )
        if out["timeline"] is not None:
            fig["actor_timeline"] = out["timeline"]
        fig["parallel_efficiency"] = fig["speedup"] / args.cores
        fig.update(overhead_parts(fig, idle_cores))
        fig["cpu_overhead_pct"] = (
            100 * (fig["own_cpu_per_image_ms"] - state["plain_cpu"]) / state["plain_cpu"]
        )
        fig["cpu_bound_speedup"] = args.cores * state["plain_cpu"] / fig["own_cpu_per_image_ms"]
        diffs = compare({"per_image": state["per_image"]}, fig)
        fig["matches_plain"] = not diffs
        if diffs:
            result["mismatches"].append({"setting": s, "differences": diffs[:50], "count": len(diffs)})
        if args.floor and s.get("defaults") and s["layout"] == "fused" and not s["barrier"]:
            time.sleep(1.0)  # the measured run's actors exit
            seconds = dict(fig["image_stage_s"])
            frun, fcpu, ftitles, fquiet = timed(lambda: run_floor(ray, records, seconds, ecfg, s["actors"]))
            floor = floor_figures(frun, sum(seconds.values()), args.cores, ftitles)
            floor.update(quiet=fquiet, own_cpu_s=fcpu["own_cpu_s"], foreign_pct=100 * fcpu["foreign_load"])
            fig["floor"] = floor
            fig["above_floor_pct"] = fig["overhead_pct"] - floor["floor_idle_pct"]
            print(
                f"    floor (the same pipeline shape, stage code that only sleeps): {floor['wall_s']:.1f} s, actors "
                f"constructed at {'/'.join(f'{t:.2f}' for t in floor['actor_constructed_s'])} s, first "
                f"batch {floor['first_batch_s']:.1f} s; core time unused {floor['floor_idle_pct']:.1f} % of stage "
                f"time (this run's overhead {fig['overhead_pct']:.1f} %: {fig['above_floor_pct']:.1f} % above it); "
                f"CPU of Ray's processes {floor['floor_cpu_pct']:.1f} % of stage time"
            )
        result["ray"].append(_public(fig))
        summarize_result(result)
        write(result, args.out)
        steady = f", steady {out['steady']:.2f}/s" if out["steady"] else ""
        print(
            f"{_arm(s)} {_setting_label(s)}: {fig['images_per_s']:.2f} images/s ({wall:.1f} s, first batch "
            f"{out['first']:.1f} s{steady}, {fig['own_cpu_per_image_ms']:.0f} CPU ms/image, others used "
            f"{fig['foreign_pct']:.0f} % of the machine), {fig['speedup']:.2f}x plain"
            + ("" if not diffs else f", {len(diffs)} MISMATCHES")
        )
        if out["timeline"]:
            print(_fmt_timeline(out["timeline"]))
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

    for rep in range(args.repeat):  # rounds: plain, then every Ray setting (one cluster per configuration)
        plain_round(rep)
        if args.ceiling:
            ceiling_round(rep)
        for group in groups:
            tmp = start_ray(ray, args.cores, group[0]["keep_workers"], args.thread_pinning)
            try:
                probe = probe_ray_threads(ray, group[0]["num_cpus_per_actor"], group[0]["num_cpus_per_task"])
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
                for s in group:
                    if not ray_round(ray, s, rep):
                        status = 1
            finally:
                ray.shutdown()
                shutil.rmtree(tmp, ignore_errors=True)

    print()
    print_tables(result)
    sm = result.get("summary")
    if sm:
        print(
            f"\nspeed-up {sm['speedup']:.3f}x (target >= {TARGET_SPEEDUP}: "
            f"{'met' if sm['speedup_target_met'] else 'NOT met'}); Ray overhead {sm['ray_overhead_pct']:.1f} % of "
            f"stage time (target < {TARGET_OVERHEAD_PCT:g} %: {'met' if sm['overhead_target_met'] else 'NOT met'}), "
            f"{_fmt_pct(sm['ray_steady_overhead_pct'])} in the steady window "
            f"({'met' if sm['steady_overhead_target_met'] else 'NOT met'}); "
            f"Ray CPU overhead {sm['ray_cpu_overhead_pct']:.1f} %, CPU-bound speed-up {sm['cpu_bound_speedup']:.3f}x"
        )
        if sm.get("ray_fixed_overhead_core_s") is not None:
            be = sm["break_even_images"]
            print(
                f"of the Ray overhead, {sm['ray_fixed_overhead_core_s']:.1f} core-s is a cost per run (start-up to the "
                f"first batch: {result['best']['first_batch_s']:.1f} s), the rest {_fmt_pct(sm['ray_steady_overhead_pct'])}"
                f" per image; "
                + (
                    f"at that rate the whole-run overhead falls under {TARGET_OVERHEAD_PCT:g} % from about {be} images"
                    if be
                    else "the per-image rate alone is over the target"
                )
                + f"; the idle cluster's own processes use {100 * sm['cluster_idle_cores']:.1f} % of a core "
                f"({_fmt_pct(sm['cluster_background_pct'])} of this run's stage time)"
            )
        if sm.get("ray_floor_idle_pct") is not None:
            fl = result["best"]["floor"]
            print(
                f"Ray Data's own floor on this node (--floor: this run's schedule, stage code that only sleeps): "
                f"{sm['ray_floor_idle_pct']:.1f} % of stage time left unused (first batch after "
                f"{fl['first_batch_s']:.1f} s), against this run's {sm['ray_overhead_pct']:.1f} %: the pipeline adds "
                f"{sm['ray_overhead_above_floor_pct']:.1f} %; beside that, the driver, Ray's daemons and service actors "
                f"used CPU worth {sm['ray_floor_cpu_pct']:.1f} % of stage time, which on busy cores slows the stage "
                f"code (contention) rather than adding to the overhead"
            )
        if len(sm.get("paired_speedups") or []) > 1:
            print(
                "speed-up per round (the compared setting over the same round's plain run): "
                + ", ".join(f"{x:.3f}x" for x in sm["paired_speedups"])
                + "; plain ran at "
                + ", ".join(f"{p['images_per_s']:.2f}" for p in result["plain_runs"])
                + " images/s"
            )
        if "ceiling_speedup" in sm:
            print(
                f"ceiling (c): {args.cores} plain processes reach {sm['ceiling_speedup']:.3f}x on this machine; "
                f"the Ray pipeline reaches {sm['share_of_ceiling']:.1%} of it"
            )
        if max(sm["others_load_pct"].values()) > 100 * args.quiet_below:
            print(
                f"WARNING: other processes used {sm['others_load_pct']['plain']:.0f} % (plain) and "
                f"{sm['others_load_pct']['ray']:.0f} % (ray) of the machine during the compared runs"
            )
    print(
        "ovh % = 100 * (wall * cores - stage time) / stage time; cpu ms/img = CPU of this process tree per image;"
        " cpu x = cores * plain cpu ms/img / this run's (the speed-up on a quiet machine if no core idled);"
        " steady = img/s after the first batch; idle/others % = share of the machine idle / used by other "
        "processes"
    )
    for mm in result["mismatches"]:
        print(
            f"MISMATCH ray vs plain ({_setting_label(mm['setting'])}): {mm['count']} images, e.g. "
            + "; ".join(mm["differences"][:3])
        )
    print(f"\nwrote {args.out}")
    return status


def _fmt_pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} %"


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
            "Images per second through the data engine's six stages (classical backends): (a) Ray Data on a local "
            "cluster this script starts (--cores CPUs, its own temp dir): add_layer_stages with the engine's "
            "defaults (layout auto: fused on a CPU cluster) on stock Ray, then the staged layout once per "
            "--cpu-actors x --batch-size with idle workers kept, for comparison; against (b) the same stage code in one "
            "plain process (run_stages_plain). Thread counts are pinned to 1 in both arms and printed. Prints a "
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
        "--timeline",
        action="store_true",
        help="fused runs: time the actors' constructor and every call (a LayerStages subclass appends the times to "
        "a file per actor) and report where the run's start and end go (JSON: actor_timeline); off by default, so "
        "that the compared figures never include it",
    )
    ap.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after each run of the defaults, run the same pipeline shape with stage code that only sleeps each "
        "image's stage time: Ray Data's own cost on this node for that schedule, and how much of the run's "
        "overhead the engine adds above it (default on; not with --barrier, whose pipeline has another shape)",
    )
    ap.add_argument(
        "--given-order",
        action="store_true",
        help="also run the defaults with the images in input order (the bundled photos last) instead of largest "
        "first, as the engine feeds them: what the ordering does to the run's tail",
    )
    ap.add_argument(
        "--barrier",
        action="store_true",
        help="arm (a) as in production: materialize() after the pre-filter, then near-duplicates",
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
