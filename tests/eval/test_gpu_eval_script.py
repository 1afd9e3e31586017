"""bench/gpu_eval.py --smoke on the CPU: every section (metric networks alone, the product's ScoreStage, one
decomposition, inference plus metrics) runs and writes a positive figure, the projection is computed from the
inference-plus-metrics figure, and neither ray nor boto3 is imported. No timing thresholds: the figures are CPU
smoke figures on a shared machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_eval.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(args: list[str], *, prelude: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *args]
    if prelude is not None:  # run the script after `prelude` in the same interpreter
        code = f"{prelude}\nimport runpy, sys\nsys.argv = {[str(SCRIPT), *args]!r}\n"
        code += f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
        cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_smoke_writes_every_section_and_the_projection(tmp_path):
    out = tmp_path / "gpu_eval.json"
    proc = _run(["--smoke", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["errors"] == {} and r["forbidden_modules"] == []
    assert (
        r["smoke"] is True and r["dtype"] == "fp32" and r["device"]["type"] == "cpu" and r["device"]["name"]
    )

    # the anchors, carried for comparison (not comparable in a smoke run)
    assert r["anchors"]["clip_vit_l14_images_per_s"] == 1800
    assert r["anchors"]["inception_v3_images_per_s"] == 5370
    assert r["anchors"]["lpips_alex_512_pairs_per_s"] == 3800
    assert r["anchors"]["decompose_1024_s"] == 1.1
    assert r["comparison"]["comparable"] is False

    nets = r["networks"]["fp32"]
    assert r["networks"]["build"]["inception"]["arch"] == "inception-v3-fid"
    for name in ("clip", "inception") + (("lpips",) if r["device"]["lpips"] else ()):
        assert nets[name]["per_s"] > 0 and nets[name]["batch"] >= 1, name
        assert r["comparison"][{"clip": "clip_vit_l14_images_per_s", "inception": "inception_v3_images_per_s",
                                "lpips": "lpips_alex_512_pairs_per_s"}[name]]["measured"] == nets[name]["per_s"]  # fmt: skip
    assert nets["inception"]["input_px"] == 299

    score = r["score_stage"]["fp32"]
    assert score["samples_per_s"] > 0 and score["output_ok"] is True and score["items"] == 6
    assert math.isclose(score["samples_per_s"], score["items"] / score["seconds"])
    assert score["feature_dim"] == 2048 and score["fid_compute"]["seconds"] > 0

    inf = r["inference"]
    assert inf["build"]["preset"] == "tiny"
    assert inf["decompose"]["s_per_decomposition"] > 0 and inf["decompose"]["output_ok"] is True
    e2e = inf["e2e"]
    assert e2e["samples_per_s"] > 0 and e2e["refused"] == 0 and e2e["items"] == 4
    assert math.isclose(e2e["samples_per_s"], e2e["items"] / (e2e["predict_s"] + e2e["score_s"]))
    assert inf["serial_estimate_samples_per_s"] > 0

    p = r["projection"]
    assert (
        p["samples_per_s_per_gpu"] == e2e["samples_per_s"] and p["gpus"] == 8 and p["split_samples"] == 10000
    )
    assert math.isclose(p["minutes"], 10000 / (8 * e2e["samples_per_s"]) / 60)
    assert p["target_minutes"] == 30 and p["met"] is (p["minutes"] <= 30)
    assert p["verdict"] == ("met" if p["met"] else "not met")
    assert "projection: 10000 samples on 8 GPUs" in proc.stdout and "SMOKE" in proc.stdout


def test_without_lpips_the_lpips_figure_is_skipped_and_a_labelled_substitute_scores(tmp_path):
    out = tmp_path / "no_lpips.json"
    proc = _run(
        ["--smoke", "--only", "networks", "score", "--no-fid", "--out", str(out)],
        prelude="import sys; sys.modules['lpips'] = None  # as if the package were not installed",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["errors"] == {}
    assert "not importable" in r["networks"]["fp32"]["lpips"]["skipped"]
    assert r["networks"]["build"]["lpips"] == {**r["networks"]["build"]["lpips"], "arch": "lpips_substitute",
                                               "substitute": True}  # fmt: skip
    assert r["score_stage"]["fp32"]["samples_per_s"] > 0
    assert any("lpips is not importable" in n for n in r["notes"])
    assert r["inference"] == {} and r["projection"] is None  # --only: no decomposition, no projection
    assert "skipped: lpips is not importable" in proc.stdout


def test_bad_arguments_are_refused():
    proc = _run(["--smoke", "--metric-size", "8"])
    assert proc.returncode == 2 and "--metric-size" in proc.stderr
