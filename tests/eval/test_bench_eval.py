"""bench/eval.py: its --quick run end to end, in a subprocess with its own SeaweedFS, local Ray cluster and temp dirs
(never the suite's): the three arms ((a) the Ray job run_eval, (b) the per-sample loop, (c) the batched loop) score
the same items with the same models through the product's settings, report positive samples/s and the job's floor;
and the ratio arithmetic of bench/_eval_report.py on figures of its own. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench_module(name: str):
    """``bench/<name>.py`` under its own name (bench/ is no package; its helpers import _bench_machine by name)."""
    if name != "_bench_machine":
        _bench_module("_bench_machine")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_eval_quick(tmp_path):
    out = tmp_path / "eval.json"
    env = {
        k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith(("AWS_", "REFLADE_"))
    }
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, str(ROOT / "bench" / "eval.py"), "--quick", "--threads", "2", "--out", str(out)]
    cmd += ["--predict-actors", "1", "--score-actors", "1", "--num-cpus", "0.5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for text in (
        "(a) Ray job run_eval",
        "(b) per-sample loop",
        "(c) batched, 1 process",
        "(a)/(b) =",
        "(a)/(c) =",
    ):
        assert text in proc.stdout, text
    assert "threads: actor   torch=1" in proc.stdout and "threads: local   torch=2" in proc.stdout

    result = json.loads(out.read_text())
    assert result["benchmark"] == "eval" and result["status"] == "ok"
    assert result["command"].startswith("python ") and result["machine"]["cpus_usable"] >= 1
    p = result["params"]
    assert p["items"] == p["rows"] == 6 and p["steps"] == 2 and p["batch_size"] == 4
    assert p["models"][0].startswith("model/reflayer@") and p["models"][1:] == ["copy-visible", "classical"]
    # the bench's flags reach the product's own settings, nothing else
    ec = p["eval_config"]
    assert (ec["predict_actors"], ec["score_actors"], ec["num_cpus"], ec["batch_size"]) == (1, 1, 0.5, 4)
    assert ec["threads"] == p["actor_threads"] == 1 and ec["lpips_net"] == "weights/tiny-alexnet"
    th = result["threads"]
    assert th["actor"]["torch_threads"] == 1 and th["driver"]["torch_threads"] == 1
    assert th["local"]["torch_threads"] == 2 and th["local"]["env"]["OMP_NUM_THREADS"] == "2"

    runs = result["runs"]
    assert [len(runs[a]) for a in ("ray", "loop", "batched")] == [1, 1, 1]
    ray, loop, batched = runs["ray"][0], runs["loop"][0], runs["batched"][0]
    assert ray["items"] == loop["items"] == batched["items"] == 6
    assert loop["batch_size"] == 1 and batched["batch_size"] == 4
    for arm in (ray, loop, batched):
        assert _positive(arm["seconds"]) and arm["samples_per_s"] == pytest.approx(
            arm["items"] / arm["seconds"]
        )
    for arm in (loop, batched):
        assert arm["predict_s"] + arm["score_s"] <= arm["seconds"] + 1e-9 and arm["rows_out"] == 6 * 3
    # (a): the job's parts on one clock add up to its seconds; Ray Data saw both pools, in blocks of a batch
    assert ray["models"] == p["models"] and ray["rows_scored"] == 6 * 3
    assert ray["report_ref"].startswith("eval-report/reflayer@") and ray["settings"]["predict_actors"] == 1
    parts = ("resolve_s", "startup_s", "window_s", "tail_s", "report_s")
    assert all(ray[k] >= 0 for k in parts) and sum(ray[k] for k in parts) == pytest.approx(ray["seconds"])
    assert ray["floor_s"] == pytest.approx(ray["seconds"] - ray["window_s"])
    assert ray["window_samples_per_s"] == pytest.approx(6 / ray["window_s"])
    for stage in ("predict_stage", "score_stage"):
        # 6 items in blocks of at most a batch (4); a pool's task may bundle a short block with the next one (seen
        # once in a fresh clone: 1 task of 6 rows), so how many tasks each pool ran is Ray Data's to choose
        assert ray[stage]["blocks"] >= 1 and _positive(ray[stage]["block_wall_s"])
        assert 0 <= ray[stage]["first_block_s"] <= ray[stage]["last_block_end_s"]
    # every arm scored the same (item, model) pairs, to within batching's last bits
    assert set(result["consistency"]) == {"(b)", "(a) cold"}
    assert all(c["same_pairs"] and c["pairs"] == 18 for c in result["consistency"].values())

    s = result["summary"]
    assert s["ray_over_loop"] == pytest.approx(ray["samples_per_s"] / loop["samples_per_s"])
    assert s["ray_over_batched"] == pytest.approx(ray["samples_per_s"] / batched["samples_per_s"])
    assert s["ray_over_loop_met"] == (s["ray_over_loop"] >= 2.0)
    assert s["ray_over_batched_met"] == (s["ray_over_batched"] >= 0.8)
    assert s["targets"] == {"ray_over_loop": 2.0, "ray_over_batched": 0.8} and len(s["verdict"]) == 2


def _figures(ray_rates, loop=4.0, batched=8.0, floor=10.0, window_rate=20.0):
    ray = [
        {
            "tag": tag,
            "samples_per_s": r,
            "floor_s": floor,
            "startup_s": 8.0,
            "report_s": 1.0,
            "window_samples_per_s": window_rate,
        }  # fmt: skip
        for tag, r in zip(("cold", "warm"), ray_rates, strict=False)
    ]
    runs = {"ray": ray, "loop": [{"samples_per_s": loop}, {"samples_per_s": loop / 2}], "batched": []}
    runs["batched"] = [{"samples_per_s": batched}]
    return {"params": {"items": 40}, "runs": runs}


def test_ratios_targets_and_break_even():
    rp = _bench_module("_eval_report")
    result = _figures([8.0, 9.0])
    rp.summarize(result)
    s = result["summary"]
    # the fastest (b) and (c) count; the top level is the cold run's
    assert s["rates"] == {"loop": 4.0, "batched": 8.0} and s["batched_over_loop"] == 2.0
    assert s["ray_over_loop"] == 2.0 and s["ray_over_loop_met"] is True
    assert s["ray_over_batched"] == 1.0 and s["ray_over_batched_met"] is True
    warm = s["floor"][1]
    assert warm["ray_over_loop"] == pytest.approx(9 / 4) and warm["ray_over_batched_window"] == 20 / 8
    # break-even n: n / (floor + n / window) = target x rate -> n = floor / (1 / need - 1 / window)
    assert warm["ray_over_loop_break_even_items"] == math.ceil(10 / (1 / 8 - 1 / 20))
    assert rp.break_even(10.0, 20.0, 8.0) == 134 and rp.break_even(10.0, 8.0, 8.0) is None
    assert rp.break_even(None, 20.0, 8.0) is None
    assert s["verdict"][0].startswith("(a)/(b) = 2.25 (warm): target >= 2.0 met on 40 items")

    slow = _figures([1.0], window_rate=6.0)  # the window rate under 2 x (b)'s: no item count helps
    rp.summarize(slow)
    f = slow["summary"]["floor"][0]
    assert f["ray_over_loop_met"] is False and f["ray_over_loop_break_even_items"] is None
    assert "NOT reachable at any item count" in slow["summary"]["verdict"][0]
    assert f["ray_over_batched_break_even_items"] is None  # 6.0 items/s < 0.8 x (c)'s 8
    assert "NOT met" in slow["summary"]["verdict"][1]

    empty = {"params": {"items": 1}, "runs": {"ray": [], "loop": [], "batched": []}}
    rp.summarize(empty)
    assert "summary" not in empty


def test_same_results_check():
    rp = _bench_module("_eval_report")
    nan = float("nan")
    ref = [{"item_id": "a/t", "model": "m", "s_vis": 0.5, "s_gen": nan, "alpha_iou": 1.0, "psnr_visible": None,
            "hidden_rgb_mae": 0.0}]  # fmt: skip
    same = rp.compare_metrics([{**ref[0], "s_vis": 0.5001}], ref)
    assert same["same_pairs"] and same["pairs"] == 1
    assert same["max_abs_diff"]["s_vis"] == pytest.approx(1e-4) and same["max_abs_diff"]["s_gen"] == 0.0
    assert rp.compare_metrics([{**ref[0], "s_gen": 0.1}], ref)["max_abs_diff"]["s_gen"] == math.inf
    assert not rp.compare_metrics([{**ref[0], "model": "other"}], ref)["same_pairs"]
