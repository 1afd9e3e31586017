"""bench/gpu_engine.py: the tiny preset end to end on the CPU (every stage timed, no ray/boto3 imported), the
completion's sampling sides (bucketed and fixed, recorded in the JSON), the matting step degrading when pymatting
cannot be imported, and the full-size models' parameter counts, built on the ``meta`` device (no memory
allocated)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_engine.py"
STAGES = ("owlv2", "sam_encoder", "sam_decoder", "vae_encode", "sd3_transformer", "vae_decode", "matting")


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_engine_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclass/pickle lookups need the module registered
    spec.loader.exec_module(module)
    return module


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_help_explains_every_option():
    proc = _run(["--help"])
    assert proc.returncode == 0, proc.stderr
    for option in (
        "--scenes",
        "--size",
        "--steps",
        "--batch",
        "--device",
        "--preset",
        "--out",
        "--matting-workers",
        "--completion-sides",
        "--bucket-step",
        "--min-side",
        "--cpu-overlap",
    ):
        assert option in proc.stdout
    assert "ViT-H" in proc.stdout and "SD3" in proc.stdout and "OWLv2" in proc.stdout


def test_tiny_preset_on_cpu(tmp_path):
    out = tmp_path / "tiny.json"
    proc = _run(["--preset", "tiny", "--device", "cpu", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["complete"] is True and result["errors"] == {}
    assert (
        result["forbidden_modules"] == []
    )  # neither ray nor boto3, in the script nor in its matting workers
    assert result["device"]["type"] == "cpu" and result["device"]["torch"] == torch.__version__
    for stage in STAGES:
        entry = result["stages"][stage]
        assert entry["s_per_image"] > 0, stage
        assert entry["s_per_unit"] > 0, stage
        assert entry["anchor_s_per_unit"] > 0, stage
        assert "peak_mem_gb" in entry, stage
    assert result["stages"]["matting"]["available"] is True
    assert result["stages"]["sam_decoder"]["boxes"] == 16
    total = result["total"]
    assert total["s_per_image"] > 0 and total["scenes"] == 3
    # one matting job per layer (the default --matting-unit): every object of every scene
    assert total["matting"] == "overlapped" and total["matting_unit"] == "layer"
    layers = round(result["scenes"]["objects_per_image"] * result["scenes"]["count"])
    assert layers > 3 and len(total["matting_job_s"]) == layers
    assert total["holes"] == sum(result["scenes"]["holes"]) > 0
    assert result["models"]["sd3_transformer"]["params"] < 1_000_000  # tiny really is tiny
    for stage in STAGES:
        assert stage in proc.stdout  # the side-by-side table
    assert "total (e2e)" in proc.stdout
    # bucketed sides by default; the per-stage completion cases still measure the model's full side
    assert result["completion"]["mode"] == "bucketed"
    assert sum(total["completion"]["holes_per_side"].values()) == total["holes"]
    for stage in ("vae_encode", "vae_decode"):
        assert result["stages"][stage]["input_px"] == 64
    assert result["stages"]["sd3_transformer"]["latent"] == [16, 8, 8]
    assert "completion sides (bucketed" in proc.stdout and "by sampling side" in proc.stdout


def _expected_sides(mode: str) -> dict[str, int]:
    """Holes per sampling side of the tiny preset's scenes, from the script's hole rule and the engine's
    rounding function, computed here independently of the run."""
    from collections import Counter

    ge = _load_script()
    ge.ensure_reflade()
    from reflade.engine.backends.neural import sampling_side
    from reflade.engine.synth import make_scene

    counts: Counter[int] = Counter()
    for seed in range(3):
        for _, hole in ge.scene_holes(make_scene(seed, size=(192, 192))):
            crop = ge.crop_side(ge.hole_crop(hole))
            counts[
                64 if mode == "fixed" else sampling_side(crop, max_side=64, step=16, min_side=32, multiple=16)
            ] += 1
    return {str(side): counts[side] for side in sorted(counts)}


@pytest.mark.parametrize("mode", ["bucketed", "fixed"])
def test_completion_sides_are_recorded(tmp_path, mode):
    out = tmp_path / f"{mode}.json"
    proc = _run(
        ["--preset", "tiny", "--device", "cpu", "--cases", "e2e", "--matting-workers", "0",
         "--completion-sides", mode, "--out", str(out)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["complete"] is True and result["forbidden_modules"] == []
    expected = _expected_sides(mode)
    assert sum(expected.values()) == sum(result["scenes"]["holes"]) > 0
    assert result["scenes"]["completion_sides"] == expected
    completion = result["total"]["completion"]
    assert completion["mode"] == mode == result["completion"]["mode"]
    assert completion["holes_per_side"] == expected  # what the e2e pass sampled
    assert set(completion["per_side"]) == set(expected)
    for side, bucket in completion["per_side"].items():
        assert bucket["holes"] == expected[side]
        for stage in ("vae_encode", "sd3_transformer", "vae_decode"):
            assert bucket[f"{stage}_s_per_hole"] > 0
            assert bucket[f"{stage}_s_per_hole"] == pytest.approx(bucket[f"{stage}_s"] / bucket["holes"])
    for stage in ("vae_encode", "sd3_transformer", "vae_decode"):  # the buckets add up to the e2e breakdown
        assert sum(b[f"{stage}_s"] for b in completion["per_side"].values()) == pytest.approx(
            result["total"]["breakdown_s"][stage]
        )
    if mode == "fixed":
        assert expected == {"64": result["total"]["holes"]}
        assert completion["side"] == 64
    else:
        assert len(expected) > 1, "the tiny scenes should give more than one bucket"
        assert all(32 <= int(side) <= 64 and int(side) % 16 == 0 for side in expected)
        assert (completion["bucket_step"], completion["min_side"], completion["max_side"]) == (16, 32, 64)
    assert f"completion sides ({mode}" in proc.stdout


@pytest.mark.parametrize(
    ("overlap", "schedule"), [(True, "queue"), (False, "queue"), (True, "group"), (False, "group")]
)
def test_cpu_overlap_moves_cpu_work_off_the_gpu_path(tmp_path, overlap, schedule):
    """--cpu-overlap (the default) does the same CPU work on a thread: every hole completed and pasted, every
    layer matted; the main thread's breakdown has only the wait, the thread's seconds are recorded apart."""
    out = tmp_path / "e2e.json"
    proc = _run(
        ["--preset", "tiny", "--device", "cpu", "--scenes", "3", "--cases", "e2e", "--matting-workers", "1",
         "--completion-schedule", schedule, "--cpu-overlap" if overlap else "--no-cpu-overlap",
         "--out", str(out)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    total = result["total"]
    assert result["complete"] is True and total["cpu_overlap"] is overlap
    layers = round(result["scenes"]["objects_per_image"] * result["scenes"]["count"])
    assert len(total["matting_job_s"]) == layers > 3  # every layer of every scene matted, once
    assert total["holes"] == sum(result["scenes"]["holes"]) > 0
    breakdown, thread = total["breakdown_s"], total["cpu_overlapped_s_per_image"]
    if overlap:
        assert "cpu_wait" in breakdown and "cpu_prep" not in breakdown and "cpu_paste" not in breakdown
        assert thread["cpu_prep"] > 0 and thread["cpu_paste"] > 0
        assert "on the CPU thread, overlapping the GPU" in proc.stdout
    else:
        assert breakdown["cpu_prep"] > 0 and breakdown["cpu_paste"] > 0 and "cpu_wait" not in breakdown
        assert thread == {}
    for stage in ("owlv2", "sam_encoder", "sam_decoder", "vae_encode", "sd3_transformer", "vae_decode"):
        assert breakdown[stage] > 0, stage


def test_bf16_weights_flow_through_every_stage(tmp_path):
    """The GPU default (bf16 weights, bf16 autocast) checked on the CPU under CPU bf16 autocast: every model
    and every hand-off between them (masks, latents, crops) takes bf16 weights; the default on the CPU is fp32."""
    out = tmp_path / "bf16.json"
    proc = _run(
        ["--preset", "tiny", "--device", "cpu", "--scenes", "2", "--cases", "e2e", "--matting-workers", "0",
         "--weights-dtype", "bf16", "--out", str(out)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["complete"] is True and result["errors"] == {}
    assert result["args"]["weights_dtype"] == "bf16"
    assert result["total"]["s_per_image"] > 0 and result["total"]["holes"] > 0
    ge = _load_script()
    assert ge.parse_args(["--device", "cpu"]).weights_dtype == "fp32"


def test_matting_unavailable_is_recorded_not_fatal(tmp_path):
    """A pymatting that cannot be imported (as without numba) leaves the GPU stages and the total intact."""
    fake = tmp_path / "fake"
    (fake / "pymatting").mkdir(parents=True)
    (fake / "pymatting" / "__init__.py").write_text("raise ImportError('simulated: no numba here')\n")
    out = tmp_path / "nomatting.json"
    pythonpath = os.pathsep.join([str(fake), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = _run(
        ["--preset", "tiny", "--device", "cpu", "--scenes", "2", "--cases", "matting,e2e", "--out", str(out)],
        env={"PYTHONPATH": pythonpath},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    matting = result["stages"]["matting"]
    assert matting["available"] is False and "simulated: no numba here" in matting["reason"]
    assert matting["reason"].startswith("unavailable (")
    assert result["total"]["s_per_image"] > 0
    assert result["total"]["matting"].startswith("unavailable (")
    assert "matting: unavailable (" in proc.stdout
    assert result["forbidden_modules"] == []


def test_full_size_parameter_counts_on_meta():
    ge = _load_script()
    with torch.device("meta"):
        models = {name: build("full") for name, build in ge.BUILDERS.items()}
    assert all(p.is_meta for m in models.values() for p in m.parameters())
    counts = {name: ge.count_params(m) for name, m in models.items()}
    # SAM ViT-H: 641.1 M in all, 637.0 M of them in the image encoder (the "636 M" usually quoted)
    assert 630e6 < counts["sam"] < 650e6
    assert 630e6 < ge.count_params(models["sam"].image_encoder) < 640e6
    assert 2.0e9 < counts["sd3_transformer"] < 2.06e9  # SD3-medium: 2.03 B
    assert 150e6 < counts["owlv2"] < 160e6  # OWLv2-base/16: 154 M
    assert 80e6 < counts["vae"] < 90e6  # SD3's VAE: 83.8 M
    # the configuration is segment_anything's own ViT-H
    from segment_anything import build_sam_vit_h

    with torch.device("meta"):
        reference = build_sam_vit_h(checkpoint=None)
    assert counts["sam"] == ge.count_params(reference)
    sd3 = models["sd3_transformer"].config
    assert (sd3.num_layers, sd3.num_attention_heads, sd3.attention_head_dim, sd3.joint_attention_dim) == (
        24,
        24,
        64,
        4096,
    )
    assert models["owlv2"].config.vision_config.image_size == 768


@pytest.mark.parametrize(
    "argv",
    [
        ["--device", "tpu"],
        ["--device", "cpu", "--cases", "owlv2,nope"],
        ["--device", "cpu", "--scenes", "0"],
        ["--device", "cpu", "--bucket-step", "24"],
        ["--device", "cpu", "--min-side", "0"],
        ["--device", "cpu", "--completion-sides", "exact"],
    ],
)
def test_bad_arguments_are_refused(argv):
    proc = _run(["--preset", "tiny", *argv])
    assert proc.returncode == 2
    assert "error:" in proc.stderr
