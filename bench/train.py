"""Benchmark: RefLayer training samples/s (tiny preset, 64 px) under Ray Train against a plain PyTorch loop.

Three arms, compared in ONE run on the same data (one registered dataset of synthetic scenes' rows), the same
model and seed, the same per-worker batch (``--batch``) and the same number of optimiser steps (``--steps``):

(a) Ray Train, 1 worker: ``run_training`` (Ray Data streams the dataset's ``train`` split from the object store and
    decodes it with ``preprocess_row``; the worker runs ``train_step``; asynchronous checkpoints every
    ``--checkpoint-every`` steps), ``torch_threads=T``;
(b) Ray Train, 2 workers (DDP over gloo), ``torch_threads=T//2`` each;
(c) plain: ``train_plain`` (the same step function) in a fresh process (spawned, so its peak RSS is its own) with
    ``torch.set_num_threads(T)``, on the same rows decoded beforehand with the same ``preprocess_row`` (the decoding
    is timed apart: Ray Data does it inside arm (a)'s run, on the same cores).

T = ``--threads`` (default: the usable CPUs), so every arm has all cores. The plain arm runs first in each round of
``--repeat``, while no Ray cluster is up; then a local Ray cluster of ``--cores`` CPUs (its own temp dir) runs (a)
and (b). The script starts an embedded SeaweedFS on free ports with generated credentials (the registry, the
dataset and the checkpoints live there) and stops everything at the end.

Warm-up is excluded the same way in every arm: the first K steps (``--warmup-steps`` rounded up to a report,
``--report-every``) are not timed. Ray's figures come from the JSON lines rank 0 writes at each report
(``metrics_jsonl``); the plain loop's from a timestamp after each step. See DEFINITIONS (also in the JSON).
Metrics lines come every ``--report-every`` steps, by default TrainSettings' (what ``reflade train`` does); a
metrics-only ``ray.train.report`` follows one only when ``--report-interval`` seconds (TrainSettings'
``report_interval_s``, 2.5) have passed since the last report: Ray Train 2.60 holds one unconsumed report per
worker and its controller collects it every 2 s, so reports closer together than that wait in
``ray.train.report`` (``--report-interval 0`` shows it); the table shows the report calls' durations.

The machine may be shared: before each arm the script waits (``--wait-quiet``) for other processes to go quiet, and
records the CPU seconds of its own process tree and of the whole machine during each arm ("others %"), and the
load average at the start and the end.

    .venv/bin/python bench/train.py [--steps 200] [--batch 8] [--threads 2] [--repeat 1] [--checkpoint-every 50]
                                    [--report-every 5] [--report-interval 2.5] [--quick] [--out bench/results/train.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "train.json"
BUCKET = "reflade-bench"
RESOLUTION = 64  # the tiny preset's
TARGET_RAY_OVER_PLAIN = 0.9
ARMS = {
    "ray1": "(a) Ray Train, 1 worker",
    "ray2": "(b) Ray Train, 2 workers",
    "plain": "(c) plain loop",
}
DEFINITIONS = {
    "warmup_steps": "K: --warmup-steps rounded up to a multiple of --report-every; steps 1..K of every arm are "
    "not timed",
    "samples_per_s": "steady state, all ranks: samples of steps K+1..N / wall seconds from the end of step K to the "
    "end of step N. Ray: from rank 0's report lines (wall_s at the report of step K and of step N), so "
    "it includes the reports and checkpoints in between (metrics, param checksum, ray.train.report, "
    "state.pt written); plain: from a timestamp after each step",
    "compute_samples_per_s": "samples of steps K+1..N / the sum of their step times (a step = fetching its batch, "
    "encoding it with the frozen VAE/text encoder, forward, backward, optimiser); Ray: excludes the report "
    "calls, includes waiting for Ray Data",
    "ray1_over_plain": "samples_per_s(a) / samples_per_s(c); target >= 0.9 (Ray costs under 10 %)",
    "ray2_over_ray1": "samples_per_s(b) / samples_per_s(a): two DDP workers of T/2 threads against one of T",
    "ray1_over_plain_incl_decode": "samples_per_s(a) / the plain rate charged with its decoding: samples / (plain "
    "steady seconds + preprocess_row seconds of those samples); the plain arm decodes before its timed loop, "
    "Ray Data decodes during arm (a)",
    "median_step_s": "median step time over steps K+1..N",
    "median_step_samples_per_s": "samples per step (all ranks) / median_step_s: the typical step's rate, robust to "
    "a few steps slowed by other processes, blind to the time between steps (reports, checkpoints)",
    "ray1_over_plain_median_step": "median_step_samples_per_s(a) / median_step_samples_per_s(c)",
    "checkpoint": "per checkpoint report that another report follows: report_call_s = its last_report_call_s "
    "(state.pt written + ray.train.report with CheckpointUploadMode.ASYNC), first_step_after_s = the step time "
    "of the step right after it, next3_mean_s = mean of the 3 steps after it; compared with the median step and "
    "with the median metrics-only report call (and the median first step after such a report)",
    "peak_rss_mib": "Ray: max_rss_mib of each rank at the last report (resource.getrusage ru_maxrss of the "
    "worker process); plain: ru_maxrss of the plain process, which also holds every pre-decoded batch "
    "(data_mib)",
    "end_to_end": "Ray: fit_s = TorchTrainer.fit() (worker group start, imports, model build, dataset "
    "pipeline, the loop, the final checkpoint, shutdown), run_training_s = the whole call (plus the final "
    "model's registration), loop_s = the worker's loop (wall_s at the last report); plain: process_s = "
    "spawning the process to its result (imports, model build, decoding, the loop), loop_s = train_plain",
    "first_step_s": "the first optimiser step (Ray: includes Ray Data's start-up, the first batch); not timed",
    "cpu": "CPU seconds during the arm: own = this process tree (driver, plain process, Ray's daemons and "
    "workers; sampled every 0.5 s), machine = all CPUs busy (psutil.cpu_times), others_pct = 100 * (machine - "
    "own) / (CPUs * wall): the share of the machine other processes took; steal_pct = CPU time the hypervisor "
    "gave other guests while this one wanted it (not in machine)",
    "quiet": "before each arm, up to --wait-quiet s waiting for the machine to be busy less than --quiet-below",
    "loadavg": "os.getloadavg() (1, 5, 15 min) before and after: other processes may share the machine",
    "report_blocking": "Ray Train 2.60 (v2) keeps one unconsumed report per worker (a queue of size 1) and its "
    "controller takes it every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): a report less than that after "
    "the previous one waits in ray.train.report",
}


# ---------------------------------------------------------------------------------------------- helpers
def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def collate(samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """``preprocess_row`` outputs -> one numpy batch (``image`` (B,3,R,R), ``layer`` (B,4,R,R), ``canvas``
    (B,3,R,R), ``text`` (B,) strings), the shape Ray Data hands the worker."""
    return {
        k: np.array([s[k] for s in samples]) if k == "text" else np.stack([s[k] for s in samples])
        for k in samples[0]
    }


class CpuMeter:
    """CPU seconds of this process tree and of the whole machine over one arm (the machine may be shared)."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.root = psutil.Process()
        self.cpus = psutil.cpu_count() or 1

    def _busy(self) -> tuple[float, float]:
        """Busy CPU seconds of the machine (steal included: a hypervisor's other guests) and steal alone."""
        t = self.psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0), getattr(t, "steal", 0.0)

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
        """``fn()``'s value and the CPU figures of its run (see DEFINITIONS["cpu"])."""
        base, seen, stop = self._tree(), {}, threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                seen.update(self._tree())

        thread = threading.Thread(target=sample, daemon=True)
        (busy0, steal0), t0 = self._busy(), time.perf_counter()
        thread.start()
        try:
            value = fn()
        finally:
            stop.set()
            thread.join()
            seen.update(self._tree())
        busy1, steal1 = self._busy()
        wall, machine, steal = time.perf_counter() - t0, busy1 - busy0 - (steal1 - steal0), steal1 - steal0
        own = sum(max(0.0, c - base.get(pid, 0.0)) for pid, c in seen.items())
        capacity = self.cpus * wall
        cpu = {
            "wall_s": wall,
            "own_cpu_s": own,
            "machine_cpu_s": machine,
            "own_pct": 100 * own / capacity,
            "others_pct": 100 * max(0.0, machine - own) / capacity,
            "steal_pct": 100 * steal / capacity,
            "machine_cpus": self.cpus,
        }
        return value, cpu

    def wait_quiet(self, max_wait_s: float, below: float) -> dict[str, Any]:
        """Wait (up to ``max_wait_s``) until the machine is busy less than ``below`` (a share of its CPUs) over
        one second; this run is idle meanwhile, so what is busy is other processes (and Ray's idle daemons)."""
        t0 = time.perf_counter()
        while True:
            share = self.psutil.cpu_percent(interval=1.0) / 100.0
            waited = time.perf_counter() - t0
            if share < below or waited >= max_wait_s:
                return {"waited_s": round(waited, 1), "busy_share": round(share, 3), "quiet": share < below}


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)


