"""The path from training to sampling gives back what it was trained on.

The tiny preset overfits a handful of synthetic samples and the product's own sampling, through the decomposition
API (:meth:`RefLayerPipeline.decompose`), reproduces them. Everything is the product's: the tiny VAE trained by
:func:`reflade.train.vae_training.train_vae` on the samples' images and layers (a random VAE cannot reproduce
colour), the rows as :func:`~reflade.train.preprocess.preprocess_row` decodes them, encoded once
(:func:`encode_latents`, the latent cache), trained by :func:`~reflade.train.plain_loop.train_plain` with
:class:`TrainSettings` (both phases: the transformer and the alpha decoder), then decomposed from the original
images and prompts at their own size.

Samples: 2 scenes of 64 px with 2 objects each; every object gives a foreground and a background row; prompts
(fine): box, point, mask and text+box, each kind getting each type once (8 samples).

Thresholds (a working path reaches them with room; a broken one falls far below): each foreground's alpha IoU
>= :data:`FG_IOU_MIN` and their mean >= :data:`FG_IOU_MEAN_MIN`; each background's alpha IoU >= 0.99 (a
background is opaque); the RGB PSNR inside the ground truth's alpha (>= 0.5) within :data:`PSNR_BELOW_VAE_MAX` dB
of what the frozen VAE itself gives back for that layer (its own reconstruction limits any model above it), on
average within :data:`PSNR_MEAN_BELOW_VAE_MAX` dB, and at least :data:`PSNR_MEAN_MIN` dB on average.
The same trained model with its alpha decoder reset to the untrained one (what a transformer-only run, the old
default phase, registered) must fall below :data:`UNTRAINED_ALPHA_IOU_MAX` foreground IoU: the test sees that
mismatch. Printed with ``-s``.

Measured (2 threads, about 4.5 minutes with the VAE): foreground alpha IoU 0.95-0.99, backgrounds 1.00, RGB PSNR
within 0.3 dB of the VAE's own (19.6-28.1 dB); with the untrained alpha decoder, foreground IoU 0.00-0.24. Before
the tiny preset's loss was the clean latent's error (see :func:`reflade.train.losses.flow_matching_loss`), this
test failed: foreground IoU 0.25-0.54 and RGB PSNR 7.8-14.9 dB.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

from reflade.engine.config import EngineConfig
from reflade.engine.decompose import premultiplied_to_layer
from reflade.engine.pipeline import synthetic_rows
from reflade.engine.schema import decode_image
from reflade.engine.synth import make_scene
from reflade.eval.metrics import alpha_iou
from reflade.train.config import TrainSettings
from reflade.train.latents import encode_latents
from reflade.train.model import build_reflayer
from reflade.train.pipeline_reflayer import RefLayerPipeline
from reflade.train.plain_loop import train_plain
from reflade.train.preprocess import preprocess_row
from reflade.train.vae import vae_training_tensors
from reflade.train.vae_training import train_vae

R = 64
SCENES = (11, 12)
TYPES = ("box", "point", "mask", "text+box")
VAE_STEPS = 200
OVERFIT = TrainSettings(
    steps=1000,
    batch_size=8,
    lr=5e-3,
    warmup_steps=20,
    lr_schedule="cosine",
    timestep_sampling="uniform",
    phase="both",
    alpha_samples=2,
    drop_text=0.0,
    drop_canvas=0.0,
    report_every=10**9,
)
FG_IOU_MIN = 0.6
FG_IOU_MEAN_MIN = 0.8
PSNR_BELOW_VAE_MAX = 8.0
PSNR_MEAN_BELOW_VAE_MAX = 3.0
PSNR_MEAN_MIN = 17.0
UNTRAINED_ALPHA_IOU_MAX = 0.4
THREADS = 2


def _psnr_inside(pred: np.ndarray, truth: np.ndarray) -> float:
    inside = truth[..., 3] >= 128
    diff = pred[..., :3][inside].astype(np.float64) - truth[..., :3][inside].astype(np.float64)
    return 10.0 * np.log10(255.0**2 / max(float(np.mean(diff**2)), 1e-9))


def _samples():
    rows = []
    for seed in SCENES:
        scene = make_scene(seed, size=(R, R), n_objects=(2, 2))
        rows += synthetic_rows(scene, f"overfit-{seed}", "test", "train", EngineConfig())
    prompts = []
    for i, row in enumerate(rows):
        # rows come per object: foreground, background; this gives each kind each prompt type once
        want = TYPES[(i // 2 + 2 * (i % 2)) % len(TYPES)]
        prompts.append(next(p for p in row["prompts"] if p["type"] == want and p["granularity"] == "fine"))
    return rows, prompts


def _vae_layers(bundle, latents: dict[str, np.ndarray], alpha: np.ndarray) -> list[np.ndarray]:
    """The frozen VAE's own reconstruction of each target layer, with the true alpha: what any model's RGB is
    limited by."""
    with torch.no_grad():
        premult = bundle.decode_rgb(torch.as_tensor(latents["lat_target"]))
    a = torch.as_tensor(alpha)
    colour = torch.minimum(((premult + a) / 2).clamp(min=0), a)
    layers = torch.cat([colour.clamp(0, 1), a], 1).permute(0, 2, 3, 1).numpy()
    return [premultiplied_to_layer(layer, R, R) for layer in layers]


@pytest.fixture(scope="module")
def overfit():
    saved = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        t0 = time.perf_counter()
        rows, prompts = _samples()
        tensors = vae_training_tensors(rows, R)
        vae, vae_metrics = train_vae(tensors, steps=VAE_STEPS, holdout=tensors, progress=False, log=None)
        t_vae = time.perf_counter() - t0
        bundle = build_reflayer("tiny", vae=vae, seed=0)
        untrained_alpha = copy.deepcopy(bundle.model.alpha_decoder.state_dict())
        samples = [preprocess_row({**r, "prompts": [p]}, R) for r, p in zip(rows, prompts, strict=True)]
        batch = {k: np.stack([s[k] for s in samples]) for k in ("image", "layer", "canvas")}
        batch.update(text=np.array([s["text"] for s in samples]), kind=np.array([s["kind"] for s in samples]))
        cached = encode_latents(bundle, batch)
        t1 = time.perf_counter()
        out = train_plain(bundle, [cached], OVERFIT)
        t_train = time.perf_counter() - t1
        images = [decode_image(r["image"], "RGB") for r in rows]
        kinds = [r["kind"] for r in rows]
        pipe = RefLayerPipeline(bundle)
        preds = pipe.decompose(images, prompts, kinds, steps=20, seeds=0)
        ceiling = _vae_layers(bundle, cached, batch["layer"][:, 3:4])
        trained_alpha = copy.deepcopy(bundle.model.alpha_decoder.state_dict())
        bundle.model.alpha_decoder.load_state_dict(untrained_alpha)
        preds_untrained_alpha = pipe.decompose(images, prompts, kinds, steps=20, seeds=0)
        bundle.model.alpha_decoder.load_state_dict(trained_alpha)
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(saved)
    truths = [decode_image(r["layer"], "RGBA") for r in rows]
    res = {
        "kinds": kinds,
        "types": [p["type"] for p in prompts],
        "iou": [alpha_iou(p, t) for p, t in zip(preds, truths, strict=True)],
        "psnr": [_psnr_inside(p, t) for p, t in zip(preds, truths, strict=True)],
        "psnr_vae": [_psnr_inside(c, t) for c, t in zip(ceiling, truths, strict=True)],
        "iou_untrained_alpha": [alpha_iou(p, t) for p, t in zip(preds_untrained_alpha, truths, strict=True)],
        "loss": out["loss"],
        "vae_psnr": vae_metrics["psnr_holdout"],
        "seconds": {"vae": t_vae, "train": t_train, "all": wall},
    }
    print(
        f"\noverfit ({THREADS} threads): VAE {VAE_STEPS} steps {t_vae:.0f} s (PSNR {res['vae_psnr']:.1f} dB), "
        f"RefLayer {OVERFIT.steps} steps {t_train:.0f} s, all {wall:.0f} s"
    )
    for i in range(len(rows)):
        print(
            f"  {res['kinds'][i]:10s} {res['types'][i]:9s} alpha IoU {res['iou'][i]:.3f} "
            f"(untrained alpha decoder {res['iou_untrained_alpha'][i]:.3f}) RGB PSNR {res['psnr'][i]:.1f} dB "
            f"(the VAE's own {res['psnr_vae'][i]:.1f})"
        )
    return res


def _by_kind(res, key: str, kind: str) -> list[float]:
    return [v for v, k in zip(res[key], res["kinds"], strict=True) if k == kind]


def test_overfit_alpha(overfit):
    fg = _by_kind(overfit, "iou", "foreground")
    assert min(fg) >= FG_IOU_MIN and np.mean(fg) >= FG_IOU_MEAN_MIN, fg
    assert min(_by_kind(overfit, "iou", "background")) >= 0.99


def test_overfit_rgb(overfit):
    gaps = np.array(overfit["psnr_vae"]) - np.array(overfit["psnr"])
    assert gaps.max() <= PSNR_BELOW_VAE_MAX, gaps
    assert gaps.mean() <= PSNR_MEAN_BELOW_VAE_MAX, gaps
    assert np.mean(overfit["psnr"]) >= PSNR_MEAN_MIN, overfit["psnr"]


def test_untrained_alpha_decoder_is_seen(overfit):
    """The mismatch found: the pipeline decodes alpha with the alpha decoder, which a transformer-only run (the old
    default phase, what the demo trained) leaves untrained; the same transformer then gives no foreground shape."""
    fg = _by_kind(overfit, "iou_untrained_alpha", "foreground")
    assert np.mean(fg) <= UNTRAINED_ALPHA_IOU_MAX, fg
