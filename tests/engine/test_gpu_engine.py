"""bench/gpu_engine.py drives the product: on the CPU, with the tiny random checkpoints read from a local folder
(``engine.weights_dir``, no registry), its rows are the rows the same stage code makes through Ray Data
(``run_engine`` with the neural family, weights from the registry): same sample ids, same layer bytes; it loads
neither ray nor boto3; and the real-size configurations it loads on a GPU are the real models' sizes (built on
the ``meta`` device)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reflade.engine.backends.random_weights import (
    BLIP_BASE,
    OWLV2_BASE_16,
    REAL_NAMES,
    SAM_VIT_H_CONFIG,
    SD3_MEDIUM_TRANSFORMER,
    SD3_VAE,
    engine_weights,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_engine.py"
SCENES, IMAGE_SIZE, STEPS, BATCH = 2, 256, 2, 2


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_engine_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_driver_rows_match_the_ray_pipeline(storage_config, registry, ray_cluster, tmp_path):
    from reflade.engine.backends.tiny_weights import ALL_TINY_NAMES, register_tiny_weights
    from reflade.engine.pipeline import run_engine
    from reflade.engine.schema import load_rows
    from reflade.platform.config import load_config

    # 1. the driver, as the GPU machine runs it (in its own process: what it imports is checked there)
    out = tmp_path / "driver.json"
    args = [
        "--size",
        "tiny",
        "--device",
        "cpu",
        "--weights-dir",
        str(tmp_path / "weights"),
        "--out",
        str(out),
    ]
    args += ["--scenes", str(SCENES), "--image-size", str(IMAGE_SIZE), "--steps", str(STEPS)]
    args += ["--batch-size", str(BATCH)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in a Ray actor of under one CPU: same float sums
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["forbidden_modules"] == [], "the GPU machine has neither ray nor boto3"
    assert result["device"]["type"] == "cpu" and result["images"] == SCENES
    assert result["quarantined"] == {}, "every scene should reach the layer stages (one batch of two)"
    assert sorted(result["weights"]) == sorted(
        f"weights/{n}@local" for n in ("tiny-sam", "tiny-owlv2", "tiny-blip", "tiny-sd3-inpaint")
    ), "loaded from the folder, not a registry"
    for stage in ("prefilter", "scene", "completion", "matting", "prompts", "postfilter"):
        assert result["stages"][stage]["s_per_image"] > 0, stage
    assert result["e2e_s_per_image"] >= result["gpu_stages_s_per_image"] > 0
    assert result["rows"], "the tiny run should keep layers"
    assert len(result["rows"]) == result["layers_kept"]
    assert "end to end" in proc.stdout and "completion" in proc.stdout

    # 2. the same stage code through Ray Data, weights by registry reference
    register_tiny_weights(registry, ALL_TINY_NAMES)
    ge = _load_script()
    ecfg = ge.engine_config("tiny", tmp_path / "weights", STEPS, BATCH, gpu=False)
    cfg = load_config(None, env={})
    for f in ("endpoint", "bucket", "region", "access_key_id", "secret_access_key"):
        setattr(cfg.storage, f, getattr(storage_config, f))
    cfg.registry.prefix = registry.prefix.rstrip("/")
    eng = cfg.section("engine")
    for field, value in engine_weights("tiny").items():
        setattr(eng, field, value)
    eng.completion_steps, eng.batch_size = STEPS, BATCH
    eng.weights_cache, eng.layout = str(tmp_path / "cache"), "staged"
    assert eng.fingerprint() == ecfg.fingerprint(), "the two runs must share their sample ids' config hash"
    (tmp_path / "in").mkdir()
    for rec in ge.scene_records(SCENES, IMAGE_SIZE):
        (tmp_path / "in" / rec["name"]).write_bytes(rec["data"])
    res = run_engine(
        cfg, str(tmp_path / "in"), "gpu-driver", backends="neural", progress=False, log=lambda *_: None
    )
    rows = {r["sample_id"]: hashlib.sha256(r["layer"]).hexdigest() for r in load_rows(registry, res.dataset)}
    assert sorted(rows) == sorted(result["rows"])
    assert rows == result["rows"], "layer bytes differ between the driver and the Ray pipeline"


@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_size_configurations_on_meta(name):
    """The real-size random checkpoints the GPU check loads have the real models' sizes (counted on ``meta``)."""
    with torch.device("meta"):
        if name == "sam-vit-h-random":
            from segment_anything import build_sam_vit_h

            from reflade.engine.backends.neural_models import build_sam

            model = build_sam(SAM_VIT_H_CONFIG)
            assert _params(model) == _params(build_sam_vit_h(checkpoint=None))  # segment_anything's own ViT-H
            assert 630e6 < _params(model.image_encoder) < 640e6  # the "636 M" usually quoted
        elif name == "owlv2-base-16-random":
            from transformers import Owlv2Config, Owlv2ForObjectDetection

            model = Owlv2ForObjectDetection(Owlv2Config(**OWLV2_BASE_16))
            assert 150e6 < _params(model) < 160e6  # OWLv2-base/16: 154 M
            assert model.config.vision_config.image_size == 768
        elif name == "blip-base-random":
            from transformers import BlipConfig, BlipForConditionalGeneration

            model = BlipForConditionalGeneration(BlipConfig(**BLIP_BASE))
            # blip-image-captioning-base: 247 M in its checkpoint, which stores the tied 30,524 x 768 word
            # embedding twice (23.4 M); 224 M distinct
            assert 220e6 < _params(model) < 230e6
            assert model.config.vision_config.image_size == 384
        else:
            from diffusers import AutoencoderKL, SD3Transformer2DModel

            model = SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER)
            assert 2.0e9 < _params(model) < 2.06e9  # SD3-medium: 2.03 B
            assert 80e6 < _params(AutoencoderKL(**SD3_VAE)) < 90e6  # SD3's VAE: 83.8 M
    assert (
        engine_weights("real")[
            {
                "sam-vit-h-random": "sam_weights",
                "owlv2-base-16-random": "detector_weights",
                "blip-base-random": "captioner_weights",
                "sd3-medium-inpaint-random": "sd3_weights",
            }[name]
        ]
        == f"weights/{name}"
    )


