"""bench/engine.py's threads and Ray cluster: every thread pool pinned to one thread in the driver and in the Ray
workers (design.md, Pitfalls), the counts checked in a Ray task and a Ray actor, and the local cluster the benchmark
starts. Imports nothing heavy at import time: ``THREAD_ENV`` is set before anything loads numpy, OpenCV or torch."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

import _bench_machine as bm

THREAD_ENV = {k: "1" for k in bm.THREAD_VARS}
"""Every thread pool a bench process may load, pinned to one thread (OMP, MKL, OpenBLAS, numexpr, numba, OpenCV)."""
KEEP_WORKERS_CONFIG = {"idle_worker_killing_time_threshold_ms": 600_000}


def pin_threads() -> None:
    """Pin every thread pool this process may use to one thread (also the Ray workers' setup hook)."""
    os.environ.update(THREAD_ENV)
    import cv2

    cv2.setNumThreads(1)
    if "torch" in sys.modules:  # torch reads OMP_NUM_THREADS when it loads; set it too if it is already in
        sys.modules["torch"].set_num_threads(1)


def thread_report() -> dict[str, Any]:
    """Thread counts as this process sees them (torch is imported here only to ask it), numba's included."""
    import numba

    return {**bm.thread_report(), "numba_threads": int(numba.config.NUMBA_NUM_THREADS)}


class _ThreadProbe:
    """A Ray Data UDF that reports the thread counts of the worker it runs in (task or actor)."""

    def __call__(self, batch):
        import pandas as pd

        return pd.DataFrame([{"report": json.dumps(thread_report())}])


def fmt_threads(t: dict[str, Any]) -> str:
    env = " ".join(f"{k.split('_NUM')[0]}={v}" for k, v in t["env"].items())
    return f"cv2={t['cv2_threads']} torch={t['torch_threads']} numba={t['numba_threads']} | {env}"


def probe_ray_threads(ray, cpus_per_actor: float, cpus_per_task: float) -> dict[str, Any]:
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items([{"x": 0}])
    task = ds.map_batches(_ThreadProbe(), num_cpus=cpus_per_task, batch_format="pandas").take_all()
    actor = ds.map_batches(
        _ThreadProbe, compute=ActorPoolStrategy(size=1), num_cpus=cpus_per_actor, batch_format="pandas"
    ).take_all()
    return {"ray_task": json.loads(task[0]["report"]), "ray_actor": json.loads(actor[0]["report"])}


def start_ray(ray, cores: int, keep_workers: bool, pinning: str = "inherit", by_value: tuple = ()) -> str:
    """A local cluster of our own (never one from RAY_ADDRESS or `ray start`); returns its temp dir.

    ``pinning``: ``inherit`` (the raylet this process starts, and so every worker, inherits THREAD_ENV, set at
    the top of bench/engine.py before anything imported numpy; OpenCV and torch read those variables at import) or
    ``runtime-env`` (the same variables as a job runtime_env plus a worker_process_setup_hook; Ray then starts
    each worker through its runtime-env agent and does not reuse its pre-started workers for the actors: about
    1 s more per actor start here). Either way ``probe_ray_threads`` checks the counts in a task and an actor.
    ``by_value``: further modules whose objects the workers run (pickled by value)."""
    # What the workers run (the setup hook, the probe, the floor's stage code) is pickled by value, so they need not
    # import these files (bench/ is no package).
    for module in (bm, sys.modules[__name__], *by_value):
        ray.cloudpickle.register_pickle_by_value(module)
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
        print(f"threads, Ray task:            {fmt_threads(probe['ray_task'])}")
        print(f"threads, Ray actor:           {fmt_threads(probe['ray_actor'])}")
