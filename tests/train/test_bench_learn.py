"""bench/learn.py: its --smoke run end to end in a subprocess (data, the tiny VAE, training with evaluations through
the decomposition API, both baselines, JSON, plot, table), and the targets' arithmetic of bench/_learn_report.py on
figures of its own. No learning is asserted here (tests/train/test_overfit.py does that)."""

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


def _report():
    name = "_learn_report"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.timeout(300)
def test_bench_learn_smoke(tmp_path):
    out = tmp_path / "learn.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "REFLADE_", "RAY_ADDRESS"))}
    env.update(HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(ROOT / "bench" / "learn.py"), "--smoke", "--threads", "1", "--out", str(out)]
    cmd += ["--set", "lr=2e-3", "--save", str(tmp_path / "model")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (
        "copy-visible" in proc.stdout and "classical" in proc.stdout and "(on training scenes)" in proc.stdout
    )

    r = json.loads(out.read_text())
    assert (
        r["benchmark"] == "learn" and r["status"] == "ok" and r["command"].startswith("python bench/learn.py")
    )
    assert r["threads"]["torch_threads"] == 1 and r["threads"]["env"]["OMP_NUM_THREADS"] == "1"
    p = r["params"]
    # the demo's recipe with the smoke run's and the command line's overrides, as the product's TrainSettings
    assert p["settings"]["steps"] == 4 and p["settings"]["lr"] == 2e-3 and p["settings"]["phase"] == "both"
    assert p["train_rows"] > 0 and p["items"] > 0 and p["train_items"] > 0
    assert [pt["step"] for pt in r["curve"]] == [0, 2, 4]
    assert all(pt["train_s"] >= 0 for pt in r["curve"]) and r["curve"][-1]["loss"] > 0
    for pt in r["curve"]:
        for kind in ("foreground", "background"):
            m = pt["metrics"][kind]
            assert 0 <= m["alpha_iou"] <= 1 and m["alpha_sad"] >= 0 and m["items"] > 0
            assert (
                math.isfinite(m["psnr_visible"]) and -1 <= m["ssim_visible"] <= 1 and m["hidden_rgb_mae"] >= 0
            )
        assert set(pt["targets"]) >= {"all", "foreground_iou_floor"}
    for name in ("copy-visible", "classical"):
        assert r["baselines"][name]["foreground"]["items"] == r["curve"][0]["metrics"]["foreground"]["items"]
    # copy-visible's foreground is the visible part exactly: its PSNR there is infinite
    assert r["baselines"]["copy-visible"]["foreground"]["psnr_visible"] == math.inf or (
        r["baselines"]["copy-visible"]["foreground"]["psnr_visible"] > 30
    )
    assert set(r["summary"]["first_step_met"]) == {
        "foreground_hidden_below_copy_visible",
        "background_hidden_below_copy_visible",
        "foreground_iou_within_0.1_of_classical",
        "all",
    }
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert (tmp_path / "model" / "bundle.json").is_file() and r["saved"] == str(tmp_path / "model")


def _metrics(iou, fg_hidden, bg_hidden):
    return {
        "foreground": {"alpha_iou": iou, "hidden_rgb_mae": fg_hidden},
        "background": {"alpha_iou": 1.0, "hidden_rgb_mae": bg_hidden},
    }


def test_targets_arithmetic():
    rp = _report()
    base = {"copy-visible": _metrics(0.8, 70.0, 60.0), "classical": _metrics(0.86, 30.0, 20.0)}
    t = rp.targets(_metrics(0.76, 69.0, 59.0), base)
    assert t["foreground_iou_floor"] == pytest.approx(0.76)
    assert t["foreground_iou_within_0.1_of_classical"] and t["foreground_hidden_below_copy_visible"]
    assert t["background_hidden_below_copy_visible"] and t["all"]
    t = rp.targets(_metrics(0.75, 70.0, 61.0), base)  # ties and misses are misses
    assert not (t["foreground_iou_within_0.1_of_classical"] or t["foreground_hidden_below_copy_visible"])
    assert not t["background_hidden_below_copy_visible"] and not t["all"]
    t = rp.targets(_metrics(math.nan, math.nan, 10.0), base)  # an undefined metric meets nothing
    assert not t["foreground_iou_within_0.1_of_classical"] and t["background_hidden_below_copy_visible"]

    result = {
        "baselines": base,
        "curve": [
            {"step": 0, "train_s": 0.0, "metrics": _metrics(0.1, 80.0, 70.0)},
            {"step": 10, "train_s": 5.0, "metrics": _metrics(0.5, 65.0, 50.0)},
            {"step": 20, "train_s": 9.0, "metrics": _metrics(0.8, 50.0, 40.0)},
        ],
    }
    rp.summarize(result)
    s = result["summary"]
    assert s["final_step"] == 20 and s["final"]["all"] and s["verdict"].startswith("all targets met")
    assert s["first_step_met"] == {
        "foreground_hidden_below_copy_visible": 10,
        "background_hidden_below_copy_visible": 10,
        "foreground_iou_within_0.1_of_classical": 20,
        "all": 20,
    }
    assert "first step meeting each" in rp.table(result)
