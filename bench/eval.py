"""Benchmark: the evaluation's samples/s (items scored per second, all models) through the Ray job and in one process.

An item is one dataset row x one prompt type (the paper's ``text+box:fine`` only: one item per row), scored by every
model of the run: the tiny RefLayer (random init, built as tests/eval/test_eval_job.py builds it, with the product's
tiny VAE, registered as ``model/reflayer``) and the two baselines the job always adds (``copy-visible``,
``classical``), with the stand-in feature networks (``register_stand_ins``). Three arms on the same items (one
registered dataset of synthetic scenes, ``test`` split), the same models, settings and stage code
(:class:`reflade.eval.scoring.PredictStage` then :class:`~reflade.eval.scoring.ScoreStage`):

(a) the product's job: ``reflade.eval.job.run_eval`` on a local Ray cluster of ``--cores`` CPUs (Ray Data reads the
    shard in place and expands the items, a PredictStage actor pool, a ScoreStage actor pool, materialised; then the
    accumulator, the report (JSON/HTML/figures/picture grid) and its registration), timed from the call to its
    return. The pools' actors start inside the job (process, imports, models and feature networks fetched from the
    registry and loaded): the product offers no way to start them beforehand, so their start-up is part of (a).
    Run ``--ray-runs`` times: ``cold`` is the first job on a fresh cluster with an empty weights cache, ``warm`` a
    rerun on the same cluster (the weights cache is filled, idle Ray workers may be reused; the actors are new);
(b) a per-sample loop in one process: ``score_local(records, PredictStage(...), ScoreStage(...), batch_size=1)``;
(c) the same, batched: ``score_local(..., batch_size=--batch-size)``, the batching ceiling of one process.

(b) and (c) run first, in one fresh process (no Ray cluster up yet), which reads the rows from the registry and
expands them with ``expand_row`` (both timed apart, not in the arms), builds the two stages with the arguments the
job gives its actors (models and networks fetched from the registry into its own weights cache) and calls them once
on one item: construction and that warm-up are outside the timed arms, and reported. They run ``--repeat`` times
each; the fastest is compared.

Thread counts (design.md, Pitfalls): each arm has ``--threads`` T threads in all (default: the usable CPUs).
(a): the two pools' actors (``--actors`` each, ``--num-cpus`` each) run ``EvalConfig.threads`` =
max(1, T // (2 x actors)) torch threads each; ``OMP/MKL/OPENBLAS/NUMEXPR/NUMBA/OPENCV_FOR`` = 1 in this driver and
in every Ray worker (inherited from the raylet this script starts), ``cv2.setNumThreads(1)`` and
``torch.set_num_threads(1)`` in the driver. (b)/(c): the one process has every variable = T,
``torch.set_num_threads(T)`` and ``cv2.setNumThreads(T)``; with ``--local-extra-threads`` (default 1) (b) and (c)
run again with that many torch/OpenCV threads, for reference (not in the ratios). The counts seen in the driver, in
the local process and in a Ray worker with an actor's resources are printed and stored.

Inside (a), without changing product code, this script wraps (in its own process only) ``reflade.eval.job._score``
(Ray Data: plan, both pools' start-up, every batch, materialise, the accumulator), ``reflade.eval.report.write_report``
(the report's files; its picture grid reads the scored dataset and the dataset's shard again) and ``Registry.create``
(the report's upload and manifest) with pass-through timers, and reads Ray Data's per-operator stats of the
materialised dataset: the time each pool's actors spent in blocks, and when the first block started (the pools'
start-up) and the last ended.

``--variants`` (after the runs above, on the same warm cluster, each once; not in the headline ratios):
  ``threads``        EvalConfig.threads = T for every actor (the pools hardly overlap, see below);
  ``split``          WHAT-IF, not the product: the job's rows dataset repartitioned to blocks of --batch-size items
                     (a pass-through wrap of ``reflade.eval.job._dataset_rows`` in this process), so that the pools
                     can overlap and several actors share the work: what the product loses by running one block;
  ``split-actors2``  the same what-if with EvalConfig(actors=2, num_cpus=0.25) (four actors, one thread each).

Every arm's per-(item, model) metrics are compared with (c)'s (the same pairs must come out of every arm; the largest
difference of each metric is stored: batching may change the last bits).

The machine may be shared: each arm waits first (``--wait-quiet``) for other processes to go quiet and records the
CPU seconds of its own processes and of the whole machine ("others %"), and the load average.

    .venv/bin/python bench/eval.py [--items 40] [--size 64] [--metric-size 64] [--steps 20] [--batch-size 8]
                                   [--actors 1] [--num-cpus 0.5] [--threads T] [--ray-runs 2] [--repeat 2]
                                   [--variants threads,split,split-actors2] [--quick] [--out bench/results/eval.json]
"""

from __future__ import annotations

import os

_THREADS = os.environ.get("RLBENCH_THREADS", "1")  # the local-arms process is started with its own count
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "OPENCV_FOR_THREADS_NUM",
)
# Before numpy, OpenCV, numba or torch load (they read these once, at import).
os.environ.update({k: _THREADS for k in THREAD_VARS})
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "eval.json"
BUCKET = "reflade-bench"
TARGET_RAY_OVER_LOOP = 2.0
TARGET_RAY_OVER_BATCHED = 0.8
ARMS = {
    "ray": "(a) Ray job run_eval",
    "loop": "(b) per-sample loop",
    "batched": "(c) batched, 1 process",
}
VARIANTS = ("threads", "split", "split-actors2")
PER_SAMPLE_COLUMNS = ("s_vis", "s_gen", "alpha_iou", "psnr_visible", "hidden_rgb_mae")
DEFINITIONS = {
    "item": "one dataset row x one prompt type (text+box:fine: one per row), scored by every model of the run",
    "samples_per_s": "items / seconds of the arm (every model included)",
    "ray.seconds": "run_eval from its call to its return: resolving the references, _score (Ray Data pipeline with "
    "both actor pools' start-up, every batch, materialize, the accumulator), write_report (JSON, HTML, figures, "
    "the picture grid, which reads the scored dataset and the dataset's shard again), the report's registration",
    "ray.score_s": "the time inside reflade.eval.job._score alone (a pass-through timer set by this script in its "
    "own process)",
    "ray.score_samples_per_s": "items / score_s",
    "ray.report_s": "reflade.eval.report.write_report, called by run_eval",
    "ray.register_s": "Registry.create of the eval-report version (upload + manifest)",
    "ray.other_s": "seconds - score_s - report_s - register_s: resolving references, setup, the gate's absence",
    "ray.*_stage.first_block_s": "seconds from _score's call to the first block a pool's actor started (Ray Data's "
    "block stats, time.perf_counter, one clock on one machine): the pool's start-up (plan, read, actor process, "
    "imports, models loaded) and, for ScoreStage, the wait for PredictStage's first output block",
    "ray.*_stage.block_wall_s": "the sum over a pool's blocks of the time its actors spent producing them (stage "
    "code plus Ray Data's per-block conversions)",
    "ray.window_s": "from the first PredictStage block's start to the last ScoreStage block's end",
    "ray.outside_s": "seconds - window_s: the part of run_eval outside the window where blocks ran (start-up "
    "before it; materialize's tail, the accumulator, the report and the registration after it)",
    "ray.window_samples_per_s": "items / window_s: (a)'s rate without its fixed cost (it still includes each "
    "actor's first calls, which the (b)/(c) process makes before its timed runs: local.warmup_s)",
    "loop/batched.seconds": "score_local over every item (the predict and score calls, pandas frames, concat); the "
    "records are in memory already (read_s and expand_s apart), the stages built and called once before (untimed)",
    "loop/batched.predict_s, score_s": "the same run split by a pass-through timer around each stage's __call__",
    "loop/batched.outside_s": "seconds - predict_s - score_s (score_local's frames and concat)",
    "ray_over_loop": "samples_per_s(a) / samples_per_s(b); target >= 2",
    "ray_over_batched": "samples_per_s(a) / samples_per_s(c); target >= 0.8",
    "*_warm": "the same with the warm rerun of (a)",
    "break_even_items": "the items from which (a) would meet a target, if its outside_s stayed fixed and its window "
    "rate held: outside_s / (1 / (target x other arm's rate) - 1 / window rate); null when the window rate itself "
    "is not above target x the other arm's rate (then no item count reaches the target)",
    "cpu": "CPU seconds during the arm: own = this process tree (driver, local process, Ray's daemons and workers; "
    "sampled every 0.5 s) or, in the local process, its own CPU time; others_pct = 100 * (machine busy - own) / "
    "(CPUs * wall): the share of the machine other processes took",
    "max_abs_diff": "per metric, the largest |arm - (c)| over every (item, model); NaN on both sides counts as equal",
    "variants": "runs of (a) with other settings or a what-if, on the warm cluster, once each: "
    + ", ".join(VARIANTS),
}


