"""bench/train.py --quick end to end, in a subprocess with its own SeaweedFS, local Ray cluster and temp dirs (never
the suite's): the three arms (Ray Train with 1 and 2 workers, the plain loop) report positive throughput on the
same steps and batch, the ratios are positive numbers, peak RSS is given per worker, and the checkpoint figures
are there. No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_train_quick(tmp_path):
    out = tmp_path / "train.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train.py"), "--quick", "--threads", "2", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for text in (
        "(a) Ray Train, 1 worker",
        "(b) Ray Train, 2 workers",
        "(c) plain loop",
        "(a)/(c) =",
        "(b)/(a) =",
    ):
        assert text in proc.stdout, text

    result = json.loads(out.read_text())
    assert result["benchmark"] == "train" and result["status"] == "ok"
    p = result["params"]
    assert p["steps"] == 12 and p["batch_per_worker"] == 4 and p["warmup_steps"] == 4
    assert p["threads_per_worker"] == {"ray1": 2, "ray2": 1, "plain": 2}
    assert sorted(p["arms"]) == ["plain", "ray1", "ray2"]
    assert p["rows"] >= 12 * 4 * 2
    assert len(result["loadavg"]["start"]) == 3 and len(result["loadavg"]["end"]) == 3
    assert "samples_per_s" in result["definitions"]

    runs = result["runs"]
    assert {k: len(v) for k, v in runs.items()} == {"ray1": 1, "ray2": 1, "plain": 1}
    plain, ray1, ray2 = runs["plain"][0], runs["ray1"][0], runs["ray2"][0]
    for arm, world in ((plain, 1), (ray1, 1), (ray2, 2)):
        assert arm["steps"] == 12 and arm["world_size"] == world and arm["samples"] == 12 * 4 * world
        assert len(arm["step_times_s"]) == 12 and all(t > 0 for t in arm["step_times_s"])
        for key in (
            "samples_per_s",
            "compute_samples_per_s",
            "median_step_s",
            "median_step_samples_per_s",
            "loop_s",
        ):
            assert _positive(arm[key]), (key, arm[key])
        assert len(arm["peak_rss_mib"]) == world and all(_positive(x) for x in arm["peak_rss_mib"])
        assert arm["cpu"]["own_cpu_s"] > 0 and arm["cpu"]["wall_s"] > 0
        assert math.isfinite(arm["loss_last"])
    assert plain["threads"]["torch_threads"] == 2
    assert _positive(plain["decode_ms_per_sample"]) and _positive(plain["process_s"])
    for arm, threads in ((ray1, 2), (ray2, 1)):
        assert arm["threads"]["torch_threads_requested"] == threads
        assert _positive(arm["fit_s"]) and arm["run_training_s"] >= arm["fit_s"]
        assert arm["model_ref"].startswith("model/reflayer@")
        # Reports every 4 steps, checkpoints at 8 and 12: the one at 8 is followed by a report.
        assert arm["report_steps"] == [4, 8, 12] and arm["checkpoint_steps"] == [8, 12]
        ck = arm["checkpoint"]
        assert [e["step"] for e in ck["events"]] == [8]
        assert ck["events"][0]["report_call_s"] > 0 and ck["events"][0]["first_step_after_s"] > 0
        assert _positive(ck["metrics_report_call_median_s"])

    s = result["summary"]
    for key in (
        "ray1_over_plain",
        "ray2_over_ray1",
        "ray1_over_plain_incl_decode",
        "ray1_over_plain_median_step",
        "plain_samples_per_s",
    ):
        assert _positive(s[key]), (key, s[key])
    assert s["ray1_over_plain"] == pytest.approx(ray1["samples_per_s"] / plain["samples_per_s"])
    assert s["ray2_over_ray1"] == pytest.approx(ray2["samples_per_s"] / ray1["samples_per_s"])
    assert s["target_ray1_over_plain"] == 0.9 and isinstance(s["ray1_over_plain_target_met"], bool)
