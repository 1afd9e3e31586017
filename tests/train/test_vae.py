"""The tiny configuration's VAE: its shape, the layer pixel convention, that training reaches a stated held-out
PSNR, determinism, and the registered phase (lineage, metrics, identical outputs after loading by reference)."""

from __future__ import annotations

from collections import Counter

import cv2
import numpy as np
import pytest
import torch

from reflade.engine.config import EngineConfig
from reflade.engine.pipeline import synthetic_rows
from reflade.engine.schema import load_rows, write_shard
from reflade.engine.synth import make_scene
from reflade.platform.cli import main as cli_main
from reflade.train.losses import premultiply_over_grey
from reflade.train.vae import (
    LATENT_CHANNELS,
    build_tiny_vae,
    image_to_vae_input,
    layer_over_grey,
    layer_to_vae_input,
    vae_training_tensors,
)
from reflade.train.vae_training import latent_stats, load_vae, psnr, register_vae, run_vae_phase, train_vae

PSNR_STEPS = 150
"""Steps of the PSNR test (batch 8, 64 px: 1200 samples, about 45 s on 2 idle cores)."""
PSNR_MIN_DB = 19.0
"""Held-out PSNR the PSNR test must reach. Measured with these settings: 20.45 dB after 150 steps (21.0 after
200, 22.0 after 300, 23.3 after 600); the untrained VAE: 8.6 dB."""


def scene_tensors(seeds, size: int = 64) -> torch.Tensor:
    """Images, complete object layers (over grey) and object-removed backgrounds of synthetic scenes, as VAE inputs."""
    out = []
    for seed in seeds:
        scene = make_scene(seed, size=(size, size))
        out.append(image_to_vae_input(scene.image))
        for obj in scene.objects:
            out.append(layer_over_grey(obj.layer))
            out.append(image_to_vae_input(scene.without(obj.entity_id)))
    return torch.stack(out)


def test_tiny_vae_shape():
    vae = build_tiny_vae(64)
    n = sum(p.numel() for p in vae.parameters())
    assert 0.5e6 < n < 1.5e6, n
    assert vae.config.latent_channels == LATENT_CHANNELS == 16
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
    assert z.shape == (2, 16, 16, 16)  # 4x downscale
    assert y.shape == x.shape


def test_layer_convention():
    layer = np.zeros((8, 8, 4), np.uint8)
    layer[:4, :4] = (200, 100, 50, 255)
    layer[4:, 4:] = (40, 80, 120, 128)  # half transparent, straight colour
    x = layer_to_vae_input(layer)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x[:, :4, :4], torch.tensor([200, 100, 50]).view(3, 1, 1) / 127.5 - 1)
    assert torch.all(x[:, :4, 4:] == -1)  # alpha 0 -> RGB 0 -> -1
    # Resized premultiplied: a transparent neighbour does not darken the straight colour of the edge.
    small = layer_to_vae_input(layer, 4)
    assert small.shape == (3, 4, 4)
    assert torch.allclose(small[:, 0, 0], x[:, 0, 0], atol=1e-5)
    assert torch.allclose(small[:, 3, 3], x[:, 7, 7], atol=1e-5)
    assert torch.all(small[:, 0, 3] == -1)
    # What the VAE encodes: the layer over mid-grey, RefLayer's target convention.
    grey = layer_over_grey(layer, 4)
    straight_rgba = torch.cat(
        [
            (small + 1) / 2,
            torch.from_numpy(cv2.resize(layer[..., 3] / 255.0, (4, 4), interpolation=cv2.INTER_AREA))[None],
        ]
    )
    assert torch.allclose(grey, premultiply_over_grey(straight_rgba[None].float())[0], atol=1e-6)
    assert torch.all(grey[:, 0, 3] == 0) and torch.allclose(grey[:, 3, 3], x[:, 7, 7] * 128 / 255, atol=1e-6)
    img = image_to_vae_input(np.full((6, 10, 3), 255, np.uint8), (4, 8))
    assert img.shape == (3, 4, 8) and torch.all(img == 1)
    with pytest.raises(ValueError, match="RGBA"):
        layer_to_vae_input(np.zeros((4, 4, 3), np.uint8))


def test_training_reaches_stated_psnr_on_held_out_scenes():
    """64 synthetic scenes (images, complete layers, backgrounds) train; 16 other scenes are held out.

    Held-out PSNR is over every pixel of the 16 scenes' images, layers (over grey) and backgrounds together.
    """
    train = scene_tensors(range(64))
    held = scene_tensors(range(1000, 1016))
    vae, m = train_vae(
        train, steps=PSNR_STEPS, batch_size=8, lr=2e-3, seed=0, holdout=held, progress=False, log=print
    )
    assert m["psnr_holdout"] == pytest.approx(psnr(vae, held))
    assert m["psnr_holdout"] > PSNR_MIN_DB
    assert m["psnr_holdout_init"] < m["psnr_holdout"] - 8.0
    # The latent scale: (z - shift) * scale has mean 0 and variance 1 over the training set.
    mean, std = latent_stats(vae, train)
    assert (mean - vae.config.shift_factor) * vae.config.scaling_factor == pytest.approx(0.0, abs=1e-3)
    assert std * vae.config.scaling_factor == pytest.approx(1.0, rel=1e-3)
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