# ---------------------------------------------------------------------------------------------- helpers
def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(out)


def thread_report() -> dict[str, Any]:
    """Thread counts as this process sees them."""
    import cv2
    import torch

    return {
        "pid": os.getpid(),
        "env": {k: os.environ.get(k) for k in THREAD_VARS},
        "cv2_threads": cv2.getNumThreads(),
        "torch_threads": torch.get_num_threads(),
    }


def _fmt_threads(t: dict[str, Any]) -> str:
    env = {t["env"].get(k) for k in THREAD_VARS}
    env_s = t["env"]["OMP_NUM_THREADS"] if len(env) == 1 else ",".join(str(v) for v in t["env"].values())
    return f"torch={t['torch_threads']} cv2={t['cv2_threads']} env(OMP,MKL,...)={env_s}"


class CpuMeter:
    """CPU seconds of this process tree and of the whole machine over one arm (the machine may be shared)."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.root = psutil.Process()
        self.cpus = psutil.cpu_count() or 1

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0)

    def _tree(self) -> dict[int, float]:
        out = {}
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                pass
        return out

    def measure(self, fn):
        """``fn()``'s value and the CPU figures of its run."""
        base, seen, stop = self._tree(), {}, threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                seen.update(self._tree())

        thread = threading.Thread(target=sample, daemon=True)
        busy0, t0, load0 = self._busy(), time.perf_counter(), _loadavg()
        thread.start()
        try:
            value = fn()
        finally:
            stop.set()
            thread.join()
            seen.update(self._tree())
        wall, machine = time.perf_counter() - t0, self._busy() - busy0
        own = sum(max(0.0, c - base.get(pid, 0.0)) for pid, c in seen.items())
        return value, {
            "wall_s": wall,
            "own_cpu_s": own,
            "machine_cpu_s": machine,
            "own_pct": 100 * own / (self.cpus * wall),
            "others_pct": 100 * max(0.0, machine - own) / (self.cpus * wall),
            "machine_cpus": self.cpus,
            "loadavg_before": load0,
            "loadavg_after": _loadavg(),
        }


def wait_quiet(max_wait_s: float, below: float) -> dict[str, Any] | None:
    """Wait (up to ``max_wait_s``) until the machine is busy less than ``below`` (a share of its CPUs) over one
    second; this run is idle meanwhile, so what is busy is other processes (and Ray's idle daemons)."""
    if max_wait_s <= 0:
        return None
    import psutil

    t0 = time.perf_counter()
    while True:
        share = psutil.cpu_percent(interval=1.0) / 100.0
        waited = time.perf_counter() - t0
        if share < below or waited >= max_wait_s:
            q = {"waited_s": round(waited, 1), "busy_share": round(share, 3), "quiet": share < below}
            if not q["quiet"]:
                print(
                    f"  the machine stayed busy ({100 * share:.0f} % of its CPUs) for {waited:.0f} s: running anyway",
                    flush=True,
                )
            return q


def _machine_busy_s() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0)


def machine_info() -> dict[str, Any]:
    import numpy as np
    import ray
    import torch

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": _usable_cpus(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def _per_item_metrics(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    out = {}
    for r in rows:
        out[(str(r["item_id"]), str(r["model"]))] = {
            c: (float("nan") if r.get(c) is None else float(r[c])) for c in PER_SAMPLE_COLUMNS
        }
    return out


def compare_metrics(
    rows: dict[tuple[str, str], dict[str, float]], ref: dict[tuple[str, str], dict[str, float]]
) -> dict[str, Any]:
    """The same (item, model) pairs as ``ref``, and per metric the largest absolute difference."""
    diff: dict[str, float] = {c: 0.0 for c in PER_SAMPLE_COLUMNS}
    for key in set(rows) & set(ref):
        for c in PER_SAMPLE_COLUMNS:
            a, b = rows[key][c], ref[key][c]
            if math.isnan(a) and math.isnan(b):
                continue
            d = abs(a - b) if not (math.isnan(a) or math.isnan(b)) else float("inf")
            diff[c] = max(diff[c], d)
    return {
        "same_pairs": set(rows) == set(ref),
        "pairs": len(rows),
        "missing": len(set(ref) - set(rows)),
        "extra": len(set(rows) - set(ref)),
        "max_abs_diff": diff,
    }


# ---------------------------------------------------------------------------------------------- (b), (c)
class _Timed:
    """A pass-through timer around a stage's ``__call__`` (the stage's own code runs unchanged)."""

    def __init__(self, stage):
        self.stage = stage
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, df):
        t = time.perf_counter()
        try:
            return self.stage(df)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1


def _set_threads(n: int) -> None:
    import cv2
    import torch

    torch.set_num_threads(n)
    cv2.setNumThreads(n)


