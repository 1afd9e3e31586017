"""bench/gpu_engine.py, where it runs the product's code: the tiny preset end to end on the CPU (the engine's own
SAM builder, sampling-side rule and matting backend inside it; no ray/boto3 imported), and the full-size SAM ViT-H
built by the engine's builder on the ``meta`` device, checked against segment_anything's own. The script's own
bookkeeping (its options, its JSON fields for sides, overlap, dtypes and a missing pymatting) is not tested here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

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