def test_training_is_deterministic():
    data = scene_tensors(range(3), size=32)
    a, ma = train_vae(data, steps=3, batch_size=4, seed=7, progress=False, log=None)
    b, mb = train_vae(data, steps=3, batch_size=4, seed=7, progress=False, log=None)
    c, _ = train_vae(data, steps=3, batch_size=4, seed=8, progress=False, log=None)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ma["loss"] == mb["loss"] and a.config.scaling_factor == b.config.scaling_factor
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def _register_dataset(registry, folder, name: str, splits) -> str:
    """A dataset of synthetic 64 px scenes, scene i in split ``splits[i]``."""
    cfg = EngineConfig()
    rows = []
    for seed, split in enumerate(splits, start=1):
        rows += synthetic_rows(make_scene(seed, size=(64, 64)), f"scene-{seed}", "cfg", split, cfg)
    (folder / "shards").mkdir(parents=True)
    write_shard(rows, str(folder / "shards" / "part-0.parquet"))
    return registry.create("dataset", name, folder, progress=False).ref


def test_vae_phase_registers_and_loads(registry_env, tmp_path):
    registry = registry_env
    dataset = _register_dataset(registry, tmp_path / "ds", "vae-src", ("train", "train", "train", "test"))
    # Through the command line, as a person runs it.
    argv = [
        "train",
        "vae",
        "--dataset",
        "dataset/vae-src",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--seed",
        "3",
    ]
    assert cli_main(argv) == 0
    v = registry.resolve("weights/tiny-vae")
    assert v.ref == "weights/tiny-vae@1"
    assert v.parents == [dataset]
    assert v.manifest["license"] == "Apache-2.0 (trained by RefLade)"
    assert v.manifest["source"] == "reflade train vae"
    assert {"psnr_holdout", "psnr_holdout_init", "loss"} <= set(v.metrics)
    assert v.metadata["latent_shape"] == [16, 16, 16] and v.metadata["holdout_from"] == "test split"
    assert {f["path"] for f in v.files} == {"config.json", "diffusion_pytorch_model.safetensors"}

    # The same training outside the phase (same rows, seed and settings) gives identical files: the registry
    # hands back version 1 instead of creating version 2.
    train_x = vae_training_tensors(load_rows(registry, dataset, "train"), 64)
    held_x = vae_training_tensors(load_rows(registry, dataset, "test"), 64)
    vae, metrics = train_vae(train_x, steps=4, batch_size=4, seed=3, holdout=held_x, progress=False, log=None)
    again = register_vae(registry, vae, [dataset], metrics)
    assert again.reused and again.ref == v.ref

    # Loaded by reference in this process: frozen, and the same outputs as the trained model.
    loaded = load_vae(registry, "weights/tiny-vae@latest", cache_dir=tmp_path / "cache")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.config.scaling_factor == vae.config.scaling_factor == v.metadata["scaling_factor"]
    assert loaded.config.shift_factor == vae.config.shift_factor
    # The weights exactly; the outputs of the two objects up to float rounding (the loaded weights sit at the
    # file's offsets, and CPU kernels may sum in another order there).
    for k, w in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], w), k
    z = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z).sample, vae.decode(z).sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            loaded.encode(held_x[:4]).latent_dist.mode(),
            vae.encode(held_x[:4]).latent_dist.mode(),
            rtol=1e-5,
            atol=1e-5,
        )

    # A registry (not a Config) works too; a dataset without a test split holds out whole source images.
    no_test = _register_dataset(registry, tmp_path / "ds2", "vae-no-test", ("train", "quality", "train"))
    v2 = run_vae_phase(registry, no_test, steps=2, batch_size=2, seed=5, progress=False, log=None)
    assert v2.ref == "weights/tiny-vae@2" and not v2.reused and v2.parents == [no_test]
    assert v2.metadata["holdout_from"] == "a tenth of the training sources"
    # Tensors per source: its image once, plus one layer per row.
    per_source = Counter(r["source_sha256"] for r in load_rows(registry, no_test))
    sizes = {1 + n for n in per_source.values()}
    assert v2.metadata["holdout_images"] in sizes  # exactly one whole source held out
    assert v2.metadata["train_images"] + v2.metadata["holdout_images"] == sum(
        1 + n for n in per_source.values()
    )
