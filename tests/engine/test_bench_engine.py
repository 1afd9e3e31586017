"""bench/engine.py --quick end to end, in a subprocess with its own local Ray cluster, object store and temp dir
(never the suite's): the product arm is the whole product run (``run_engine``: read from the bucket, barrier,
stages, writer, commit into a registered version) and the plain arm the same stage code in one loop; both report
positive throughput, the same images kept and quarantined image by image, per-stage shares that sum to one, the
product run's parts, Ray Data's floor, and thread counts pinned to one in the driver and in the Ray workers."""

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
    env = {
        k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith(("AWS_", "REFLADE_"))
    }
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "engine.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "(b) plain" in proc.stdout and "(a) product" in proc.stdout and "speed-up" in proc.stdout

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

    # The product run registered a dataset version; read back, it kept and quarantined what the plain loop did,
    # image by image (same code, same inputs: any difference is a bug).
    assert best["dataset"] == "dataset/bench-002@1"  # the warm-up's run is bench-001
    for key in ("images_kept", "images_quarantined", "layers_kept", "quarantine_reasons"):
        assert best[key] == plain[key], key
    assert plain["images_kept"] + plain["images_quarantined"] == 16
    assert plain["images_kept"] > 0 and plain["layers_kept"] > 0
    assert best["matches_plain"] and result["mismatches"] == []
    assert result["summary"]["kept_counts_match"]
    assert best["shards"] == 4  # 16 images in batches of 4, one staged shard each

    _shares_sum_to_one(plain)
    _shares_sum_to_one(best)
    # Where the product run's time went: its parts (RunResult.phases) and the writer's own seconds.
    phases = best["phases_s"]
    assert set(phases) == {"ingest", "plan", "connect", "barrier", "stages", "commit"}
    assert all(v >= 0 for v in phases.values()) and phases["stages"] > 0 and phases["commit"] > 0
    assert sum(phases.values()) <= best["wall_s"] * 1.01
    assert sum(phases.values()) >= best["wall_s"] * 0.9  # the parts cover the run
    assert best["phase_share"]["stages"] == pytest.approx(phases["stages"] / best["wall_s"])
    assert 0 < best["write_s"] < best["wall_s"] * best["cores"]
    assert best["ray_start_s"] > 0
    assert best["speedup"] == pytest.approx(best["images_per_s"] / plain["images_per_s"])
    assert best["overhead_pct"] == pytest.approx(
        100 * (best["wall_s"] * best["cores"] - best["stage_time_s"]) / best["stage_time_s"]
    )
    assert "overhead_pct" in result["definitions"] and result["summary"]["speedup"] > 0
    # The run compared is the engine with its defaults: fused stages, one actor per CPU.
    assert best["setting"]["defaults"] and best["setting"]["layout"] == "fused"
    assert best["setting"]["actors"] == 2 and result["summary"]["compared_is_engine_defaults"]
    assert result["summary"]["paired_speedups"] == [
        pytest.approx(best["images_per_s"] / plain["images_per_s"])
    ]
    assert 0 < best["cluster_idle_cores"] < best["cores"]

    # --floor (on by default): Ray Data alone, with stage code that sleeps each image's share of its batch's stage
    # time from the run above. Two actors cannot sleep it faster than in half the time.
    floor = best["floor"]
    assert floor["images"] == 16 and 0 < floor["first_batch_s"] <= floor["wall_s"]
    assert 1 <= len(floor["actor_constructed_s"]) <= 2
    assert floor["slept_s"] == pytest.approx(best["stage_time_s"], rel=1e-6)
    assert floor["wall_s"] * best["cores"] >= floor["slept_s"] * 0.99
    assert floor["floor_idle_pct"] == pytest.approx(
        100 * (floor["wall_s"] * best["cores"] - floor["slept_s"]) / floor["slept_s"]
    )
    assert floor["actors_cpu_s"] > 0 and floor["ray_cpu_s"] > 0
    assert best["above_floor_pct"] == pytest.approx(best["overhead_pct"] - floor["floor_idle_pct"])
    assert result["summary"]["ray_floor_idle_pct"] == floor["floor_idle_pct"]
    assert "Ray Data's own floor" in proc.stdout

    # Threads pinned in the driver (plain arm) and in the Ray workers.
    for where in ("driver", "ray_task", "ray_actor"):
        t = result["threads"][where]
        assert t["cv2_threads"] == 1 and t["torch_threads"] == 1 and t["numba_threads"] == 1, (where, t)
        assert t["env"]["OMP_NUM_THREADS"] == "1", (where, t)
