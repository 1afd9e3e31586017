"""bench/eval.py --quick end to end, in a subprocess with its own SeaweedFS, local Ray cluster and temp dirs (never
the suite's): the three arms ((a) the Ray job run_eval, (b) the per-sample loop, (c) the batched loop) score the
same items with the same models, report positive samples/s, and the ratios are computed from those rates. No timing
is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_eval_quick(tmp_path):
    out = tmp_path / "eval.json"
    env = {
        k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith(("AWS_", "REFLADE_"))
    }
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "eval.py"), "--quick", "--threads", "2", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for text in (
        "(a) Ray job run_eval",
        "(b) per-sample loop",
        "(c) batched, 1 process",
        "(a)/(b) =",
        "(a)/(c) =",
    ):
        assert text in proc.stdout, text

    result = json.loads(out.read_text())
    assert result["benchmark"] == "eval" and result["status"] == "ok"
    assert result["command"].startswith("python ") and result["machine"]["cpus_usable"] >= 1
    p = result["params"]
    assert p["items"] == 6 and p["dataset_rows"] == 6 and p["steps"] == 2 and p["batch_size"] == 4
    assert len(p["models"]) == 3 and p["models"][0].startswith("model/reflayer@")
    assert p["models"][1:] == ["copy-visible", "classical"]
    # thread counts pinned and recorded: the actors' per EvalConfig.threads, the local process's T
    assert p["ray_threads_per_actor"] == 1 and p["eval_config"]["threads"] == 1
    th = result["threads"]
    assert th["ray_actor"]["torch_threads"] == 1 and th["driver"]["torch_threads"] == 1
    assert th["local"]["torch_threads"] == 2 and th["local"]["env"]["OMP_NUM_THREADS"] == "2"

    runs = result["runs"]
    assert len(runs["ray"]) == 1 and len(runs["loop"]) == 1 and len(runs["batched"]) == 1
    ray, loop, batched = runs["ray"][0], runs["loop"][0], runs["batched"][0]
    assert ray["items"] == loop["items"] == batched["items"] == 6
    assert loop["batch_size"] == 1 and batched["batch_size"] == 4
    for arm in (ray, loop, batched):
        assert _positive(arm["seconds"]) and _positive(arm["samples_per_s"])
        assert arm["samples_per_s"] == pytest.approx(arm["items"] / arm["seconds"])
    # (a): the job's parts, and Ray Data's view of both pools
    assert ray["models"] == p["models"] and ray["rows_scored"] == 6 * 3
    assert ray["report_ref"].startswith("eval-report/reflayer@")
    assert 0 < ray["score_s"] <= ray["seconds"] and _positive(ray["score_samples_per_s"])
    assert ray["report_s"] > 0 and ray["register_s"] > 0
    for stage in ("predict_stage", "score_stage"):
        assert ray[stage]["blocks"] >= 1 and _positive(ray[stage]["block_wall_s"])
        assert 0 <= ray[stage]["first_block_s"] <= ray[stage]["last_block_end_s"] <= ray["score_s"]
    assert _positive(ray["window_s"]) and ray["outside_s"] == pytest.approx(ray["seconds"] - ray["window_s"])
    # (b)/(c): the stage split adds up
    for arm in (loop, batched):
        assert arm["predict_s"] + arm["score_s"] <= arm["seconds"] + 1e-9 and arm["rows_out"] == 6 * 3
    # every arm scored the same (item, model) pairs
    assert result["consistency"] and all(c["same_pairs"] for c in result["consistency"].values())

    s = result["summary"]
    assert s["ray_over_loop"] == pytest.approx(ray["samples_per_s"] / loop["samples_per_s"])
    assert s["ray_over_batched"] == pytest.approx(ray["samples_per_s"] / batched["samples_per_s"])
    assert s["batched_over_loop"] == pytest.approx(batched["samples_per_s"] / loop["samples_per_s"])
    assert s["ray_over_loop_met"] == (s["ray_over_loop"] >= 2.0)
    assert s["ray_over_batched_met"] == (s["ray_over_batched"] >= 0.8)
    assert s["targets"] == {"ray_over_loop": 2.0, "ray_over_batched": 0.8}
    assert {"ray", "loop", "batched"} <= set(s["arms"])
    assert len(s["verdict"]) >= 2 and len(s["floor"]) == 1
