"""RefLayer training under Ray Train: registration and lineage, two-rank DDP, checkpoint/resume, a killed worker.

All runs are tiny (64 px, a handful of steps) on the session's local 2-CPU Ray cluster, with 0.5 CPU per worker
so Ray Data's read tasks keep room (design.md, Pitfalls).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reflade.engine.config import EngineConfig
from reflade.engine.pipeline import synthetic_rows
from reflade.engine.schema import load_rows, write_shard
from reflade.engine.synth import make_scene
from reflade.platform.config import load_config
from reflade.train.trainer import (
    TrainSettings,
    preprocess_row,
    run_training,
    train_plain,
)

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _tiny_vae():
    try:
        from reflade.train.vae import build_tiny_vae

        return build_tiny_vae(64, seed=0)
    except ImportError:  # the VAE module not there yet: a random AutoencoderKL of the same layout
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 64),
            latent_channels=16,
            norm_num_groups=8,
            sample_size=64,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )


@pytest.fixture
def world(registry, storage_config, tmp_path):
    """A registered 8-ish-row dataset (2 scenes, train split), a registered tiny VAE and a config for both."""
    rows = []
    for seed in (1, 2):
        rows += synthetic_rows(
            make_scene(seed, size=(64, 64), n_objects=(2, 2)), f"s{seed}", "cfg", "train", EngineConfig()
        )
    (tmp_path / "ds" / "shards").mkdir(parents=True)
    write_shard(rows, str(tmp_path / "ds" / "shards" / "part-0.parquet"))
    dataset = registry.create("dataset", "train-src", tmp_path / "ds", progress=False)
    vae_dir = tmp_path / "vae"
    _tiny_vae().save_pretrained(vae_dir, safe_serialization=True)
    vae = registry.create("weights", "tiny-vae", vae_dir, progress=False)
    cfg = load_config(
        env={
            "REFLADE_STORAGE_ENDPOINT": storage_config.endpoint,
            "REFLADE_STORAGE_BUCKET": storage_config.bucket,
            "AWS_ACCESS_KEY_ID": storage_config.access_key_id,
            "AWS_SECRET_ACCESS_KEY": storage_config.secret_access_key,
            "REFLADE_REGISTRY_PREFIX": registry.prefix.rstrip("/"),
        }
    )
    return {
        "cfg": cfg,
        "dataset": dataset.ref,
        "vae": vae.ref,
        "n_rows": len(rows),
        "cache": tmp_path / "cache",
        "tmp": tmp_path,
    }


def _settings(**kw) -> TrainSettings:
    base = dict(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=3, report_every=1, seed=0)
    base.update(kw)
    return TrainSettings(**base)


def test_settings_validate():
    with pytest.raises(ValueError, match="phase"):
        TrainSettings(phase="nope")
    with pytest.raises(ValueError, match="optimizer"):
        TrainSettings(optimizer="lion")
    assert TrainSettings().cpus_per_worker == 0.5


def test_preprocess_row_shapes(world, registry):
    row = load_rows(registry, world["dataset"], "train")[0]
    out = preprocess_row(row, 32)
    assert out["image"].shape == (3, 32, 32) and out["canvas"].shape == (3, 32, 32)
    assert out["layer"].shape == (4, 32, 32)
    assert 0.0 <= out["layer"].min() and out["layer"].max() <= 1.0
    assert -1.0 <= out["image"].min() and out["image"].max() <= 1.0
    assert isinstance(out["text"], str)
    again = preprocess_row(row, 32)
    assert np.array_equal(out["canvas"], again["canvas"]) and out["text"] == again["text"]


def test_run_training_registers_candidate_with_lineage(world, registry):
    v = run_training(
        world["cfg"],
        world["dataset"],
        _settings(phase="both", ema_decay=0.9, grad_accum=2),
        vae_ref=world["vae"],
        cache_dir=world["cache"],
        log=None,
    )
    assert v.ref == "model/reflayer@1"
    assert registry.aliases("model", "reflayer")["candidate"] == 1
    assert world["dataset"] in v.parents and world["vae"] in v.parents
    assert v.metrics["steps"] == 3 and np.isfinite(v.metrics["loss"]) and v.metrics["samples_per_s"] > 0
    assert v.metadata["settings"]["phase"] == "both" and v.metadata["weights"] == "ema"
    assert any(f["path"] == "bundle.json" for f in v.files)
    # The plain loop shares the step function and runs on the same inputs.
    from reflade.train.model import build_reflayer

    bundle = build_reflayer("tiny", vae=world["vae"], registry=registry, cache_dir=world["cache"])
    rows = [preprocess_row(r, 64) for r in load_rows(registry, world["dataset"], "train")[:4]]
    batch = {
        k: np.stack([r[k] for r in rows]) if k != "text" else np.array([r[k] for r in rows]) for k in rows[0]
    }
    m = train_plain(bundle, [batch], _settings(steps=2))
    assert m["steps"] == 2 and m["samples"] == 8 and all(np.isfinite(m["losses"]))


def test_two_worker_ddp_ranks_agree(world):
    probe = world["tmp"] / "probe"
    v = run_training(
        world["cfg"],
        world["dataset"],
        _settings(steps=2, workers=2, batch_size=2, checkpoint_every=2),
        vae_ref=world["vae"],
        cache_dir=world["cache"],
        log=None,
        _test_hooks={"probe_dir": str(probe)},
    )
    ranks = [json.loads((probe / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 2
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-12, abs=1e-9)
    assert v.result.metrics["world_size"] == 2


def test_checkpoint_resume_and_killed_worker(world):
    # First run: 2 steps, checkpoint at step 2; the rank-0 worker is killed at step 3 once and Ray Train restarts
    # the group from that checkpoint (FailureConfig), finishing at step 4.
    marker = world["tmp"] / "crashed"
    run = "resume-test-" + world["tmp"].name[-8:]
    v1 = run_training(
        world["cfg"],
        world["dataset"],
        _settings(steps=4, checkpoint_every=2),
        vae_ref=world["vae"],
        cache_dir=world["cache"],
        run_name=run,
        log=None,
        _test_hooks={"crash_at_step": 3, "crash_marker": str(marker)},
    )
    assert marker.exists(), "the worker was never killed"
    df = v1.result.metrics_dataframe
    assert df["resumed_from"].iloc[-1] == 2 and v1.metrics["steps"] == 4
    # Resume the same run name with more steps: the step counter continues from 4.
    v2 = run_training(
        world["cfg"],
        world["dataset"],
        _settings(steps=6, checkpoint_every=2),
        vae_ref=world["vae"],
        cache_dir=world["cache"],
        run_name=run,
        resume=True,
        log=None,
    )
    m = v2.result.metrics
    assert m["resumed_from"] == 4 and m["step"] == 6 and np.isfinite(m["loss"])
    assert v2.metrics["steps"] == 6 and v2.ref == "model/reflayer@2"
    with pytest.raises(ValueError, match="resume"):
        run_training(
            world["cfg"], world["dataset"], _settings(), vae_ref=world["vae"], run_name=run, log=None
        )