# ---------------------------------------------------------------------------------------------- data
def make_dataset(folder: Path, rows_needed: int, shard_rows: int = 512) -> dict[str, Any]:
    """Synthetic scenes (seeds 0, 1, ..., 64x64) until ``rows_needed`` rows, written as Parquet shards under
    ``folder/shards`` (the layout of a registered dataset version)."""
    from reflade.engine.config import EngineConfig
    from reflade.engine.pipeline import synthetic_rows
    from reflade.engine.schema import write_shard
    from reflade.engine.synth import make_scene

    ecfg = EngineConfig()
    rows: list[dict[str, Any]] = []
    seed = 0
    while len(rows) < rows_needed:
        scene = make_scene(seed, size=(RESOLUTION, RESOLUTION))
        rows += synthetic_rows(scene, f"scene-{seed:06d}", "bench-train", "train", ecfg)
        seed += 1
    shards = folder / "shards"
    shards.mkdir(parents=True)
    paths = []
    for i in range(0, len(rows), shard_rows):
        path = shards / f"part-{i // shard_rows:05d}.parquet"
        write_shard(rows[i : i + shard_rows], str(path))
        paths.append(str(path))
    return {"rows": len(rows), "scenes": seed, "shards": paths}


# ---------------------------------------------------------------------------------------------- (c) plain
def plain_process(spec: dict[str, Any]) -> dict[str, Any]:
    """Arm (c), run in a spawned process: the same rows, decoded first (timed apart), then ``train_plain``."""
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    from reflade.engine.schema import read_table, table_to_rows
    from reflade.train.config import TrainSettings
    from reflade.train.model import build_reflayer
    from reflade.train.plain_loop import train_plain
    from reflade.train.preprocess import preprocess_row

    settings = TrainSettings(**spec["settings"])
    bundle = build_reflayer(settings.preset, vae=spec["vae_dir"], seed=settings.seed)
    rss_model = _max_rss_mib()
    b, n = settings.batch_size, settings.steps
    rows = table_to_rows(read_table(spec["shards"], split="train"))[: n * b]
    t = time.perf_counter()
    # Batch by batch, so that the peak RSS holds the decoded batches once (no list of samples beside them).
    batches = [
        collate([preprocess_row(r, RESOLUTION, settings.seed) for r in rows[i : i + b]])
        for i in range(0, len(rows) - b + 1, b)
    ]
    decode_s = time.perf_counter() - t
    del rows
    data_mib = sum(a.nbytes for batch in batches for a in batch.values()) / 2**20

    stamps: list[float] = []  # after each step (train_plain logs every report_every = 1 steps)
    t_call = time.perf_counter()
    m = train_plain(
        bundle,
        batches,
        dataclasses.replace(settings, report_every=1),
        log=lambda _msg: stamps.append(time.perf_counter()),
    )
    if len(stamps) != n:
        raise RuntimeError(f"expected a timestamp after each of {n} steps, got {len(stamps)}")
    ends = [t_call, *stamps]
    step_times = [ends[i + 1] - ends[i] for i in range(n)]
    k = spec["warmup_steps"]
    timed = step_times[k:]
    steady_wall = ends[n] - ends[k]
    return {
        "pid": os.getpid(),
        "threads": {
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
        },
        "world_size": 1,
        "steps": n,
        "samples": m["samples"],
        "batches_distinct": len(batches),
        "loss_last": m["loss"],
        "samples_per_s": (n - k) * b / steady_wall,
        "compute_samples_per_s": (n - k) * b / sum(timed),
        "all_steps_samples_per_s": m["samples_per_s"],
        "median_step_s": _median(timed),
        "median_step_samples_per_s": b / _median(timed),
        "first_step_s": step_times[0],
        "step_times_s": step_times,
        "decode_ms_per_sample": 1000 * decode_s / max(1, len(batches) * b),
        "data_mib": data_mib,
        "rss_after_model_mib": rss_model,
        "peak_rss_mib": [_max_rss_mib()],
        "loop_s": m["wall_s"],
        "process_inner_s": time.perf_counter() - t_start,
    }


