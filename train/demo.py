"""RefLayer's step of the main job: the tiny VAE and the tiny model trained on the demo dataset as Ray jobs,
registered, and one sample decomposed from the registered model (``model/reflayer@candidate``) to an RGBA PNG.

The model is small and trained for a few minutes on a CPU: the output shows the whole path (dataset -> Ray Train
-> registry -> a fresh load by alias -> a layer on disk), not a useful decomposition.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DEMO_VAE_STEPS = 300
"""Optimiser steps of the tiny VAE in the demo (about 20 dB held-out PSNR; ~2 minutes on 2 cores)."""
DEMO_RECIPE: dict[str, Any] = {
    "steps": 2000,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_steps": 50,
    "lr_schedule": "cosine",
    "timestep_sampling": "uniform",
    "phase": "both",
    "alpha_samples": 2,
    "ema_decay": 0.0,
    "drop_text": 0.1,
    "drop_canvas": 0.1,
}
"""The tiny RefLayer's training recipe in the demo: :class:`~reflade.train.config.TrainSettings` fields, passed to
``reflade train`` as flags (``bench/learn.py`` trains the same; docs/training.md, "Choosing the recipe", says why)."""
DEMO_CACHE_LATENTS = True
"""Encode the train split once before training (``--cache-latents``): the frozen encoders cost more per step than
the tiny transformer."""
DEMO_STEPS = DEMO_RECIPE["steps"]
"""Optimiser steps of the tiny RefLayer in the demo."""
DEMO_THREADS = 2
"""Torch threads of the demo's training jobs (a 2-core machine)."""
DEMO_SAMPLE_STEPS = 20
"""Euler steps of the demo decomposition."""


