"""Benchmark: the tiny RefLayer's learning curve, scored on held-out synthetic scenes beside the baselines.

What it runs, all in one process with the product's own code:

1. Data: ``--train-scenes`` synthetic scenes (:func:`reflade.engine.synth.make_scenes`, ``--scene-size`` px, like the
   demo's engine step) become dataset rows (:func:`reflade.engine.pipeline.synthetic_rows`: a foreground and a
   background row per object); ``--eval-scenes`` fresh scenes (another seed, never trained on) become evaluation
   items, one per row and prompt type of ``--prompt-types`` (:func:`reflade.eval.scoring.expand_row`).
2. The tiny VAE: :func:`reflade.train.vae_training.train_vae` on the training rows' images and layers
   (``--vae-steps``, default the demo's), its PSNR measured on the held-out rows.
3. The model: ``build_reflayer("tiny")`` trained by :func:`reflade.train.plain_loop.train_plain` (the Ray loop's step
   function) on the rows as :func:`~reflade.train.preprocess.preprocess_row` decodes them, encoded once
   (:func:`~reflade.train.latents.encode_latents`, what ``--cache-latents`` does), with the demo's recipe
   (:data:`reflade.train.demo.DEMO_RECIPE`; ``--set KEY=VALUE`` overrides a field, ``--preset KEY=VALUE`` a tiny
   preset field, to try other recipes).
4. Every ``--eval-every`` steps (and before the first and after the last) the held-out items go through
   :meth:`RefLayerPipeline.decompose` (the decomposition API, ``--sample-steps`` Euler steps) and are scored with
   the evaluation package's weight-free metrics (:func:`reflade.eval.metrics.layer_metrics`, in the metric frame:
   the longest side resized to 256 px): alpha IoU and SAD, PSNR and SSIM in the visible region, and the error inside
   the occluded part of a foreground / the removed region of a background (``hidden_rgb_mae``). ``copy-visible``
   and ``classical`` are scored once on the same items.

Targets (issue "The model learns"): the model's ``hidden_rgb_mae`` below copy-visible's for both kinds, and its
foreground alpha IoU within 0.1 of classical's. Writes ``--out`` (JSON) and a plot beside it (``.png``: each metric
against steps and against training seconds, baselines as lines) and prints a table.

    .venv/bin/python bench/learn.py [--threads 2] [--train-scenes 24] [--eval-scenes 8] [--eval-every 250]
        [--set lr=1e-3 --set steps=3000] [--preset num_layers=4] [--smoke] [--out bench/results/cpu-2core/learn.json]
"""

from __future__ import annotations

import os
import sys

import _bench_machine as bm  # bench/ is this script's folder: first on sys.path

_THREADS = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), None)
if _THREADS is None and "--threads" in sys.argv[:-1]:
    _THREADS = sys.argv[sys.argv.index("--threads") + 1]
bm.set_thread_env(_THREADS or "2")  # before numpy, OpenCV or torch load
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import _learn_report as rp  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu-2core" / "learn.json"
TRAIN_SEED, EVAL_SEED = 100, 900_000
"""Base seeds of the training and the held-out scenes (:func:`make_scenes` derives one per scene)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from reflade.engine.demo import DEMO_SYNTHETIC
    from reflade.train.demo import DEMO_SAMPLE_STEPS, DEMO_VAE_STEPS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch and OpenMP threads (default 2)")
    ap.add_argument(
        "--train-scenes", type=int, default=DEMO_SYNTHETIC // 2, help="training scenes (the demo's)"
    )
    ap.add_argument("--eval-scenes", type=int, default=8, help="held-out scenes scored")
    ap.add_argument("--scene-size", type=int, default=256, help="side of the scenes, pixels (the demo's 256)")
    ap.add_argument("--prompt-types", default="box:fine,point:fine,mask:fine,text+box:fine")
    ap.add_argument("--eval-every", type=int, default=250, help="training steps between evaluations")
    ap.add_argument("--vae-steps", type=int, default=DEMO_VAE_STEPS)
    ap.add_argument(
        "--sample-steps", type=int, default=DEMO_SAMPLE_STEPS, help="Euler steps of each decomposition"
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    ap.add_argument(
        "--preset", action="append", default=[], metavar="KEY=VALUE", help="override a preset field"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights, noise and batches")
    ap.add_argument("--tag", default="", help="a name for this run in the JSON")
    ap.add_argument(
        "--train-eval-scenes",
        type=int,
        default=2,
        help="also score the items of this many TRAINING scenes (memorised or not: tells under- from overfitting)",
    )
    ap.add_argument("--save", type=Path, help="save the trained model folder here (RefLayerBundle.save)")
    ap.add_argument(
        "--vae-from",
        type=Path,
        help="a trained VAE folder (e.g. SAVED/vae of an earlier run with the same scenes) instead of training one",
    )
    ap.add_argument("--smoke", action="store_true", help="a seconds-long run of every part (tests)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.smoke:
        args.train_scenes, args.eval_scenes, args.scene_size = 2, 1, 64
        args.prompt_types, args.eval_every, args.vae_steps, args.sample_steps = "box:fine", 2, 2, 2
        args.set = ["steps=4", "batch_size=4", "warmup_steps=1", *args.set]
    return args


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def recipe(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(TrainSettings fields, preset overrides): the demo's recipe with ``--set`` / ``--preset`` applied."""
    from reflade.train.demo import DEMO_RECIPE

    settings = dict(DEMO_RECIPE)
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key.replace("-", "_")] = _parse_value(value)
    preset = {}
    for item in args.preset:
        key, _, value = item.partition("=")
        preset[key.replace("-", "_")] = _parse_value(value)
    return settings, preset