def run_plain(spec: dict[str, Any], meter: CpuMeter) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(plain_process, spec).result()

    load = _loadavg()
    fig, cpu = meter.measure(go)
    fig.update(process_s=cpu["wall_s"], cpu=cpu, loadavg_before=load, loadavg_after=_loadavg())
    return fig


# ---------------------------------------------------------------------------------------------- (a), (b) Ray
def analyse_reports(reports: list[dict[str, Any]], batch: int, world: int, warmup: int) -> dict[str, Any]:
    """Rank 0's report lines -> steady samples/s, step times, checkpoint figures, peak RSS (see DEFINITIONS)."""
    reports = sorted(reports, key=lambda r: r["step"])
    steps: list[tuple[int, float]] = []  # (step number, seconds)
    for r in reports:
        times = r["step_times_s"]
        first = r["step"] - len(times) + 1
        steps += [(first + i, t) for i, t in enumerate(times)]
    # The loop's clock (wall_s) starts at step 0: with no warm-up the window starts there.
    base = (
        {"step": 0, "wall_s": 0.0} if warmup == 0 else next((r for r in reports if r["step"] >= warmup), None)
    )
    if base is None or base["step"] != warmup:
        raise RuntimeError(f"no report at step {warmup} (reports at {[r['step'] for r in reports]})")
    last = reports[-1]
    if last["step"] <= warmup:
        raise RuntimeError(f"nothing to time after the warm-up ({warmup} of {last['step']} steps)")
    timed = [t for s, t in steps if s > warmup]
    per_step = batch * world

    checkpoints, report_calls, after_report = [], [], []
    for r, nxt in zip(reports, reports[1:], strict=False):
        if nxt["last_report_call_s"] is None or not nxt["step_times_s"]:
            continue
        if r["checkpoint"]:
            after = nxt["step_times_s"]
            checkpoints.append(
                {
                    "step": r["step"],
                    "report_call_s": nxt["last_report_call_s"],
                    "first_step_after_s": after[0],
                    "next3_mean_s": _mean(after[:3]),
                }
            )
        elif r["step"] >= warmup:
            report_calls.append(nxt["last_report_call_s"])
            after_report.append(nxt["step_times_s"][0])
    med = _median(timed)
    ck = {
        "events": checkpoints,
        "report_call_median_s": _median([c["report_call_s"] for c in checkpoints]),
        "first_step_after_median_s": _median([c["first_step_after_s"] for c in checkpoints]),
        "metrics_report_call_median_s": _median(report_calls),
        "first_step_after_metrics_report_median_s": _median(after_report),
        "median_step_s": med,
    }
    if ck["first_step_after_median_s"] is not None and med:
        ck["first_step_after_over_median"] = ck["first_step_after_median_s"] / med
    rss = last.get("max_rss_mib_per_rank") or [last["max_rss_mib"]]
    return {
        "world_size": world,
        "steps": last["step"],
        "samples": last["step"] * per_step,
        "loss_last": last["loss"],
        "samples_per_s": (last["step"] - warmup) * per_step / (last["wall_s"] - base["wall_s"]),
        "compute_samples_per_s": len(timed) * per_step / sum(timed),
        "median_step_s": med,
        "median_step_samples_per_s": per_step / med,
        "first_step_s": steps[0][1],
        "step_times_s": [t for _, t in steps],
        "report_steps": [r["step"] for r in reports],
        "checkpoint_steps": [r["step"] for r in reports if r["checkpoint"]],
        "checkpoint": ck,
        "peak_rss_mib": rss,
        "loop_s": last["wall_s"],
    }