def _local_run(records, predict, score, batch_size: int, spec: dict[str, Any]) -> tuple[dict[str, Any], list]:
    """One timed ``score_local`` over every record."""
    from reflade.eval.scoring import score_local

    quiet = wait_quiet(spec["wait_quiet"], spec["quiet_below"])
    p, s = _Timed(predict), _Timed(score)
    busy0, cpu0, load0 = _machine_busy_s(), time.process_time(), _loadavg()
    t = time.perf_counter()
    df = score_local(records, p, s, batch_size=batch_size)
    seconds = time.perf_counter() - t
    own, machine = time.process_time() - cpu0, _machine_busy_s() - busy0
    cpus = os.cpu_count() or 1
    fig = {
        "batch_size": batch_size,
        "threads": thread_report(),
        "items": len(records),
        "rows_out": len(df),
        "seconds": seconds,
        "samples_per_s": len(records) / seconds,
        "predict_s": p.seconds,
        "score_s": s.seconds,
        "outside_s": seconds - p.seconds - s.seconds,
        "calls": p.calls,
        "refused": int((df["refused"].astype(str) != "").sum()),
        "quiet": quiet,
        "cpu": {
            "wall_s": seconds,
            "own_cpu_s": own,
            "machine_cpu_s": machine,
            "own_pct": 100 * own / (cpus * seconds),
            "others_pct": 100 * max(0.0, machine - own) / (cpus * seconds),
            "machine_cpus": cpus,
            "loadavg_before": load0,
            "loadavg_after": _loadavg(),
        },
    }
    metrics = [
        {k: v for k, v in r.items() if k in ("item_id", "model", *PER_SAMPLE_COLUMNS)}
        for r in df.to_dict("records")
    ]
    return fig, metrics


