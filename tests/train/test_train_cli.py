"""`reflade train` as a person runs it: options, errors, the latent-caching pass, and the registered model loaded
by alias in a fresh process giving identical outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from reflade.engine.config import EngineConfig
from reflade.engine.pipeline import synthetic_rows
from reflade.engine.schema import decode_image, load_rows, write_shard
from reflade.engine.synth import make_scene
from reflade.platform.cli import main as cli_main
from reflade.train.config import TrainSettings
from reflade.train.latents import LATENT_COLUMNS, _encode, encode_latents
from reflade.train.preprocess import preprocess_row
from reflade.train.step import PhaseLoss, step_generator

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _rows(seeds, split):
    rows = []
    for seed in seeds:
        rows += synthetic_rows(
            make_scene(seed, size=(64, 64), n_objects=(2, 2)), f"s{seed}", "cfg", split, EngineConfig()
        )
    return rows


@pytest.fixture
def env(registry_env, tmp_path):
    """A dataset (2 train scenes, 1 test scene) and a random tiny VAE registered; the configuration in the
    environment, as a shell has it."""
    from reflade.train.vae import build_tiny_vae

    registry = registry_env
    rows = _rows((11, 12), "train") + _rows((13,), "test")
    (tmp_path / "ds" / "shards").mkdir(parents=True)
    write_shard(rows, str(tmp_path / "ds" / "shards" / "part-0.parquet"))
    dataset = registry.create("dataset", "cli-src", tmp_path / "ds", progress=False)
    build_tiny_vae(64, seed=0).save_pretrained(tmp_path / "vae", safe_serialization=True)
    vae = registry.create("weights", "tiny-vae", tmp_path / "vae", progress=False)
    return {
        "dataset": dataset.ref,
        "vae": vae.ref,
        "train_rows": sum(r["split"] == "train" for r in rows),
        "tmp": tmp_path,
    }


def test_cached_latents_are_what_the_step_encodes(registry, tmp_path):
    """The cache holds exactly encode_batch's tensors, and a step on them gives the same loss."""
    from reflade.train.model import build_reflayer
    from reflade.train.vae import build_tiny_vae

    torch.set_num_threads(1)
    bundle = build_reflayer("tiny", vae=build_tiny_vae(64, seed=0))
    rows = [preprocess_row(r, 64) for r in _rows((21,), "train")[:3]]
    batch = {
        k: np.stack([r[k] for r in rows]) if k != "text" else np.array([r[k] for r in rows]) for k in rows[0]
    }
    cached = encode_latents(bundle, batch)
    assert set(cached) == set(LATENT_COLUMNS)
    assert all(a.dtype == np.float32 and a.shape[0] == 3 for a in cached.values())
    direct, from_cache = _encode(bundle, batch), _encode(bundle, cached)
    for key in LATENT_COLUMNS.values():
        assert torch.equal(direct[key], from_cache[key]), key
    settings = TrainSettings(steps=1, batch_size=3)
    loss = PhaseLoss(bundle, settings)
    a = loss(direct, step_generator(settings, 0, 0))
    b = loss(from_cache, step_generator(settings, 0, 0))
    # equal inputs in other memory layouts: CPU kernels may sum in another order, so a tolerance
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    assert torch.isfinite(a)


def test_train_command_errors_are_clear(env, capsys):
    assert cli_main(["train", "--steps", "3"]) != 0
    assert "--dataset" in capsys.readouterr().err
    assert cli_main(["train", "--dataset", env["dataset"], "--phase", "nope"]) != 0
    assert "phase" in capsys.readouterr().err
    # sd3-medium needs its base checkpoint in the registry; the message names what is missing.
    assert cli_main(["train", "--dataset", env["dataset"], "--preset", "sd3-medium"]) != 0
    captured = capsys.readouterr()
    assert "sd3-medium" in captured.err + captured.out


def test_train_command_with_cached_latents_and_a_fresh_process_load(env, registry, tmp_path, capsys):
    run = "cli-cache-" + tmp_path.name[-8:]

    def argv(steps: int) -> list[str]:
        return [
            "train",
            "--dataset",
            env["dataset"],
            "--vae",
            env["vae"],
            "--steps",
            str(steps),
            "--batch-size",
            "2",
            "--checkpoint-every",
            "3",
            "--cache-latents",
            "--threads",
            "1",
            "--run",
            run,
        ]

    assert cli_main(argv(3)) == 0
    assert "caching latents" in capsys.readouterr().out
    v = registry.resolve("model/reflayer@candidate")
    assert v.metadata["cached_latents"] is True and v.metadata["run"]["name"] == run
    assert env["dataset"] in v.parents and env["vae"] in v.parents
    assert v.metrics["steps"] == 3 and np.isfinite(v.metrics["loss"])
    info, _ = registry.storage.get_json(f"runs/train/{run}/latents/_COMPLETE.json")
    assert info["rows"] == env["train_rows"] and set(info["columns"]) == set(LATENT_COLUMNS)

    # The same model by alias: here, and in a fresh Python process with only the environment's configuration.
    from reflade.train.model import load_reflayer
    from reflade.train.pipeline_reflayer import RefLayerPipeline

    row = load_rows(registry, env["dataset"], "test")[0]
    image = decode_image(row["image"], "RGB")
    prompt = {"type": "box", "box": list(row["prompts"][0]["box"] or [4, 4, 40, 40]), "text": "the thing"}
    np.save(tmp_path / "image.npy", image)
    (tmp_path / "prompt.json").write_text(json.dumps(prompt))
    torch.set_num_threads(1)
    here = RefLayerPipeline(load_reflayer("model/reflayer@candidate", cache_dir=tmp_path / "c1"))(
        image, prompt, num_inference_steps=3, seed=5
    )
    script = textwrap.dedent(
        f"""
        import json, numpy as np, torch
        torch.set_num_threads(1)
        from reflade.train.model import load_reflayer
        from reflade.train.pipeline_reflayer import RefLayerPipeline
        bundle = load_reflayer("model/reflayer@candidate", cache_dir={str(tmp_path / "c2")!r})
        image = np.load({str(tmp_path / "image.npy")!r})
        prompt = json.load(open({str(tmp_path / "prompt.json")!r}))
        out = RefLayerPipeline(bundle)(image, prompt, num_inference_steps=3, seed=5)
        np.save({str(tmp_path / "there.npy")!r}, out)
        print(bundle.config["ref"])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=dict(os.environ), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == v.ref
    there = np.load(tmp_path / "there.npy")
    assert here.shape == there.shape == (*image.shape[:2], 4) and here.dtype == there.dtype == np.uint8
    # Two processes, two loads of the same weights: equal up to float rounding (BLAS kernels pick their
    # summation order by memory layout and threads): at most 1 level of 8 bits, in at most 0.1% of the values.
    diff = np.abs(here.astype(np.int16) - there.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (diff.max(), int((diff > 0).sum()))

    # Resuming the run reuses the complete cache (no second encoding pass) and continues the step count.
    assert cli_main([*argv(4), "--resume"]) == 0
    assert "reusing the cached latents" in capsys.readouterr().out
    v2 = registry.resolve("model/reflayer@candidate")
    assert v2.ref != v.ref and v2.metrics["steps"] == 4