def run_ray_arm(ctx: dict[str, Any], settings, threads: int, tag: str, meter: CpuMeter) -> dict[str, Any]:
    from reflade.train.trainer import run_training

    jsonl = ctx["tmp"] / f"metrics-{tag}.jsonl"
    load = _loadavg()
    version, cpu = meter.measure(
        lambda: run_training(
            ctx["cfg"],
            ctx["dataset_ref"],
            settings,
            vae_ref=ctx["vae_ref"],
            run_name=f"bench-{tag}-{uuid.uuid4().hex[:6]}",
            cache_dir=ctx["tmp"] / "cache",
            torch_threads=threads,
            metrics_jsonl=jsonl,
            log=lambda s: print(f"  {s}", flush=True),
        )
    )
    run_s = cpu["wall_s"]
    reports = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    fig = analyse_reports(reports, settings.batch_size, settings.workers, ctx["warmup"])
    fig.update(
        threads={"torch_threads_requested": threads, "cpus_per_worker": settings.cpus_per_worker},
        fit_s=version.metrics["wall_s"],
        run_training_s=run_s,
        model_ref=version.ref,
        cpu=cpu,
        loadavg_before=load,
        loadavg_after=_loadavg(),
    )
    return fig


def start_ray(cores: int) -> str:
    """A local cluster of our own (never one from RAY_ADDRESS or `ray start`); returns its temp dir."""
    import ray

    tmp = tempfile.mkdtemp(prefix="rlt-", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    ray.init(
        address="local",
        num_cpus=cores,
        include_dashboard=False,
        _temp_dir=tmp,
        # The workers' logs stay in the temp dir: without a dashboard, Ray Train's placement-group cleaner warns
        # every second that the State API is unavailable. The figures come from the metrics lines.
        log_to_driver=False,
        logging_level="warning",
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    return tmp


# ---------------------------------------------------------------------------------------------- report
def machine_info() -> dict[str, Any]:
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
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": _usable_cpus(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def summarize(result: dict[str, Any]) -> None:
    """The fastest run of each arm (the least disturbed by other processes) and the ratios between them."""
    best = {arm: max(runs, key=lambda r: r["samples_per_s"]) for arm, runs in result["runs"].items() if runs}
    result["best"] = best
    if not {"plain", "ray1"} <= set(best):
        return
    a, c = best["ray1"], best["plain"]
    plain_with_decode = 1.0 / (1.0 / c["samples_per_s"] + c["decode_ms_per_sample"] / 1000.0)
    s = {
        "plain_samples_per_s": c["samples_per_s"],
        "ray1_samples_per_s": a["samples_per_s"],
        "ray1_over_plain": a["samples_per_s"] / c["samples_per_s"],
        "target_ray1_over_plain": TARGET_RAY_OVER_PLAIN,
        "plain_with_decode_samples_per_s": plain_with_decode,
        "ray1_over_plain_incl_decode": a["samples_per_s"] / plain_with_decode,
        "ray1_compute_over_plain_compute": a["compute_samples_per_s"] / c["compute_samples_per_s"],
        "ray1_over_plain_median_step": a["median_step_samples_per_s"] / c["median_step_samples_per_s"],
        # Milliseconds per sample, (a) against (c): in the steps (incl. waiting for Ray Data) and outside them.
        "ms_per_sample": {
            "plain": 1000 / c["samples_per_s"],
            "ray1": 1000 / a["samples_per_s"],
            "ray1_in_steps": 1000 / a["compute_samples_per_s"],
            "ray1_reports_and_checkpoints": 1000 / a["samples_per_s"] - 1000 / a["compute_samples_per_s"],
            "plain_decode": c["decode_ms_per_sample"],
        },
    }
    s["ray1_over_plain_target_met"] = s["ray1_over_plain"] >= TARGET_RAY_OVER_PLAIN
    if "ray2" in best:
        s["ray2_samples_per_s"] = best["ray2"]["samples_per_s"]
        s["ray2_over_ray1"] = best["ray2"]["samples_per_s"] / a["samples_per_s"]
    result["summary"] = s


def _ms(x: float | None) -> str:
    return f"{1000 * x:.0f}" if x is not None else "-"


def print_tables(result: dict[str, Any]) -> None:
    p = result["params"]
    head = (
        f"{'arm':<25} {'threads':>9} {'samples/s':>9} {'in steps':>8} {'med step ms':>11} {'loop s':>6} "
        f"{'first step s':>12} {'e2e s':>6} {'e2e smp/s':>9} {'peak RSS MiB per process':>24} {'others %':>8} {'steal %':>7}"
    )
    print(head)
    print("-" * len(head))
    for arm in ("ray1", "ray2", "plain"):
        for r in result["runs"].get(arm, []):
            star = " *" if len(result["runs"][arm]) > 1 and r is result["best"].get(arm) else ""
            if arm == "plain":
                threads = f"1x{r['threads']['torch_threads']}"
                e2e = r["process_s"]
            else:
                threads = f"{r['world_size']}x{r['threads']['torch_threads_requested']}"
                e2e = r["fit_s"]
            rss = " / ".join(f"{x:.0f}" for x in r["peak_rss_mib"])
            print(
                f"{ARMS[arm] + star:<25} {threads:>9} {r['samples_per_s']:>9.2f} {r['compute_samples_per_s']:>8.2f} "
                f"{_ms(r['median_step_s']):>11} {r['loop_s']:>6.1f} {r['first_step_s']:>12.2f} {e2e:>6.1f} "
                f"{r['samples'] / e2e:>9.2f} {rss:>24} {r['cpu']['others_pct']:>8.0f} "
                f"{r['cpu'].get('steal_pct', 0.0):>7.0f}"
            )
    print(
        f"samples/s = steady state after the first {p['warmup_steps']} steps, all ranks (Ray: reports and "
        "checkpoints included); in steps = the same samples / the sum of their step times; threads = workers x "
        "torch threads each (Ray: requested via torch_threads); e2e s = Ray: TorchTrainer.fit() (start-up "
        "included), plain: its process from spawn to result (imports, model, decoding included); first step s = the "
        "first optimiser step (Ray: Ray Data's start-up included), not timed; others % = share of the machine's CPUs "
        "other processes used during the arm; steal % = share the hypervisor gave to other guests"
    )
    for arm in ("ray1", "ray2"):
        for r in result["runs"].get(arm, []):
            print(
                f"{ARMS[arm]}: run_training {r['run_training_s']:.1f} s (fit {r['fit_s']:.1f} s + registration; "
                f"fit - loop = {r['fit_s'] - r['loop_s']:.1f} s of start-up, final checkpoint and shutdown)"
            )
    plain = result["best"].get("plain")
    if plain:
        print(
            f"{ARMS['plain']}: decoding (preprocess_row) {plain['decode_ms_per_sample']:.2f} ms/sample, before its "
            f"loop; its peak RSS holds {plain['data_mib']:.0f} MiB of pre-decoded batches "
            f"({plain['rss_after_model_mib']:.0f} MiB after imports and the model)"
        )

    print(f"\nstep time around checkpoints (every {p['checkpoint_every']} steps, CheckpointUploadMode.ASYNC)")
    h2 = (
        f"{'arm':<25} {'ckpt step':>9} {'ckpt report ms':>14} {'step after ms':>13} {'next 3 ms':>9} "
        f"{'median step ms':>14} {'metrics report ms':>17} {'step after it ms':>16}"
    )
    print(h2)
    print("-" * len(h2))
    for arm in ("ray1", "ray2"):
        r = result["best"].get(arm)
        if not r:
            continue
        ck = r["checkpoint"]
        for e in ck["events"] or [{}]:
            print(
                f"{ARMS[arm]:<25} {e.get('step', '-'):>9} {_ms(e.get('report_call_s')):>14} "
                f"{_ms(e.get('first_step_after_s')):>13} {_ms(e.get('next3_mean_s')):>9} {_ms(ck['median_step_s']):>14} "
                f"{_ms(ck['metrics_report_call_median_s']):>17} {_ms(ck['first_step_after_metrics_report_median_s']):>16}"
            )
    print(
        "ckpt report = state.pt written + ray.train.report (the upload runs behind it); step after = the next "
        "optimiser step; metrics report / step after it = medians over reports without a checkpoint"
    )
    for arm in ("ray1", "ray2"):
        r = result["best"].get(arm)
        blocked = r and (r["checkpoint"]["metrics_report_call_median_s"] or 0.0) > 0.1
        if blocked:
            print(
                f"{ARMS[arm]}: metrics-only reports take {_ms(r['checkpoint']['metrics_report_call_median_s'])} ms "
                f"(median): {DEFINITIONS['report_blocking']}; reports came every "
                f"{p['report_every'] * r['median_step_s']:.1f} s (--report-every {p['report_every']} x the median step)"
            )

    s = result.get("summary")
    if s:
        met = "met" if s["ray1_over_plain_target_met"] else "NOT met"
        print(
            f"\n(a)/(c) = {s['ray1_over_plain']:.3f} (target >= {TARGET_RAY_OVER_PLAIN}: {met}); "
            f"with the plain arm charged its decoding: {s['ray1_over_plain_incl_decode']:.3f}; "
            f"in-step rates only: {s['ray1_compute_over_plain_compute']:.3f}; median steps: "
            f"{s['ray1_over_plain_median_step']:.3f}"
        )
        if "ray2_over_ray1" in s:
            print(f"(b)/(a) = {s['ray2_over_ray1']:.3f}")
        ms = s["ms_per_sample"]
        print(
            f"ms per sample: plain {ms['plain']:.2f}; Ray 1 worker {ms['ray1']:.2f} = {ms['ray1_in_steps']:.2f} in "
            f"steps (batch wait included) + {ms['ray1_reports_and_checkpoints']:.2f} in reports and checkpoints; "
            f"decoding {ms['plain_decode']:.2f} (Ray Data, during (a))"
        )
    la = result["loadavg"]
    print(f"load average (1, 5, 15 min): start {la['start']}, end {la.get('end')}")


# ---------------------------------------------------------------------------------------------- main
def _isolate_environment() -> None:
    """Drop object-store, registry and Ray settings inherited from the caller (a test session, `reflade up`):
    this run uses only the stack it starts."""
    for k in list(os.environ):
        if k.startswith(("AWS_", "REFLADE_")) or k == "RAY_ADDRESS":
            del os.environ[k]


def run(args) -> int:
    from reflade.platform.config import load_config
    from reflade.platform.registry import Registry
    from reflade.platform.stack import SeaweedServer, find_free_base_port, generate_credentials
    from reflade.platform.storage import write_credentials_file
    from reflade.train.config import TrainSettings
    from reflade.train.vae import build_tiny_vae

    _isolate_environment()
    warmup = math.ceil(args.warmup_steps / args.report_every) * args.report_every
    rows_needed = args.rows or args.steps * args.batch * 2  # one epoch for both ranks of arm (b)
    result: dict[str, Any] = {
        "benchmark": "train",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
        "params": {
            "preset": "tiny",
            "resolution": RESOLUTION,
            "steps": args.steps,
            "batch_per_worker": args.batch,
            "threads": args.threads,
            "arms": args.arms,
            "threads_per_worker": {
                "ray1": args.threads,
                "ray2": max(1, args.threads // 2),
                "plain": args.threads,
            },
            "cores": args.cores,
            "repeat": args.repeat,
            "checkpoint_every": args.checkpoint_every,
            "report_every": args.report_every,
            "report_interval_s": args.report_interval,
            "warmup_steps": warmup,
            "seed": 0,
            "wait_quiet_s": args.wait_quiet,
            "quiet_below": args.quiet_below,
        },
        "definitions": DEFINITIONS,
        "targets": {"ray1_over_plain": TARGET_RAY_OVER_PLAIN},
        "machine": machine_info(),
        "loadavg": {"start": _loadavg()},
        "runs": {"ray1": [], "ray2": [], "plain": []},
        "best": {},
        "summary": None,
    }
    m = result["machine"]
    print(
        f"RefLayer training, tiny preset {RESOLUTION} px | {m['cpus_usable']} usable CPUs ({m['cpu_model']}) | "
        f"Python {m['python']} | ray {m['ray']} | torch {m['torch']}"
    )
    print(f"load average at start: {result['loadavg']['start']}")
    tp = result["params"]["threads_per_worker"]
    print(
        f"threads: (a) 1 worker x torch_threads={tp['ray1']}, (b) 2 workers x torch_threads={tp['ray2']}, "
        f"(c) torch.set_num_threads({tp['plain']}); Ray cluster of {args.cores} CPUs, 0.5 CPU reserved per worker"
    )

    meter = CpuMeter()

    def quiet() -> dict[str, Any] | None:
        if args.wait_quiet <= 0:
            return None
        q = meter.wait_quiet(args.wait_quiet, args.quiet_below)
        if not q["quiet"]:
            print(
                f"  the machine stayed busy ({100 * q['busy_share']:.0f} % of its CPUs) for {q['waited_s']:.0f} s: "
                "running anyway",
                flush=True,
            )
        return q

    root = Path(tempfile.mkdtemp(prefix="rlt-bench-", dir="/tmp"))
    server = None
    status = 0
    try:
        t = time.perf_counter()
        data = make_dataset(root / "dataset", rows_needed)
        result["params"].update(rows=data["rows"], scenes=data["scenes"], shards=len(data["shards"]))
        print(
            f"dataset: {data['rows']} rows from {data['scenes']} synthetic scenes, {len(data['shards'])} shard(s) "
            f"({time.perf_counter() - t:.1f} s); {args.steps} steps of {args.batch} samples per worker, warm-up "
            f"{warmup} steps not timed, checkpoints every {args.checkpoint_every} steps, reports every "
            f"{args.report_every}"
        )
        vae_dir = root / "tiny-vae"
        build_tiny_vae(RESOLUTION, seed=0).save_pretrained(vae_dir, safe_serialization=True)

        server = SeaweedServer(
            root / "seaweed" / "data", generate_credentials(), s3_port=find_free_base_port()
        )
        server.start(timeout=60)
        server.create_bucket(BUCKET)
        creds_file = root / "aws_credentials"
        write_credentials_file(creds_file, server.credentials)
        # Ray workers inherit these (no key in a runtime_env); the driver's config gets the keys directly.
        os.environ.update(
            REFLADE_STORAGE_ENDPOINT=server.endpoint,
            REFLADE_STORAGE_BUCKET=BUCKET,
            AWS_SHARED_CREDENTIALS_FILE=str(creds_file),
        )
        cfg = load_config(
            env={
                "REFLADE_STORAGE_ENDPOINT": server.endpoint,
                "REFLADE_STORAGE_BUCKET": BUCKET,
                "AWS_ACCESS_KEY_ID": server.credentials.access_key_id,
                "AWS_SECRET_ACCESS_KEY": server.credentials.secret_access_key,
                "REFLADE_REGISTRY_PREFIX": f"bench-train-{uuid.uuid4().hex[:8]}",
            }
        )
        registry = Registry.from_config(cfg)
        dataset = registry.create("dataset", "bench-train", root / "dataset", progress=False)
        vae = registry.create("weights", "tiny-vae", vae_dir, progress=False)
        ctx = {"cfg": cfg, "dataset_ref": dataset.ref, "vae_ref": vae.ref, "tmp": root, "warmup": warmup}
        result["params"].update(dataset=dataset.ref, vae=vae.ref)

        def settings(workers: int) -> TrainSettings:
            return TrainSettings(
                preset="tiny",
                steps=args.steps,
                batch_size=args.batch,
                workers=workers,
                checkpoint_every=args.checkpoint_every,
                report_every=args.report_every,
                report_interval_s=args.report_interval,
                seed=0,
            )

        result["params"]["settings"] = settings(1).to_dict()
        plain_spec = {
            "settings": settings(1).to_dict(),
            "threads": args.threads,
            "vae_dir": str(vae_dir),
            "shards": data["shards"],
            "warmup_steps": warmup,
        }
        import ray

        ray_arms = [
            (arm, workers, threads)
            for arm, workers, threads in (("ray1", 1, args.threads), ("ray2", 2, max(1, args.threads // 2)))
            if arm in args.arms
        ]
        for rep in range(args.repeat):
            if "plain" in args.arms:
                print(f"\nround {rep + 1}/{args.repeat}: {ARMS['plain']} (no Ray cluster up)", flush=True)
                q = quiet()
                fig = run_plain(plain_spec, meter)
                fig.update(repeat=rep, quiet=q)
                result["runs"]["plain"].append(fig)
                summarize(result)
                write(result, args.out)
                print(
                    f"{ARMS['plain']}: {fig['samples_per_s']:.2f} samples/s (torch threads "
                    f"{fig['threads']['torch_threads']}, loop {fig['loop_s']:.1f} s, process {fig['process_s']:.1f} "
                    f"s, others used {fig['cpu']['others_pct']:.0f} % of the machine)",
                    flush=True,
                )
            if not ray_arms:
                continue
            ray_tmp = start_ray(args.cores)
            try:
                for arm, workers, threads in ray_arms:
                    print(f"\nround {rep + 1}/{args.repeat}: {ARMS[arm]}", flush=True)
                    q = quiet()
                    fig = run_ray_arm(ctx, settings(workers), threads, f"{arm}-r{rep}", meter)
                    fig.update(repeat=rep, quiet=q)
                    result["runs"][arm].append(fig)
                    summarize(result)
                    write(result, args.out)
                    print(
                        f"{ARMS[arm]}: {fig['samples_per_s']:.2f} samples/s (loop {fig['loop_s']:.1f} s, fit "
                        f"{fig['fit_s']:.1f} s, others used {fig['cpu']['others_pct']:.0f} % of the machine)",
                        flush=True,
                    )
            finally:
                ray.shutdown()
                shutil.rmtree(ray_tmp, ignore_errors=True)
    except Exception:
        status = 1
        raise
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
        result["loadavg"]["end"] = _loadavg()
        result["status"] = "ok" if status == 0 else "failed"
        write(result, args.out)

    print()
    print_tables(result)
    print(f"\nwrote {args.out}")
    return status


def _arm_list(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if not arms or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {', '.join(ARMS)}, got {text!r}"
        )
    return arms


def main(argv: list[str] | None = None) -> int:
    cpus = _usable_cpus()
    ap = argparse.ArgumentParser(
        description=(
            "Training samples/s of the tiny RefLayer (64 px) on the same data, model, seed, batch and steps: "
            "(a) Ray Train with 1 worker (torch_threads=T), (b) Ray Train with 2 workers (T//2 threads each), "
            "(c) the plain loop train_plain in a fresh process (T threads). Starts its own SeaweedFS (free ports, "
            "generated credentials) and local Ray cluster, and stops them. Reports steady-state samples/s after "
            "a warm-up, (a)/(c) (target >= 0.9) and (b)/(a), peak RSS per worker process, the step time around "
            "the asynchronous checkpoints, and each arm's end-to-end wall; prints a table and writes JSON "
            "(after each arm) to --out."
        ),
    )
    ap.add_argument("--steps", type=int, default=200, help="optimiser steps per arm (default 200)")
    ap.add_argument("--batch", type=int, default=8, help="samples per step per worker (default 8)")
    ap.add_argument(
        "--threads",
        type=int,
        default=cpus,
        help=f"T, torch threads of the plain process and of the 1-worker arm; each of the 2 workers gets T//2 "
        f"(default: the usable CPUs, {cpus})",
    )
    ap.add_argument(
        "--cores",
        type=int,
        default=cpus,
        help=f"CPUs of the local Ray cluster (default: the usable CPUs, {cpus})",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of the three arms; the fastest run of each arm is compared (default 1)",
    )
    ap.add_argument(
        "--checkpoint-every", type=int, default=50, help="Ray arms: checkpoint every N steps (default 50)"
    )
    ap.add_argument(
        "--report-every",
        type=int,
        default=None,
        help="Ray arms: report metrics every N steps (default: TrainSettings' default, what `reflade train` does)",
    )
    ap.add_argument(
        "--report-interval",
        type=float,
        default=None,
        help="Ray arms: least seconds between metrics-only ray.train.report calls (default: TrainSettings' "
        "report_interval_s; 0 reports every --report-every steps and shows Ray Train's 2 s collection blocking)",
    )
    ap.add_argument(
        "--warmup-steps",
        type=int,
        default=20,
        help="steps not timed at the start of every arm, rounded up to a multiple of --report-every (default 20)",
    )
    ap.add_argument(
        "--rows",
        type=int,
        default=0,
        help="dataset rows (default --steps x --batch x 2: one epoch for each rank of the 2-worker arm)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a short run for tests: 12 steps of 4, reports every 4, checkpoints every 8, warm-up 4, one round, "
        "no waiting for a quiet machine",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each arm, wait up to this many seconds for other processes to use less than --quiet-below "
        "of the machine (0: never wait; default 60)",
    )
    ap.add_argument(
        "--quiet-below",
        type=float,
        default=0.25,
        help="share of the machine's CPUs that may be busy for it to count as quiet (default 0.25)",
    )
    ap.add_argument(
        "--arms",
        type=_arm_list,
        default=list(ARMS),
        help="which arms to run, comma-separated: ray1 (a), ray2 (b), plain (c) (default all three)",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result file (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.report_every, args.checkpoint_every = 12, 4, 4, 8
        args.warmup_steps, args.repeat, args.wait_quiet = 4, 1, 0.0
    if args.report_every is None:
        from reflade.train.config import TrainSettings

        args.report_every = TrainSettings().report_every
    if args.report_interval is None:
        from reflade.train.config import TrainSettings

        args.report_interval = TrainSettings().report_interval_s
    if args.report_interval < 0:
        ap.error("--report-interval must be >= 0")
    for name in ("steps", "batch", "threads", "cores", "repeat", "checkpoint_every", "report_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 0:
        ap.error("--warmup-steps must be >= 0")
    if math.ceil(args.warmup_steps / args.report_every) * args.report_every >= args.steps:
        ap.error("--warmup-steps (rounded up to a multiple of --report-every) must leave steps to time")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
