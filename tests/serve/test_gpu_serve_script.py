"""bench/gpu_serve.py --smoke on the CPU: the deployment's batched code path (decompose_group over the tiny
RefLayerPipeline) at batch 1 and batch 4 writes positive figures, the anchors are carried and marked not comparable,
and neither ray nor boto3 is imported. No timing thresholds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_serve.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)


def test_smoke_runs_both_cases_without_ray(tmp_path):
    out = tmp_path / "gpu_serve.json"
    proc = _run(["--smoke", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["errors"] == {} and r["forbidden_modules"] == []
    assert r["smoke"] is True and r["device"]["type"] == "cpu"
    s = r["settings"]
    assert (s["preset"], s["resolution"], s["steps"], s["batch"], s["threads"]) == ("tiny", 64, 2, 4, 1)
    assert r["anchors"]["target_p50_s"] == 1.2 and r["anchors"]["bare_28_steps_s"] == 0.86

    entry = r["weights"]["deployed"]
    assert entry["param_dtype"] == "torch.float32" and entry["autocast_bf16"] is False
    one, four = entry["cases"]["batch1"], entry["cases"]["batch4"]
    assert one["batch"] == 1 and one["calls"] == 3 and four["batch"] == 4 and four["calls"] == 2
    for case in (one, four):
        assert all(x > 0 for x in case["seconds"]) and case["p50_s"] <= case["p95_s"]
        assert math.isclose(case["items_per_s"], case["batch"] * case["calls"] / sum(case["seconds"]))
    comp = r["comparison"]
    assert comp["comparable"] is False and comp["deployed"]["p50_s"] == one["p50_s"]
    assert comp["deployed"]["target_met"] is (one["p50_s"] <= 1.2)
    assert "SMOKE" in proc.stdout and "forbidden modules loaded: none" in proc.stdout


def test_without_cuda_the_default_run_is_the_smoke(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the default run is the real one")
    out = tmp_path / "default.json"
    proc = _run(["--iters", "1", "--batch-iters", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "no CUDA device: running the --smoke configuration" in proc.stdout
    r = json.loads(out.read_text())
    assert r["smoke"] is True and r["settings"]["preset"] == "tiny" and r["errors"] == {}


def test_bad_arguments_are_refused():
    proc = _run(["--smoke", "--batch", "0"])
    assert proc.returncode == 2 and "--batch" in proc.stderr