def test_real_size_captioner_tokenizer_decodes_through_the_product(tmp_path):
    """``blip-base-random``'s tokenizer (synthetic words at BLIP's 30,524 ids) saved by ``write_blip`` loads
    through the product's captioner from ``engine.weights_dir`` and decodes what the model generates (checked
    with a narrow model of that vocabulary: the real widths change nothing here)."""
    import numpy as np

    from reflade.engine.backends.neural_captioner import NeuralCaptioner
    from reflade.engine.backends.random_weights import _blip_tokenizer, write_blip
    from reflade.engine.config import EngineConfig

    narrow = {
        "text_config": {**BLIP_BASE["text_config"], "hidden_size": 12, "num_hidden_layers": 1},
        "vision_config": {"hidden_size": 16, "num_hidden_layers": 1, "image_size": 32, "patch_size": 16},
        "projection_dim": 12,
        "image_text_hidden_size": 12,
    }
    narrow["text_config"].update(num_attention_heads=2, intermediate_size=24)
    narrow["vision_config"].update(num_attention_heads=2, intermediate_size=32)
    write_blip(tmp_path / "blip-base-random", _blip_tokenizer(), narrow)
    cfg = EngineConfig(
        weights_dir=str(tmp_path), captioner_weights=engine_weights("real")["captioner_weights"]
    )
    captioner = NeuralCaptioner(cfg)
    assert captioner.weights == ["weights/blip-base-random@local"]
    assert captioner.blip.model.config.text_config.vocab_size == len(captioner.blip.tokenizer) == 30524
    crops = [np.random.default_rng(i).integers(0, 256, (40, 30, 3), np.uint8) for i in range(3)]
    captions = captioner.caption(crops)
    assert len(captions) == 3 and any(captions), captions
    assert all(w.startswith("t") and w[1:].isdigit() for c in captions for w in c.split()), captions


def test_random_weights_command_writes_a_weights_dir(tmp_path):
    """``reflade engine random-weights --size tiny --out DIR``: the folders the driver loads, and the settings."""
    from typer.testing import CliRunner

    from reflade.engine.cli import engine_app

    runner = CliRunner()
    res = runner.invoke(engine_app, ["random-weights", "--size", "tiny", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert {p.name for p in tmp_path.iterdir()} == {
        "tiny-sam",
        "tiny-owlv2",
        "tiny-repaint",
        "tiny-blip",
        "tiny-sd3-inpaint",
    }
    assert f'"weights_dir": "{tmp_path}"' in res.output and '"completion_model": "sd3-inpaint"' in res.output
    bad = runner.invoke(engine_app, ["random-weights", "--size", "huge", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "unknown weights size 'huge' (known: tiny, real)" in bad.output


@pytest.mark.parametrize(
    "image_size", [128, 768]
)  # the tiny detector's grid (8 x 8) and OWLv2-base's (48 x 48)
def test_random_detector_boxes_are_a_third_of_the_image_on_any_grid(tmp_path, image_size):
    """A random OWL's boxes stay about a third of the image wide whatever its patch grid, so that random SAM
    masks pass the entity area limits and overlap (at OWLv2-base's grid, OWL's own prior would make them 7%:
    no entity at all). A narrow model on the real grid: the width does not change the box prior."""
    from reflade.engine.backends.neural_models import load_owlv2
    from reflade.engine.backends.random_weights import write_owlv2
    from reflade.engine.backends.tiny_weights import TINY_OWLV2, detector_tokenizer

    config = {**TINY_OWLV2, "vision_config": {**TINY_OWLV2["vision_config"], "image_size": image_size}}
    write_owlv2(tmp_path, *detector_tokenizer(), config)
    model = load_owlv2(tmp_path).model
    with torch.inference_mode():
        pixels = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        feature_map, _ = model.image_embedder(pixel_values=pixels)
        b, ph, pw, d = feature_map.shape
        boxes = model.box_predictor(feature_map.reshape(b, ph * pw, d), feature_map)[0]
    assert ph == image_size // 16
    sides = boxes[:, 2:].median().item()
    assert 0.25 < sides < 0.4, sides