def recipe_flags(recipe: dict[str, Any]) -> list[str]:
    """:class:`~reflade.train.config.TrainSettings` fields -> ``reflade train`` flags (``lr_schedule`` ->
    ``--lr-schedule 3e-3``)."""
    out: list[str] = []
    for key, value in recipe.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def run_demo_job(jobs, kind: str, args: list[str], console, timeout: float = 1800) -> str:
    """Submit a job of ``kind`` with ``args``, stream its logs, and return its id once it SUCCEEDED.

    Raises:
        RuntimeError: the job ended otherwise (the message names the command to read its logs).
    """
    job_id = jobs.submit(kind, args)
    console.print(f"submitted {kind} job {job_id}: {' '.join(args)}")
    for chunk in jobs.follow(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    final = jobs.wait(job_id, timeout=timeout)
    if final != "SUCCEEDED":
        raise RuntimeError(f"{kind} job {job_id} ended {final}; see `reflade jobs logs {job_id}`")
    return job_id


def train_step(cfg, registry, timer, made, console) -> None:
    """The main job's training step (entry point ``reflade.demo`` ``20-train``)."""
    from reflade.platform.jobs import Jobs

    dataset = made.get("dataset")
    if not dataset:
        raise RuntimeError("the training step needs the engine step's dataset (made['dataset'])")
    jobs = Jobs(cfg)
    with timer.step("tiny VAE (Ray job: reflade train vae)"):
        # Ray starts job drivers with one torch thread; the demo's head has the machine to itself.
        args = ["--dataset", dataset, "--steps", str(DEMO_VAE_STEPS), "--threads", str(DEMO_THREADS)]
        run_demo_job(jobs, "train-vae", args, console)
        vae = registry.resolve("weights/tiny-vae@latest")
        made["vae"] = vae.ref
        console.print(f"{vae.ref}: held-out PSNR {vae.metrics.get('psnr_holdout', float('nan')):.2f} dB")
    with timer.step("RefLayer tiny (Ray job: reflade train, Ray Train)"):
        args = ["--dataset", dataset, "--checkpoint-every", str(DEMO_STEPS // 4), "--vae", vae.ref]
        args += recipe_flags(DEMO_RECIPE) + (["--cache-latents"] if DEMO_CACHE_LATENTS else [])
        args += ["--threads", str(DEMO_THREADS)]
        run_demo_job(jobs, "train", args, console)
        model = registry.resolve("model/reflayer@candidate")
        made["model"] = model.ref
        console.print(f"{model.ref} (candidate): loss {model.metrics.get('loss')}, parents {model.parents}")
    with timer.step("decompose a sample with model/reflayer@candidate"):
        out = decompose_sample(registry, made["dataset"], Path(made.get("output") or "demo-output"))
        made["decomposed"] = str(out["layer_png"])
        console.print(
            f"{out['model']}: {out['sample_id']} ({out['kind']}, {out['prompt']}) -> {out['layer_png']} "
            f"(alpha mean {out['alpha_mean']:.3f}; ground-truth alpha mean {out['truth_alpha_mean']:.3f})"
        )


def decompose_sample(
    registry, dataset_ref: str, output: Path, *, model_ref: str = "model/reflayer@candidate"
):
    """Decompose the first test-split sample of ``dataset_ref`` with a registered model (its box prompt when it
    has one, and the row's layer kind) through :meth:`RefLayerPipeline.decompose`; write its image, the prompt
    drawn over it, the predicted layer (RGBA PNG and over a checkerboard) and the ground truth."""

    from reflade.engine.browse import draw_prompts, over_checkerboard
    from reflade.engine.schema import decode_image, encode_png, load_rows
    from reflade.train.pipeline_reflayer import RefLayerPipeline

    rows = load_rows(registry, dataset_ref, "test") or load_rows(registry, dataset_ref)
    if not rows:
        raise RuntimeError(f"{dataset_ref} has no rows to decompose")
    row = sorted(rows, key=lambda r: r["sample_id"])[0]
    image = decode_image(row["image"], "RGB")
    truth = decode_image(row["layer"], "RGBA")
    prompts = [dict(p) for p in row["prompts"]]
    prompt = next((p for p in prompts if p.get("box") is not None), prompts[0])
    prompt = {
        k: prompt.get(k) for k in ("type", "granularity", "points", "box", "mask", "text") if k in prompt
    }
    if prompt.get("points") is None:
        prompt.pop("points", None)

    pipe = RefLayerPipeline.from_registry(model_ref, registry)
    kind = row["kind"]
    rgba = pipe.decompose([image], [prompt], [kind], steps=DEMO_SAMPLE_STEPS, seeds=0)[0]

    folder = output / "decomposed"
    folder.mkdir(parents=True, exist_ok=True)
    sid = row["sample_id"]
    paths = {
        "image": folder / f"{sid}-image.png",
        "prompt": folder / f"{sid}-prompt.png",
        "layer_png": folder / f"{sid}-layer.png",
        "layer_checker": folder / f"{sid}-layer-on-checkerboard.png",
        "truth": folder / f"{sid}-truth-on-checkerboard.png",
    }
    paths["image"].write_bytes(encode_png(image))
    paths["prompt"].write_bytes(encode_png(draw_prompts(image, [prompt])))
    paths["layer_png"].write_bytes(encode_png(rgba))
    paths["layer_checker"].write_bytes(encode_png(over_checkerboard(rgba)))
    paths["truth"].write_bytes(encode_png(over_checkerboard(truth)))
    info = {
        "model": pipe.bundle.config["ref"],
        "dataset": dataset_ref,
        "sample_id": sid,
        "kind": kind,
        "prompt": {k: v for k, v in prompt.items() if k != "mask"}
        | ({"mask": "PNG"} if "mask" in prompt else {}),
        "alpha_mean": float(rgba[..., 3].mean() / 255.0),
        "truth_alpha_mean": float(truth[..., 3].mean() / 255.0),
        "shape": list(rgba.shape),
        **{k: str(v) for k, v in paths.items()},
    }
    (folder / f"{sid}.json").write_text(json.dumps(info, indent=1, default=str))
    info["layer_png"] = paths["layer_png"]
    info["prompt"] = prompt.get("text") or prompt.get("type")
    return info