# ---------------------------------------------------------------------------------------------- data
def scene_rows(n: int, seed: int, size: int, split: str) -> list[dict[str, Any]]:
    from reflade.engine.config import EngineConfig
    from reflade.engine.pipeline import synthetic_rows
    from reflade.engine.synth import make_scenes

    rows: list[dict[str, Any]] = []
    for scene in make_scenes(n, seed=seed, size=(size, size)):
        rows += synthetic_rows(scene, f"synth-{scene.seed}", "bench-learn", split, EngineConfig())
    return rows


def _first_sources(rows: list[dict[str, Any]], n: int) -> set[str]:
    sources: list[str] = []
    for r in rows:
        if r["source_id"] not in sources:
            sources.append(r["source_id"])
    return set(sources[:n])


def eval_items(rows: list[dict[str, Any]], prompt_types: list[str]):
    from reflade.eval.scoring import expand_row, item_from_record

    return [
        item_from_record(rec, seed=i)
        for i, rec in enumerate(r for row in rows for r in expand_row(row, prompt_types))
    ]


def training_batches(bundle, rows: list[dict[str, Any]], batch_size: int, resolution: int, seed: int):
    """The rows as the trainer sees them (one prompt each, :func:`preprocess_row`), in a seeded order, in batches,
    encoded once by the frozen encoders (the latent cache's columns)."""
    from reflade.train.latents import encode_latents
    from reflade.train.preprocess import preprocess_row

    order = np.random.default_rng(seed).permutation(len(rows))
    samples = [preprocess_row(rows[i], resolution, seed) for i in order]
    batches = []
    for start in range(0, len(samples) - batch_size + 1, batch_size):
        part = samples[start : start + batch_size]
        batch = {k: np.stack([s[k] for s in part]) for k in ("image", "layer", "canvas")}
        batch.update(text=np.array([s["text"] for s in part]), kind=np.array([s["kind"] for s in part]))
        batches.append(encode_latents(bundle, batch))
    if not batches:
        raise SystemExit(f"{len(rows)} training rows make no batch of {batch_size}")
    return batches


# ---------------------------------------------------------------------------------------------- scoring
def score(items, layers: list) -> dict[str, dict[str, float]]:
    """Mean weight-free metrics per kind (and per kind and prompt type) of one predictor's layers."""
    from reflade.eval.metrics import layer_metrics, metric_frame, resize_layer, resize_mask

    per: dict[str, list[dict[str, float]]] = {}
    for it, pred in zip(items, layers, strict=True):
        if isinstance(pred, str):  # refused
            continue
        frame = metric_frame(*it.truth.shape[:2], 256)
        m = layer_metrics(
            resize_layer(pred, frame),
            resize_layer(it.truth, frame),
            resize_mask(it.visible, frame),
            kind=it.kind,
            exact_hidden=True,
        )
        for key in (it.kind, f"{it.kind}/{it.prompt_type}"):
            per.setdefault(key, []).append(m)
    out = {}
    for key, ms in per.items():
        out[key] = {name: _nanmean([m[name] for m in ms]) for name in ms[0]} | {"items": len(ms)}
    return out


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def baselines(items) -> dict[str, Any]:
    from reflade.engine.classical_decomposer import ClassicalDecomposer
    from reflade.eval.predictors import CopyVisible, DecomposerPredictor

    out = {}
    for predictor in (CopyVisible(), DecomposerPredictor(ClassicalDecomposer(), "classical")):
        t = time.perf_counter()
        out[predictor.name] = score(items, predictor.predict(items)) | {"seconds": time.perf_counter() - t}
    return out


