"""bench/engine.py --quick end to end, in a subprocess with its own local Ray cluster and temp dir (never the
suite's cluster): both arms report positive throughput, the same images kept and quarantined, per-stage shares
that sum to one, and thread counts pinned to one in the driver and in the Ray workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def _shares_sum_to_one(run: dict) -> None:
    assert set(run["stage_share"]) == {"prefilter", "scene", "completion", "matting", "prompts", "postfilter"}
    assert sum(run["stage_share"].values()) == pytest.approx(1.0, abs=1e-6)
    assert all(v > 0 for v in run["stage_s"].values()), run["stage_s"]


def test_bench_engine_quick(tmp_path):
    out = tmp_path / "e.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "engine.py"), "--quick", "--timeline", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "(b) plain" in proc.stdout and "(a) ray" in proc.stdout and "speed-up" in proc.stdout

    result = json.loads(out.read_text())
    assert result["benchmark"] == "engine"
    assert result["params"]["images"] == 16
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["ray"]

    plain, ray_runs = result["plain"], result["ray"]
    assert plain["images"] == 16 and plain["images_per_s"] > 0 and plain["wall_s"] > 0
    assert len(ray_runs) == 1
    best = result["best"]
    assert best is ray_runs[0] or best == ray_runs[0]
    assert best["images"] == 16 and best["images_per_s"] > 0

    # Same code, same inputs: the same images kept and quarantined, the same layers kept.
    for key in ("images_kept", "images_quarantined", "layers_kept", "quarantine_reasons"):
        assert best[key] == plain[key], key
    assert plain["images_kept"] + plain["images_quarantined"] == 16
    assert plain["images_kept"] > 0 and plain["layers_kept"] > 0
    assert best["matches_plain"] and result["mismatches"] == []
    assert result["summary"]["kept_counts_match"]

    _shares_sum_to_one(plain)
    _shares_sum_to_one(best)
    assert best["speedup"] == pytest.approx(best["images_per_s"] / plain["images_per_s"])
    assert best["overhead_pct"] == pytest.approx(
        100 * (best["wall_s"] * best["cores"] - best["stage_time_s"]) / best["stage_time_s"]
    )
    assert "overhead_pct" in result["definitions"] and result["summary"]["speedup"] > 0
    # The run compared is the engine's own pipeline with its defaults: fused stages, one actor per CPU.
    assert best["setting"]["defaults"] and best["setting"]["layout"] == "fused"
    assert best["setting"]["actors"] == 2 and result["summary"]["compared_is_engine_defaults"]
    assert best["setting"]["order"] == "largest"  # fed as the engine feeds its stages
    # One round: its plain run is the one compared, so the paired ratio is the headline speed-up.
    assert result["summary"]["paired_speedups"] == [
        pytest.approx(best["images_per_s"] / plain["images_per_s"])
    ]
    if best["steady_overhead_pct"] is not None:
        assert best["steady_overhead_pct"] == pytest.approx(
            100 * (best["steady_window_s"] * best["cores"] - best["steady_stage_s"]) / best["steady_stage_s"]
        )
        assert 0 < best["steady_stage_s"] < best["stage_time_s"]
        # The whole-run overhead splits into a cost per run and the steady per-image rate.
        total = best["wall_s"] * best["cores"] - best["stage_time_s"]
        assert best["fixed_overhead_core_s"] == pytest.approx(
            total - best["steady_overhead_pct"] / 100 * best["stage_time_s"]
        )
        if best["break_even_images"] is not None:
            assert best["steady_overhead_pct"] < result["targets"]["ray_overhead_pct"]
            assert best["break_even_images"] >= best["images"]
    # The idle cluster's own CPU use, measured before the timed run (Ray's daemons always use some).
    assert 0 < best["cluster_idle_cores"] < best["cores"]
    assert best["cluster_background_pct"] == pytest.approx(
        100 * best["cluster_idle_cores"] * best["wall_s"] / best["stage_time_s"]
    )
    assert result["summary"]["cluster_idle_cores"] == best["cluster_idle_cores"]

    # --floor (on by default): the same pipeline shape with stage code that sleeps each image's stage time from
    # the run above. Two actors cannot sleep it faster than in half the time, so the unused share is never
    # negative; the pool's actors (their start-up) and the driver both used CPU.
    floor = best["floor"]
    assert floor["images"] == 16 and 0 < floor["first_batch_s"] <= floor["wall_s"]
    assert 1 <= len(floor["actor_constructed_s"]) <= 2
    assert all(0 < t < floor["first_batch_s"] for t in floor["actor_constructed_s"])
    assert floor["slept_s"] == pytest.approx(best["stage_time_s"], rel=1e-6)
    assert floor["wall_s"] * best["cores"] >= floor["slept_s"] * 0.99
    assert floor["floor_idle_pct"] == pytest.approx(
        100 * (floor["wall_s"] * best["cores"] - floor["slept_s"]) / floor["slept_s"]
    )
    assert floor["floor_idle_pct"] > -1.0
    assert floor["actors_cpu_s"] > 0 and floor["ray_cpu_s"] > 0
    assert floor["cpu_by_process"]["driver"] > 0
    assert floor["floor_cpu_pct"] == pytest.approx(100 * floor["ray_cpu_s"] / floor["slept_s"])
    assert best["above_floor_pct"] == pytest.approx(best["overhead_pct"] - floor["floor_idle_pct"])
    assert result["summary"]["ray_floor_idle_pct"] == floor["floor_idle_pct"]
    assert result["summary"]["ray_floor_cpu_pct"] == floor["floor_cpu_pct"]
    assert "Ray Data's own floor" in proc.stdout

    # --timeline: the fused actors were timed (on a loaded machine the second may still be starting when the first
    # has run all four blocks), and together they ran every input block once.
    tl = best["actor_timeline"]
    assert 1 <= len(tl) <= best["setting"]["actors"] == 2
    assert sum(a["calls"] for a in tl) == 4  # 16 images in blocks of one batch (4)
    assert "actors' timeline" in proc.stdout
    for a in tl:
        assert 0 < a["constructor_start_s"] < best["wall_s"] and a["constructor_s"] > 0
        if a["calls"]:
            assert a["first_call_start_s"] >= a["constructor_start_s"] + a["constructor_s"]
            assert 0 < a["busy_s"] <= best["wall_s"]
            # CPU of the calling thread during the calls: never more than their wall time.
            assert 0 < a["busy_cpu_s"] <= a["busy_s"] + 0.05
            assert -0.05 <= a["idle_at_end_s"] < best["wall_s"]

    # Threads pinned in the driver (plain arm) and in the Ray workers.
    for where in ("driver", "ray_task", "ray_actor"):
        t = result["threads"][where]
        assert t["cv2_threads"] == 1 and t["torch_threads"] == 1 and t["numba_threads"] == 1, (where, t)
        assert t["env"]["OMP_NUM_THREADS"] == "1", (where, t)
