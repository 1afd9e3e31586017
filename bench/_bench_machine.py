"""What the bench scripts share: loading a sibling script as a module (bench/ is no package), ``reflade`` from the
source tree where it is not installed (the lent GPU machine), the thread counts a process runs with, and what the
machine is (CPU model, usable CPUs). Imports
nothing heavy at import time: a script sets its thread variables after importing this and before anything loads
numpy, OpenCV or torch."""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "OPENCV_FOR_THREADS_NUM",
)
"""The variables every thread pool a bench process may load (OpenMP, MKL, OpenBLAS, numexpr, numba, OpenCV) reads
once, when it loads."""


def sibling(name: str) -> ModuleType:
    """``bench/<name>.py`` as the module ``bench_<name>`` (loaded once), e.g. ``sibling("train").CpuMeter``; by path,
    so that neither the repository's top-level folders (``train/``, ``eval/``) nor sys.path order can shadow it."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # before running it: dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[key]


def set_thread_env(n: int | str) -> None:
    """Every :data:`THREAD_VARS` = ``n`` in this process (and the processes it starts from now on)."""
    os.environ.update({k: str(n) for k in THREAD_VARS})


def thread_report() -> dict[str, Any]:
    """Thread counts as this process sees them: the variables, OpenCV's and torch's pools."""
    import cv2
    import torch

    return {
        "pid": os.getpid(),
        "env": {k: os.environ.get(k) for k in THREAD_VARS},
        "cv2_threads": cv2.getNumThreads(),
        "torch_threads": torch.get_num_threads(),
    }


def fmt_threads(t: dict[str, Any]) -> str:
    values = set(t["env"].values())
    env = next(iter(values)) if len(values) == 1 else ",".join(str(v) for v in t["env"].values())
    return f"torch={t['torch_threads']} cv2={t['cv2_threads']} env(OMP,MKL,...)={env}"


def ensure_reflade(probe: str) -> str:
    """Make ``probe`` (a ``reflade.*`` module) importable: from the installed package, else from this source tree
    (``reflade.X`` -> ``X/``, as ``[tool.setuptools.package-dir]`` maps it: a machine with the dependencies but not
    the package). Returns where it came from."""
    try:
        importlib.import_module(probe)
        return "installed"
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "reflade" or m.startswith("reflade.")]:
        del sys.modules[name]
    pkg = ModuleType("reflade")
    pkg.__path__ = [str(HERE.parent)]
    sys.modules["reflade"] = pkg
    importlib.import_module(probe)
    return f"source tree {HERE.parent}"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
