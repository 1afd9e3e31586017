"""bench/engine.py's accounting of the machine: CPU seconds of its own process tree and of the others (the machine
may be shared), and what the machine is."""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from collections import defaultdict
from typing import Any

from _bench_machine import cpu_model, usable_cpus

SAMPLE_INTERVAL_S = 1.0  # CpuMeter: how often it reads the process tree (a process that exits between two
# readings loses at most this long of its CPU from the figures; the stage actors live to the end of a run)


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


def machine_info() -> dict[str, Any]:
    import cv2
    import numba
    import numpy as np
    import pymatting
    import ray
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "cpu_model": cpu_model(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "ray": ray.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "numba": numba.__version__,
        "pymatting": getattr(pymatting, "__version__", "unknown"),
        "torch": torch.__version__,
    }