# ---------------------------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from reflade.train.config import TrainSettings
    from reflade.train.model import build_reflayer, count_parameters
    from reflade.train.pipeline_reflayer import RefLayerPipeline
    from reflade.train.plain_loop import train_plain
    from reflade.train.vae import vae_training_tensors
    from reflade.train.vae_training import train_vae

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    fields, preset = recipe(args)
    settings = TrainSettings(**{**fields, "seed": args.seed, "report_every": 10**9})
    bt = bm.sibling("train")
    result: dict[str, Any] = {
        "benchmark": "learn",
        "tag": args.tag,
        "status": "running",
        "command": "python bench/learn.py " + " ".join(sys.argv[1:]),
        "machine": bt.machine_info(),
        "threads": bm.thread_report(),
        "params": {
            "train_scenes": args.train_scenes,
            "eval_scenes": args.eval_scenes,
            "scene_size": args.scene_size,
            "prompt_types": args.prompt_types.split(","),
            "eval_every": args.eval_every,
            "vae_steps": args.vae_steps,
            "sample_steps": args.sample_steps,
            "settings": settings.to_dict(),
            "preset_overrides": preset,
            "seeds": {"train_scenes": TRAIN_SEED, "eval_scenes": EVAL_SEED, "run": args.seed},
        },
    }
    t = time.perf_counter()
    train_rows = scene_rows(args.train_scenes, TRAIN_SEED, args.scene_size, "train")
    eval_rows = scene_rows(args.eval_scenes, EVAL_SEED, args.scene_size, "test")
    items = eval_items(eval_rows, result["params"]["prompt_types"])
    seen_rows = [
        r for r in train_rows if r["source_id"] in _first_sources(train_rows, args.train_eval_scenes)
    ]
    seen_items = eval_items(seen_rows, result["params"]["prompt_types"])
    result["params"].update(
        train_rows=len(train_rows), eval_rows=len(eval_rows), items=len(items), train_items=len(seen_items)
    )
    result["timings"] = {"data_s": time.perf_counter() - t}
    print(
        f"{len(train_rows)} training rows, {len(items)} held-out items ({bm.fmt_threads(result['threads'])})"
    )

    t = time.perf_counter()
    result["baselines"] = baselines(items)
    result["timings"]["baselines_s"] = time.perf_counter() - t

    from reflade.train.model import PRESETS

    resolution = int(settings.resolution or PRESETS["tiny"].resolution)
    t = time.perf_counter()
    holdout = vae_training_tensors(eval_rows, resolution)
    if args.vae_from:
        from diffusers import AutoencoderKL

        from reflade.train.vae_training import psnr

        vae = AutoencoderKL.from_pretrained(str(args.vae_from)).eval().requires_grad_(False)
        result["vae"] = {"from": str(args.vae_from), "psnr_holdout": psnr(vae, holdout)}
    else:
        vae, vm = train_vae(
            vae_training_tensors(train_rows, resolution),
            steps=args.vae_steps,
            holdout=holdout,
            seed=args.seed,
            progress=False,
            log=None,
        )
        result["vae"] = {k: vm[k] for k in ("psnr_holdout", "psnr_train", "steps", "wall_s")}
    result["timings"]["vae_s"] = time.perf_counter() - t
    made = args.vae_from or f"{args.vae_steps} steps"
    print(f"tiny VAE ({made}): held-out PSNR {result['vae']['psnr_holdout']:.2f} dB")

    bundle = build_reflayer("tiny", vae=vae, seed=args.seed, resolution=settings.resolution, **preset)
    result["params"]["parameters_trainable"] = count_parameters(bundle.model)
    t = time.perf_counter()
    batches = training_batches(bundle, train_rows, settings.batch_size, resolution, args.seed)
    result["timings"]["encode_s"] = time.perf_counter() - t
    pipe = RefLayerPipeline(bundle)
    curve: list[dict[str, Any]] = []

    def decompose(its):
        return pipe.decompose(
            [it.image for it in its],
            [it.prompt for it in its],
            [it.kind for it in its],
            steps=args.sample_steps,
            seeds=[it.seed for it in its],
        )

    def evaluate(step: int, train_s: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        point = {"step": step, "train_s": train_s, "metrics": score(items, decompose(items))}
        if seen_items:
            point["train_metrics"] = score(seen_items, decompose(seen_items))
        point["eval_s"] = time.perf_counter() - t0
        curve.append(point)
        print(rp.curve_line(point), flush=True)
        return point

    print(rp.HEADER)
    out = train_plain(bundle, batches, settings, evaluate=evaluate, evaluate_every=args.eval_every)
    losses = out["losses"]
    for prev, point in zip([None, *curve], curve, strict=False):
        lo = prev["step"] if prev else 0
        window = losses[lo : point["step"]]
        point["loss"] = float(np.mean(window)) if window else None
    result["curve"] = curve
    result["train"] = {
        k: out[k] for k in ("steps", "samples", "wall_s", "steps_per_s", "samples_per_s", "evaluate_s")
    }
    result["status"] = "ok"
    if args.save:
        bundle.save(args.save)
        result["saved"] = str(args.save)
    rp.summarize(result)
    return result


def main(argv: list[str] | None = None) -> int:
    bm.ensure_reflade("reflade.train.trainer")
    args = parse_args(argv)
    result = run(args)
    bt = bm.sibling("train")
    bt.write(result, args.out)
    png = rp.plot(result, args.out.with_suffix(".png"))
    print(rp.table(result))
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
