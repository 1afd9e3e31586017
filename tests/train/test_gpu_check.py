"""bench/gpu_check.py on the CPU with the tiny preset: every case runs, the JSON holds figures for each, the
RefLayer-to-bare ratios are computed from the same run, and neither ray nor boto3 is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_tiny_preset_on_cpu_runs_every_case(tmp_path):
    out = tmp_path / "check.json"
    args = ["--preset", "tiny", "--device", "cpu", "--warmup", "0", "--iters", "1", "--sample-steps", "2"]
    proc = _run([*args, "--threads", "1", "--infer-dtypes", "fp32", "bf16", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {} and result["forbidden_modules"] == []
    cases = result["cases"]
    train = {"bare_64", "train_64", "bare_64_gc", "train_64_gc", "bare_128_gc", "train_128_gc"}
    infer = {
        "vae_encode_128",
        "vae_decode_128",
        "bare_sample_128",
        "decompose_128_cfg1",
        "decompose_128_cfg3",
    }
    assert train | infer | {f"{c}_bf16w" for c in infer} == set(cases)
    for name in train:
        assert cases[name]["samples_per_s"] > 0 and cases[name]["batch"] >= 1
    for name in ("train_64", "train_64_gc", "train_128_gc"):
        bare = cases[name.replace("train", "bare")]
        assert abs(cases[name]["ratio_to_bare"] - cases[name]["samples_per_s"] / bare["samples_per_s"]) < 1e-9
    for name in ("decompose_128_cfg1", "decompose_128_cfg3", "decompose_128_cfg1_bf16w"):
        assert cases[name]["output_ok"] is True and cases[name]["s_per_image"] > 0
    assert cases["decompose_128_cfg3"]["transformer_batch"] == 2
    assert result["build"]["text_tokens"] > 0 and result["build"]["params_transformer"] > 0
    assert "RefLayer GPU check" in proc.stdout


def test_only_selects_cases_and_bad_arguments_are_refused(tmp_path):
    out = tmp_path / "only.json"
    proc = _run(["--preset", "tiny", "--device", "cpu", "--iters", "1", "--warmup", "0", "--only", "vae_",
                 "--out", str(out)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads(out.read_text())["cases"]) == {"vae_encode_128", "vae_decode_128"}
    bad = _run(["--preset", "tiny", "--device", "cpu", "--guidance", "1.0"])
    assert bad.returncode == 2 and "--guidance" in bad.stderr