def local_arms(spec: dict[str, Any]) -> dict[str, Any]:
    """Arms (b) and (c), in this (fresh) process: rows from the registry, items, the stages built, a warm-up call,
    then each arm ``spec["repeat"]`` times at ``spec["threads"]``, then once at each extra thread count."""
    threads = int(spec["threads"])
    _set_threads(threads)
    from reflade.engine.schema import load_rows
    from reflade.eval.scoring import PredictStage, ScoreStage, expand_row, score_local
    from reflade.platform.worker import worker_registry

    out: dict[str, Any] = {"threads": thread_report()}
    registry = worker_registry(spec["storage_fields"], spec["prefix"])
    t = time.perf_counter()
    rows = load_rows(registry, spec["dataset"], spec["split"])
    out["read_s"] = time.perf_counter() - t
    t = time.perf_counter()
    records = [rec for row in rows for rec in expand_row(row, spec["prompt_types"])]
    out["expand_s"] = time.perf_counter() - t
    out["items"] = len(records)
    # The arguments the job gives its actors (reflade.eval.job._score), with this process's weights cache.
    t = time.perf_counter()
    predict = PredictStage(
        spec["models"],
        spec["metric_size"],
        spec["storage_fields"],
        spec["prefix"],
        steps=spec["steps"],
        guidance=spec["guidance"],
        seed=spec["seed"],
        device="cpu",
        threads=threads,
        cache_dir=spec["cache_dir"],
    )
    out["predict_build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    score = ScoreStage(
        spec["models"],
        spec["metric_size"],
        spec["networks"],
        spec["storage_fields"],
        spec["prefix"],
        device="cpu",
        threads=threads,
        cache_dir=spec["cache_dir"],
    )
    out["score_build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    score_local(records[:1], predict, score, batch_size=1)
    out["warmup_s"] = time.perf_counter() - t

    runs: dict[str, list[dict[str, Any]]] = {}
    metrics: dict[str, Any] = {}
    plan = [("", threads, spec["repeat"])] + [(f"@{n}", n, 1) for n in spec["extra_threads"] if n != threads]
    for suffix, n, repeat in plan:
        _set_threads(n)
        for _ in range(repeat):
            for arm, batch_size in (("loop", 1), ("batched", spec["batch_size"])):
                fig, rows_out = _local_run(records, predict, score, batch_size, spec)
                runs.setdefault(arm + suffix, []).append(fig)
                if not suffix:
                    metrics[arm] = rows_out
    out["runs"] = runs
    out["metrics"] = metrics
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_local(spec: dict[str, Any], root: Path, meter: CpuMeter) -> dict[str, Any]:
    """Arms (b) and (c) in a fresh process with its own thread variables (this script, ``--local-worker``)."""
    spec_file, out_file = root / "local-spec.json", root / "local-out.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["RLBENCH_THREADS"] = str(spec["threads"])
    env.update({k: str(spec["threads"]) for k in THREAD_VARS})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--local-worker", str(spec_file), str(out_file)]
    proc, cpu = meter.measure(lambda: subprocess.run(cmd, env=env, capture_output=True, text=True))
    if proc.returncode != 0:
        raise RuntimeError(
            f"local arms failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    out = json.loads(out_file.read_text())
    out["process_s"] = cpu["wall_s"]
    out["cpu"] = cpu
    return out


# ---------------------------------------------------------------------------------------------- (a)
class _JobTimers:
    """Pass-through timers (in this process only) around the parts of run_eval worth timing; with ``split``, the
    what-if of items in blocks of ``split`` rows. The product's code runs unchanged."""

    def __init__(self, split: int = 0):
        self.t: dict[str, float] = {"score_s": 0.0, "report_s": 0.0, "register_s": 0.0}
        self.score_started: float | None = None  # perf_counter: the clock of Ray Data's block stats
        self.scored = None
        self.samples: list[dict[str, Any]] = []
        self.split = split

    def __enter__(self):
        import reflade.eval.job as job
        import reflade.eval.report as report
        from reflade.platform.registry import Registry

        self._saved = (job._score, report.write_report, Registry.create, job._dataset_rows)
        score, write_report, create, dataset_rows = self._saved
        timers = self

        def timed_score(*a, **kw):
            t = timers.score_started = time.perf_counter()
            acc, scored = score(*a, **kw)
            timers.t["score_s"] += time.perf_counter() - t
            timers.scored = scored
            timers.samples = list(acc.samples)
            return acc, scored

        def timed_report(*a, **kw):
            t = time.perf_counter()
            try:
                return write_report(*a, **kw)
            finally:
                timers.t["report_s"] += time.perf_counter() - t

        def timed_create(self_, *a, **kw):
            t = time.perf_counter()
            try:
                return create(self_, *a, **kw)
            finally:
                timers.t["register_s"] += time.perf_counter() - t

        def split_rows(ds, s):
            return dataset_rows(ds, s).repartition(target_num_rows_per_block=timers.split)

        job._score, report.write_report, Registry.create = timed_score, timed_report, timed_create
        if self.split:
            job._dataset_rows = split_rows
        return self

    def __exit__(self, *exc):
        import reflade.eval.job as job
        import reflade.eval.report as report
        from reflade.platform.registry import Registry

        job._score, report.write_report, Registry.create, job._dataset_rows = self._saved
        return False


def ray_data_stats(scored, score_started: float | None) -> dict[str, Any]:
    """Per operator of the materialised dataset: blocks, their time, rows, first start and last end after _score's
    call."""
    out: dict[str, Any] = {"operators": [], "text": None}
    with contextlib.suppress(Exception):  # informative only
        out["text"] = scored.stats()
    try:
        summary = scored._get_stats_summary()
    except Exception as e:
        out["error"] = str(e)
        return out
    chain, s = [], summary
    while s is not None:
        chain.append(s)
        parents = getattr(s, "parents", None) or []
        s = parents[0] if parents else None
    for ds in reversed(chain):
        for op in getattr(ds, "operators_stats", None) or []:
            wall, cpu = getattr(op, "wall_time", None), getattr(op, "cpu_time", None)
            rows = getattr(op, "output_num_rows", None)
            start, end = getattr(op, "earliest_start_time", None), getattr(op, "latest_end_time", None)
            out["operators"].append(
                {
                    "name": op.operator_name,
                    "blocks": getattr(wall, "count", None),
                    "block_wall_s": getattr(wall, "sum", None),
                    "block_cpu_s": getattr(cpu, "sum", None),
                    "rows_out": getattr(rows, "sum", None),
                    "first_block_s": (start - score_started) if start and score_started else None,
                    "last_block_end_s": (end - score_started) if end and score_started else None,
                }
            )
    return out


def _stage_stats(stats: dict[str, Any], name: str) -> dict[str, Any]:
    ops = [o for o in stats.get("operators", []) if name in o["name"]]
    return ops[-1] if ops else {}


def run_ray_arm(ctx: dict[str, Any], settings, tag: str, meter: CpuMeter, split: int = 0) -> dict[str, Any]:
    from reflade.eval.job import EvalRequest, run_eval

    lines: list[str] = []
    with _JobTimers(split) as timers:
        outcome, cpu = meter.measure(
            lambda: run_eval(ctx["cfg"], EvalRequest(model=ctx["model"], settings=settings), log=lines.append)
        )
    seconds = cpu["wall_s"]
    items = len({r["item_id"] for r in timers.samples})
    stats = ray_data_stats(timers.scored, timers.score_started)
    predict, score = _stage_stats(stats, "PredictStage"), _stage_stats(stats, "ScoreStage")
    t = timers.t
    fig: dict[str, Any] = {
        "tag": tag,
        "settings": {
            "actors": settings.actors,
            "num_cpus": settings.num_cpus,
            "threads": settings.threads,
            "batch_size": settings.batch_size,
            "split_blocks_of": split or None,
        },
        "items": items,
        "rows_scored": len(timers.samples),
        "seconds": seconds,
        "samples_per_s": items / seconds,
        "score_s": t["score_s"],
        "score_samples_per_s": items / t["score_s"],
        "report_s": t["report_s"],
        "register_s": t["register_s"],
        "other_s": seconds - t["score_s"] - t["report_s"] - t["register_s"],
        "predict_stage": predict,
        "score_stage": score,
        "report_ref": outcome.version.ref,
        "models": outcome.report["models"],
        "log": lines,
        "ray_data_stats": stats,
        "cpu": cpu,
    }
    if predict.get("first_block_s") is not None and score.get("last_block_end_s") is not None:
        window = score["last_block_end_s"] - predict["first_block_s"]
        fig.update(
            window_s=window,
            outside_s=seconds - window,
            window_samples_per_s=items / window if window > 0 else None,
        )
    fig["_metrics"] = [
        {k: v for k, v in r.items() if k in ("item_id", "model", *PER_SAMPLE_COLUMNS)} for r in timers.samples
    ]
    return fig


def ray_threads(num_cpus: float, threads: int) -> dict[str, Any]:
    """Thread counts in a Ray worker with an actor's CPUs, after the stages' own torch.set_num_threads."""
    import ray

    @ray.remote(num_cpus=num_cpus)
    def probe(n: int) -> dict[str, Any]:
        if n:
            import torch

            torch.set_num_threads(n)
        return thread_report()

    return ray.get(probe.remote(threads))


def start_ray(cores: int) -> str:
    """A local cluster of our own (never one from RAY_ADDRESS or `ray start`); returns its temp dir."""
    import ray

    tmp = tempfile.mkdtemp(prefix="rle-", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    ray.init(
        address="local",
        num_cpus=cores,
        include_dashboard=False,
        _temp_dir=tmp,
        log_to_driver=False,
        logging_level="warning",
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    return tmp


# ---------------------------------------------------------------------------------------------- setup
def make_dataset(folder: Path, items: int, size: int) -> dict[str, Any]:
    """Synthetic scenes (seeds 0, 1, ...) until ``items`` test rows, the first ``items`` written as one shard."""
    from reflade.engine.config import EngineConfig
    from reflade.engine.pipeline import synthetic_rows
    from reflade.engine.schema import write_shard
    from reflade.engine.synth import make_scene

    rows: list[dict[str, Any]] = []
    seed = 0
    while len(rows) < items:
        rows += synthetic_rows(
            make_scene(seed, size=(size, size)), f"scene-{seed:06d}", "bench-eval", "test", EngineConfig()
        )
        seed += 1
    rows = rows[:items]
    (folder / "shards").mkdir(parents=True)
    write_shard(rows, str(folder / "shards" / "part-00000.parquet"))
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("foreground", "background")}
    return {"rows": len(rows), "scenes": seed, "kinds": kinds}


def start_world(root: Path, items: int, size: int) -> dict[str, Any]:
    """SeaweedFS on free ports with generated credentials (its location and a credentials file put in this
    process's environment, which Ray workers and the local process inherit), a registry under a fresh prefix
    holding the dataset, the tiny RefLayer and the stand-in feature networks. The caller stops ``server``."""
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
        creds_file = root / "aws_credentials"
        write_credentials_file(creds_file, server.credentials)
        # Ray workers and the local process inherit these (no key in a runtime_env); the driver's config gets
        # the keys directly.
        os.environ.update(
            REFLADE_STORAGE_ENDPOINT=server.endpoint,
            REFLADE_STORAGE_BUCKET=BUCKET,
            AWS_SHARED_CREDENTIALS_FILE=str(creds_file),
        )
        prefix = f"bench-eval-{uuid.uuid4().hex[:8]}"
        cfg = load_config(
            env={
                "REFLADE_STORAGE_ENDPOINT": server.endpoint,
                "REFLADE_STORAGE_BUCKET": BUCKET,
                "AWS_ACCESS_KEY_ID": server.credentials.access_key_id,
                "AWS_SECRET_ACCESS_KEY": server.credentials.secret_access_key,
                "REFLADE_REGISTRY_PREFIX": prefix,
            }
        )
        registry = Registry.from_config(cfg)
        dataset = registry.create("dataset", "bench-eval", root / "dataset", progress=False)
        # The tiny RefLayer as tests/eval/test_eval_job.py builds it, with the product's tiny VAE (random init).
        bundle = build_reflayer(
            "tiny", vae=build_tiny_vae(size, seed=0), text=MiniLMTextEncoder(minilm_folder()), seed=0
        )
        model = registry.create("model", "reflayer", bundle.save(root / "model"), progress=False).ref
        networks = register_stand_ins(registry)
    except BaseException:
        server.stop()
        raise
    return {
        "server": server,
        "cfg": cfg,
        "prefix": prefix,
        "registry": registry,
        "data": data,
        "dataset": dataset,
        "model": model,
        "networks": networks,
    }


def _isolate_environment() -> None:
    """Drop object-store, registry and Ray settings inherited from the caller (a test session, `reflade up`)."""
    for k in list(os.environ):
        if k.startswith(("AWS_", "REFLADE_")) or k == "RAY_ADDRESS":
            del os.environ[k]


# ---------------------------------------------------------------------------------------------- report
def _brief(fig: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "tag",
        "items",
        "seconds",
        "samples_per_s",
        "score_s",
        "score_samples_per_s",
        "window_samples_per_s",
        "outside_s",
        "batch_size",
        "predict_s",
    )
    return {k: fig[k] for k in keys if k in fig}


def _break_even(fig: dict[str, Any], need_rate: float) -> int | None:
    """Items from which (a) reaches ``need_rate`` with its outside_s fixed and its window rate held."""
    rate, fixed = fig.get("window_samples_per_s"), fig.get("outside_s")
    if not rate or fixed is None or rate <= need_rate:
        return None
    return max(1, math.ceil(fixed / (1 / need_rate - 1 / rate)))


def summarize(result: dict[str, Any]) -> None:
    runs = result["runs"]
    if not runs["ray"] or not runs.get("loop") or not runs.get("batched"):
        return
    loop = max(runs["loop"], key=lambda r: r["samples_per_s"])
    batched = max(runs["batched"], key=lambda r: r["samples_per_s"])
    cold, warm = runs["ray"][0], (runs["ray"][1] if len(runs["ray"]) > 1 else None)
    lr, br = loop["samples_per_s"], batched["samples_per_s"]
    s: dict[str, Any] = {
        "arms": {"ray": _brief(cold), "loop": _brief(loop), "batched": _brief(batched)},
        "ray_over_loop": cold["samples_per_s"] / lr,
        "ray_over_batched": cold["samples_per_s"] / br,
        "ray_score_only_over_loop": cold["score_samples_per_s"] / lr,
        "ray_score_only_over_batched": cold["score_samples_per_s"] / br,
        "batched_over_loop": br / lr,
        "targets": {"ray_over_loop": TARGET_RAY_OVER_LOOP, "ray_over_batched": TARGET_RAY_OVER_BATCHED},
    }
    if warm is not None:
        s["arms"]["ray_warm"] = _brief(warm)
        s["ray_over_loop_warm"] = warm["samples_per_s"] / lr
        s["ray_over_batched_warm"] = warm["samples_per_s"] / br
    for key, target in (
        ("ray_over_loop", TARGET_RAY_OVER_LOOP),
        ("ray_over_batched", TARGET_RAY_OVER_BATCHED),
    ):
        s[f"{key}_met"] = s[key] >= target
        if warm is not None:
            s[f"{key}_warm_met"] = s[f"{key}_warm"] >= target
    # The floor: what (a) spends outside the window where blocks ran, a fixed cost per run, and what the window
    # rate allows at any item count.
    floor = []
    for fig in runs["ray"]:
        f = {
            "run": fig["tag"],
            "seconds": fig["seconds"],
            "outside_s": fig.get("outside_s"),
            "startup_s": (fig.get("predict_stage") or {}).get("first_block_s"),
            "report_s": fig["report_s"],
            "register_s": fig["register_s"],
            "window_s": fig.get("window_s"),
            "window_samples_per_s": fig.get("window_samples_per_s"),
        }
        for key, target, rate in (
            ("ray_over_loop", TARGET_RAY_OVER_LOOP, lr),
            ("ray_over_batched", TARGET_RAY_OVER_BATCHED, br),
        ):
            w = fig.get("window_samples_per_s")
            f[f"{key}_window"] = w / rate if w else None
            f[f"{key}_break_even_items"] = _break_even(fig, target * rate)
            f[f"{key}_reachable"] = bool(w and w > target * rate)
        floor.append(f)
    one = [r for k, v in runs.items() if k.startswith("batched@1") for r in v]
    if one:
        b1 = max(one, key=lambda r: r["samples_per_s"])["samples_per_s"]
        s["batched_1thread_samples_per_s"] = b1
        for f in floor:
            f["window_over_batched_1thread"] = (
                f["window_samples_per_s"] / b1 if f["window_samples_per_s"] else None
            )
    s["floor"] = floor
    s["variants"] = [
        {
            "tag": v["tag"],
            "settings": v["settings"],
            "samples_per_s": v["samples_per_s"],
            "ray_over_loop": v["samples_per_s"] / lr,
            "ray_over_batched": v["samples_per_s"] / br,
            "window_samples_per_s": v.get("window_samples_per_s"),
            "outside_s": v.get("outside_s"),
            "startup_s": (v.get("predict_stage") or {}).get("first_block_s"),
            "over_warm": v["samples_per_s"] / warm["samples_per_s"] if warm else None,
            "ray_over_loop_window": v["window_samples_per_s"] / lr if v.get("window_samples_per_s") else None,
            "ray_over_batched_window": v["window_samples_per_s"] / br
            if v.get("window_samples_per_s")
            else None,
            "ray_over_loop_break_even_items": _break_even(v, TARGET_RAY_OVER_LOOP * lr),
            "ray_over_batched_break_even_items": _break_even(v, TARGET_RAY_OVER_BATCHED * br),
        }
        for v in runs.get("ray_variants", [])
    ]
    s["verdict"] = _verdict(s, result["params"]["items"])
    result["summary"] = s


def _verdict(s: dict[str, Any], items: int) -> list[str]:
    out = []
    for key, name, target in (
        ("ray_over_loop", "(a)/(b)", TARGET_RAY_OVER_LOOP),
        ("ray_over_batched", "(a)/(c)", TARGET_RAY_OVER_BATCHED),
    ):
        if s[f"{key}_met"]:
            out.append(f"{name} = {s[key]:.2f}: target >= {target} met on {items} items")
            continue
        best = max(s["floor"], key=lambda f: f["window_samples_per_s"] or 0.0)
        text = f"{name} = {s[key]:.2f}: target >= {target} NOT met on {items} items"
        if best["outside_s"] is not None:
            text += (
                f"; the floor is (a)'s fixed cost of {best['outside_s']:.1f} s per run ({best['run']}: start-up to "
                f"the first PredictStage block {best['startup_s']:.1f} s, report {best['report_s']:.1f} s, "
                f"registration {best['register_s']:.2f} s, the rest of run_eval outside the blocks)"
            )
        if best[f"{key}_reachable"]:
            text += (
                f"; without it (a) runs at {best['window_samples_per_s']:.2f} items/s ({name} "
                f"{best[f'{key}_window']:.2f}), so the target would be met from about "
                f"{best[f'{key}_break_even_items']} items"
            )
        elif best["window_samples_per_s"]:
            text += (
                f"; even without it (a) runs at {best['window_samples_per_s']:.2f} items/s ({name} "
                f"{best[f'{key}_window']:.2f}): NOT reachable at any item count on this machine with these settings"
            )
        out.append(text)
    if s["batched_over_loop"] < TARGET_RAY_OVER_LOOP:
        out.append(
            f"(c)/(b) = {s['batched_over_loop']:.2f}: batching in one process gains less than the (a)/(b) target "
            f"of {TARGET_RAY_OVER_LOOP}; (a) would have to beat the batched process itself by "
            f"{TARGET_RAY_OVER_LOOP / s['batched_over_loop']:.2f}x"
        )
    return out


def _f(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def print_tables(result: dict[str, Any]) -> None:
    p, th, runs = result["params"], result.get("threads", {}), result["runs"]
    print(
        f"\nitems: {p['items']} ({p['dataset_rows']} rows of {p['size']} px synthetic scenes x prompt type "
        f"{', '.join(p['prompt_types'])}) x {len(p['models'])} models ({', '.join(p['models'])}); metric size "
        f"{p['metric_size']}, {p['steps']} steps; stand-in feature networks"
    )
    head = (
        f"{'arm':<44} {'threads':>7} {'batch':>5} {'items':>5} {'seconds':>8} {'samples/s':>9} {'predict s':>9} "
        f"{'score s':>8} {'outside s':>9} {'others %':>8}"
    )
    print(head)
    print("-" * len(head))
    ray_rows = [(r, "") for r in runs["ray"]] + [(r, "variant ") for r in runs.get("ray_variants", [])]
    for r, kind in ray_rows:
        st = r["settings"]
        label = f"{ARMS['ray']} {kind}{r['tag']}"
        print(
            f"{label:<44} {str(2 * st['actors']) + 'x' + str(st['threads']):>7} {st['batch_size']:>5} "
            f"{r['items']:>5} {r['seconds']:>8.2f} {r['samples_per_s']:>9.2f} "
            f"{_f(r['predict_stage'].get('block_wall_s')):>9} {_f(r['score_stage'].get('block_wall_s')):>8} "
            f"{_f(r.get('outside_s')):>9} {r['cpu']['others_pct']:>8.0f}"
        )
    extra = sorted(
        (k for k in runs if "@" in k), key=lambda k: (int(k.split("@")[1]), k != f"loop@{k.split('@')[1]}")
    )
    for arm in ("loop", "batched", *extra):
        base = arm.split("@")[0]
        for r in runs.get(arm, []):
            label = ARMS[base] + (f" ({arm.split('@')[1]} thr, ref.)" if "@" in arm else "")
            print(
                f"{label:<44} {'1x' + str(r['threads']['torch_threads']):>7} {r['batch_size']:>5} {r['items']:>5} "
                f"{r['seconds']:>8.2f} {r['samples_per_s']:>9.2f} {r['predict_s']:>9.2f} {r['score_s']:>8.2f} "
                f"{r['outside_s']:>9.2f} {r['cpu']['others_pct']:>8.0f}"
            )
    print(
        "threads = processes x torch threads each ((a): actors of both pools); (a): seconds = run_eval's call to "
        "return (actor start-up, report, registration included), predict s / score s = Ray Data's summed block "
        "time of each pool, outside s = seconds outside the window from the first PredictStage block to the last "
        "ScoreStage block; (b)/(c): predict s / score s = time in each stage's __call__, outside s = score_local's "
        "own; others % = the CPU share other processes took during the arm"
    )
    for r, kind in ray_rows:
        ps, ss = r["predict_stage"], r["score_stage"]
        print(
            f"(a) {kind}{r['tag']}: run_eval {r['seconds']:.2f} s = _score {r['score_s']:.2f} ({r['score_samples_per_s']:.2f} "
            f"items/s) + write_report {r['report_s']:.2f} + registration {r['register_s']:.2f} + other "
            f"{r['other_s']:.2f}; in _score: PredictStage {ps.get('blocks')} block(s) from {_f(ps.get('first_block_s'))} "
            f"to {_f(ps.get('last_block_end_s'))} s, ScoreStage {ss.get('blocks')} block(s) from "
            f"{_f(ss.get('first_block_s'))} to {_f(ss.get('last_block_end_s'))} s"
        )
    loc = result.get("local")
    if loc:
        print(
            f"(b)/(c) process: read rows {loc['read_s']:.2f} s, expand {loc['expand_s']:.3f} s, build PredictStage "
            f"{loc['predict_build_s']:.2f} s + ScoreStage {loc['score_build_s']:.2f} s, warm-up call "
            f"{loc['warmup_s']:.2f} s (all untimed); the whole process {loc['process_s']:.1f} s"
        )
    if th:
        print(f"threads: driver of (a)   {_fmt_threads(th['driver'])}")
        print(f"         actor of (a)    {_fmt_threads(th['ray_actor'])} (a Ray worker with an actor's CPUs)")
        print(f"         (b)/(c) process {_fmt_threads(th['local'])}")
    for arm, c in result.get("consistency", {}).items():
        d = ", ".join(f"{k} {v:.2g}" for k, v in c["max_abs_diff"].items())
        print(f"{arm}: same (item, model) pairs as (c): {c['same_pairs']} ({c['pairs']}); max |diff|: {d}")

    s = result.get("summary")
    if not s:
        return
    print()
    for key, name, target in (
        ("ray_over_loop", "(a)/(b)", TARGET_RAY_OVER_LOOP),
        ("ray_over_batched", "(a)/(c)", TARGET_RAY_OVER_BATCHED),
    ):
        text = f"{name} = {s[key]:.2f} (target >= {target}: {'met' if s[f'{key}_met'] else 'NOT met'})"
        if f"{key}_warm" in s:
            text += f"; warm rerun {s[f'{key}_warm']:.2f} ({'met' if s[f'{key}_warm_met'] else 'NOT met'})"
        print(text)
    print(
        f"_score alone: (a)/(b) = {s['ray_score_only_over_loop']:.2f}, (a)/(c) = "
        f"{s['ray_score_only_over_batched']:.2f}; (c)/(b) = {s['batched_over_loop']:.2f}"
    )
    for f in s["floor"]:
        one = f.get("window_over_batched_1thread")
        print(
            f"(a) {f['run']}: outside the blocks {_f(f['outside_s'])} s of {f['seconds']:.2f} s (start-up to the first "
            f"PredictStage block {_f(f['startup_s'])} s); in the window {_f(f['window_samples_per_s'])} items/s = "
            f"{_f(f['ray_over_loop_window'])} x (b), {_f(f['ray_over_batched_window'])} x (c)"
            + (f", {one:.2f} x (c) at 1 thread" if one else "")
        )
    loc = result.get("local")
    if loc:
        print(
            f"(the window includes each actor's first calls, which the (b)/(c) process makes before its timed runs: "
            f"its warm-up call on one item took {loc['warmup_s']:.2f} s)"
        )
    for v in s["variants"]:
        reach = "; ".join(
            f"{name} target from about {v[f'{key}_break_even_items']} items"
            if v[f"{key}_break_even_items"]
            else f"{name} target at no item count"
            for key, name in (("ray_over_loop", "(a)/(b)"), ("ray_over_batched", "(a)/(c)"))
        )
        print(
            f"variant {v['tag']}: {v['samples_per_s']:.2f} items/s ({_f(v['over_warm'])} x the warm run; (a)/(b) "
            f"{v['ray_over_loop']:.2f}, (a)/(c) {v['ray_over_batched']:.2f}); start-up {_f(v['startup_s'])} s, "
            f"outside the blocks {_f(v['outside_s'])} s, in the window {_f(v['window_samples_per_s'])} items/s = "
            f"{_f(v['ray_over_loop_window'])} x (b), {_f(v['ray_over_batched_window'])} x (c): {reach}"
        )
    print()
    for line in s["verdict"]:
        print(line)
    for n in result.get("notes", []):
        print(f"note: {n}")


# ---------------------------------------------------------------------------------------------- main
def _variant_settings(name: str, base, threads: int) -> tuple[Any, int]:
    """(EvalConfig, split block rows) of a variant."""
    if name == "threads":
        return dataclasses.replace(base, threads=threads), 0
    if name == "split":
        return base, base.batch_size
    if name == "split-actors2":
        return dataclasses.replace(
            base, actors=2, num_cpus=0.25, threads=max(1, threads // 4)
        ), base.batch_size
    raise ValueError(name)


def run(args) -> int:
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    from reflade.eval.config import DEFAULT_PROMPT_TYPES, STAND_IN_NETWORKS, EvalConfig
    from reflade.platform.worker import storage_fields

    _isolate_environment()
    ray_threads_each = max(1, args.threads // (2 * args.actors))
    result: dict[str, Any] = {
        "benchmark": "eval",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
        "params": {
            "items": args.items,
            "size": args.size,
            "metric_size": args.metric_size,
            "steps": args.steps,
            "guidance": 1.0,
            "seed": 0,
            "batch_size": args.batch_size,
            "actors": args.actors,
            "num_cpus": args.num_cpus,
            "cores": args.cores,
            "threads": args.threads,
            "ray_threads_per_actor": ray_threads_each,
            "local_threads": args.threads,
            "local_extra_threads": args.local_extra_threads,
            "repeat_local": args.repeat,
            "ray_runs": args.ray_runs,
            "variants": args.variants,
            "prompt_types": list(DEFAULT_PROMPT_TYPES),
            "quick": args.quick,
            "wait_quiet_s": args.wait_quiet,
            "quiet_below": args.quiet_below,
        },
        "definitions": DEFINITIONS,
        "targets": {"ray_over_loop": TARGET_RAY_OVER_LOOP, "ray_over_batched": TARGET_RAY_OVER_BATCHED},
        "machine": machine_info(),
        "loadavg": {"start": _loadavg()},
        "runs": {"ray": [], "loop": [], "batched": [], "ray_variants": []},
        "summary": None,
        "notes": [],
    }
    m = result["machine"]
    print(
        f"eval benchmark | {m['cpus_usable']} usable CPUs ({m['cpu_model']}), {m['memory_gib']} GiB | Python "
        f"{m['python']} | ray {m['ray']} | torch {m['torch']} | load average {result['loadavg']['start']}",
        flush=True,
    )
    print(
        f"threads: (a) {2 * args.actors} actors (PredictStage and ScoreStage pools of {args.actors}, num_cpus "
        f"{args.num_cpus} each) x EvalConfig.threads={ray_threads_each} on a cluster of {args.cores} CPUs; (b)/(c) "
        f"one process x {args.threads}",
        flush=True,
    )
    meter = CpuMeter()
    root = Path(tempfile.mkdtemp(prefix="rle-bench-", dir="/tmp"))
    world, status = None, 0
    try:
        t = time.perf_counter()
        world = start_world(root, args.items, args.size)
        cfg, prefix, data = world["cfg"], world["prefix"], world["data"]
        dataset, model, networks = world["dataset"], world["model"], world["networks"]
        models = [model, "copy-visible", "classical"]  # run_eval's order: the subject, then the baselines
        result["params"].update(
            dataset_rows=data["rows"],
            scenes=data["scenes"],
            kinds=data["kinds"],
            dataset=f"{dataset.ref}:test",
            model=model,
            networks=networks,
            models=models,
        )
        print(
            f"setup {time.perf_counter() - t:.1f} s: {data['rows']} rows ({data['kinds']['foreground']} foreground, "
            f"{data['kinds']['background']} background) from {data['scenes']} scenes of {args.size} px -> "
            f"{dataset.ref}; {model}; stand-ins {', '.join(networks.values())}",
            flush=True,
        )

        # (b), (c): first, while no Ray cluster is up.
        spec = {
            "threads": args.threads,
            "extra_threads": args.local_extra_threads,
            "storage_fields": storage_fields(cfg),
            "prefix": prefix,
            "dataset": dataset.ref,
            "split": "test",
            "prompt_types": list(DEFAULT_PROMPT_TYPES),
            "models": models,
            "networks": dict(networks),
            "metric_size": args.metric_size,
            "steps": args.steps,
            "guidance": 1.0,
            "seed": 0,
            "batch_size": args.batch_size,
            "cache_dir": str(root / "cache-local"),
            "repeat": args.repeat,
            "wait_quiet": args.wait_quiet,
            "quiet_below": args.quiet_below,
        }
        print(f"\n{ARMS['loop']} and {ARMS['batched']}: one fresh process, no Ray cluster up", flush=True)
        local = run_local(spec, root, meter)
        local_metrics = local.pop("metrics")
        local_runs = local.pop("runs")
        result["local"] = local
        for arm, figs in local_runs.items():
            result["runs"][arm] = figs
            for r in figs:
                print(
                    f"  {ARMS[arm.split('@')[0]]}{' at ' + arm.split('@')[1] + ' thread(s)' if '@' in arm else ''}: "
                    f"{r['samples_per_s']:.2f} items/s ({r['seconds']:.1f} s; predict {r['predict_s']:.1f} s, score "
                    f"{r['score_s']:.1f} s; others {r['cpu']['others_pct']:.0f} %)",
                    flush=True,
                )
        write(result, args.out)

        # (a)
        import ray

        ray_tmp = start_ray(args.cores)
        try:
            settings = EvalConfig(
                dataset=f"{dataset.ref}:test",
                metric_size=args.metric_size,
                steps=args.steps,
                seed=0,
                batch_size=args.batch_size,
                actors=args.actors,
                num_cpus=args.num_cpus,
                threads=ray_threads_each,
                weights_cache=str(root / "cache-ray"),
                **{f"{k}_net": v for k, v in STAND_IN_NETWORKS.items()},
            )
            result["params"]["eval_config"] = dataclasses.asdict(settings)
            result["threads"] = {
                "driver": thread_report(),
                "ray_actor": ray_threads(args.num_cpus, ray_threads_each),
                "local": local["threads"],
            }
            ctx = {"cfg": cfg, "model": model}
            ray_metrics: dict[str, list] = {}
            plan = [
                ("cold" if i == 0 else ("warm" if i == 1 else f"warm{i}"), None) for i in range(args.ray_runs)
            ]
            plan += [(v, v) for v in args.variants]
            for tag, variant in plan:
                st, split = (
                    (settings, 0) if variant is None else _variant_settings(variant, settings, args.threads)
                )
                label = f"{ARMS['ray']} ({'variant ' if variant else ''}{tag})"
                print(f"\n{label}", flush=True)
                quiet = wait_quiet(args.wait_quiet, args.quiet_below)
                fig = run_ray_arm(ctx, st, tag, meter, split=split)
                fig["quiet"] = quiet
                ray_metrics[("variant " if variant else "") + tag] = fig.pop("_metrics")
                result["runs"]["ray_variants" if variant else "ray"].append(fig)
                print(
                    f"  {fig['samples_per_s']:.2f} items/s ({fig['seconds']:.1f} s; _score {fig['score_s']:.1f} s, "
                    f"first PredictStage block at {_f(fig['predict_stage'].get('first_block_s'))} s; report "
                    f"{fig['report_s']:.1f} s, registration {fig['register_s']:.2f} s; others "
                    f"{fig['cpu']['others_pct']:.0f} %)",
                    flush=True,
                )
                summarize(result)
                write(result, args.out)
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)

        ref = _per_item_metrics(local_metrics["batched"])
        result["consistency"] = {"(b)": compare_metrics(_per_item_metrics(local_metrics["loop"]), ref)}
        for tag, rows in ray_metrics.items():
            result["consistency"][f"(a) {tag}"] = compare_metrics(_per_item_metrics(rows), ref)
        if not all(c["same_pairs"] for c in result["consistency"].values()):
            result["notes"].append("the arms did not score the same (item, model) pairs: see consistency")
        summarize(result)
    except Exception:
        status = 1
        raise
    finally:
        if world is not None:
            world["server"].stop()
        shutil.rmtree(root, ignore_errors=True)
        result["loadavg"]["end"] = _loadavg()
        result["status"] = "ok" if status == 0 else "failed"
        write(result, args.out)

    print_tables(result)
    print(f"\nwrote {args.out}")
    return status


def _variant_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown variants {unknown}; known: {', '.join(VARIANTS)} (or none)"
        )
    return names


def _int_list(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated thread counts, got {text!r}") from None
    if any(n < 1 for n in out):
        raise argparse.ArgumentTypeError("thread counts must be >= 1")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--local-worker"]:  # the (b)/(c) process run_local starts
        out = local_arms(json.loads(Path(argv[1]).read_text()))
        Path(argv[2]).write_text(json.dumps(out, default=str))
        return 0
    cpus = _usable_cpus()
    ap = argparse.ArgumentParser(
        description=(
            "Evaluation samples/s (items, every model scored) on the same items: (a) the product's Ray job "
            "run_eval (actor pools), (b) score_local with batch 1, (c) score_local batched. Starts its own "
            "SeaweedFS (free ports, generated credentials) and local Ray cluster and stops them; prints a table "
            "and writes JSON to --out."
        )
    )
    ap.add_argument("--items", type=int, default=40, help="items = dataset rows scored (default 40)")
    ap.add_argument("--size", type=int, default=64, help="synthetic scene size in pixels (default 64)")
    ap.add_argument(
        "--metric-size",
        type=int,
        default=64,
        help="EvalConfig.metric_size (default 64: the scenes' own size; the product's default is 256)",
    )
    ap.add_argument(
        "--steps", type=int, default=20, help="the model's sampling steps (default 20, EvalConfig's)"
    )
    ap.add_argument("--batch-size", type=int, default=8, help="EvalConfig.batch_size and (c)'s (default 8)")
    ap.add_argument("--actors", type=int, default=1, help="EvalConfig.actors, per pool (default 1)")
    ap.add_argument("--num-cpus", type=float, default=0.5, help="EvalConfig.num_cpus per actor (default 0.5)")
    ap.add_argument(
        "--threads",
        type=int,
        default=cpus,
        help=f"T, threads per arm in all (default: the usable CPUs, {cpus}); each actor of (a) gets "
        "max(1, T // (2 x actors)), the (b)/(c) process T",
    )
    ap.add_argument(
        "--local-extra-threads",
        type=_int_list,
        default=[1],
        help="(b) and (c) once more at each of these thread counts, for reference (default 1; '' for none)",
    )
    ap.add_argument("--cores", type=int, default=cpus, help=f"CPUs of the local Ray cluster (default {cpus})")
    ap.add_argument(
        "--repeat", type=int, default=2, help="runs of (b) and of (c); the fastest is compared (default 2)"
    )
    ap.add_argument("--ray-runs", type=int, default=2, help="runs of (a): cold, then warm reruns (default 2)")
    ap.add_argument(
        "--variants",
        type=_variant_list,
        default=list(VARIANTS),
        help=f"extra runs of (a) on the warm cluster, comma-separated: {', '.join(VARIANTS)} ('' for none)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=120.0,
        help="before each arm, wait up to this many seconds for other processes to use less than --quiet-below of "
        "the machine (0: never wait; default 120)",
    )
    ap.add_argument(
        "--quiet-below",
        type=float,
        default=0.25,
        help="share of the machine's CPUs that may be busy for it to count as quiet (default 0.25)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a short run for tests: 6 items, 2 steps, batch 4, (b)/(c) once, (a) once, no variants, no extra "
        "thread counts, no waiting",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result file (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.quick:
        args.items, args.steps, args.batch_size, args.ray_runs, args.repeat = 6, 2, 4, 1, 1
        args.variants, args.local_extra_threads, args.wait_quiet = [], [], 0.0
    for name in (
        "items",
        "size",
        "metric_size",
        "steps",
        "batch_size",
        "actors",
        "threads",
        "cores",
        "repeat",
    ):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.ray_runs < 1 or args.num_cpus <= 0:
        ap.error("--ray-runs must be >= 1 and --num-cpus > 0")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
