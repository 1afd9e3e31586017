"""``reflade train ...``: thin commands over the training library functions."""

from __future__ import annotations

import dataclasses
import sys
from typing import Annotated, Any

import typer

from reflade.platform.cli import console, get_config, run_typer

app = typer.Typer(
    help="Train RefLayer: `reflade train vae` (the tiny VAE phase), then `reflade train --dataset REF` (the model).",
    no_args_is_help=True,
)


@app.callback(invoke_without_command=True)
def train(
    ctx: typer.Context,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            "-d",
            help="Dataset reference whose train split is streamed, e.g. dataset/reflade-demo "
            "(default: train.dataset).",
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="Model preset: tiny (64 px, CPU minutes) or sd3-medium (default: tiny)."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Ray Train workers, DDP ranks: gloo on CPU, NCCL on GPU (default: 1).")
    ] = None,
    gpu: Annotated[
        bool | None,
        typer.Option("--gpu/--no-gpu", help="One GPU per worker and per latent-encoder actor (default: no)."),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="Optimiser steps in all; a resumed run counts the earlier ones (default: 100)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run named by --run from its last checkpoint.")
    ] = False,
    run: Annotated[
        str | None,
        typer.Option("--run", help="Run name under runs/train/ in the bucket (default: a new one)."),
    ] = None,
    phase: Annotated[
        str | None,
        typer.Option(
            help="transformer (flow matching), alpha (alpha decoder) or both (default: both; the pipeline needs "
            "a trained alpha decoder)."
        ),
    ] = None,
    alpha_samples: Annotated[
        int | None,
        typer.Option(
            help="Samples of each micro-batch the alpha decoder's loss reads, drawn at random; 0: all (default: 0)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Samples per micro-batch per worker (default: 4).")
    ] = None,
    grad_accum: Annotated[
        int | None, typer.Option(help="Micro-batches per optimiser step (default: 1).")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Peak learning rate after the warmup (default: 1e-4).")
    ] = None,
    warmup_steps: Annotated[
        int | None, typer.Option(help="Linear learning-rate warmup steps (default: 10).")
    ] = None,
    lr_schedule: Annotated[
        str | None,
        typer.Option(
            help="After the warmup: constant, or cosine down to a tenth of --lr (default: constant)."
        ),
    ] = None,
    timestep_sampling: Annotated[
        str | None,
        typer.Option(
            help="Noise levels of the flow-matching loss: logit-normal or uniform (default: logit-normal)."
        ),
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="adamw (fused on CUDA) or sgd (default: adamw).")
    ] = None,
    ema_decay: Annotated[
        float | None,
        typer.Option(help="EMA of the weights, 0: off; the EMA weights are registered (default: 0)."),
    ] = None,
    bf16: Annotated[
        bool | None, typer.Option("--bf16/--no-bf16", help="bf16 autocast (default: on GPU, off on CPU).")
    ] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help="Recompute activations in the backward pass (default: no).",
        ),
    ] = None,
    drop_text: Annotated[
        float | None,
        typer.Option(help="Probability of dropping a sample's text, for guidance (default: 0.1)."),
    ] = None,
    drop_canvas: Annotated[
        float | None,
        typer.Option(help="Probability of dropping a sample's canvas, for guidance (default: 0.1)."),
    ] = None,
    resolution: Annotated[
        int | None, typer.Option(help="Training side in pixels (default: the preset's).")
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Checkpoint every this many steps, and at the end (default: 50).")
    ] = None,
    cache_latents: Annotated[
        bool | None,
        typer.Option(
            "--cache-latents/--no-cache-latents",
            help="Encode the train split once (VAE latents, text embeddings) in a first Ray Data pass; "
            "training reads the cache instead of running the frozen encoders every step (default: no).",
        ),
    ] = None,
    vae: Annotated[
        str | None,
        typer.Option(help="tiny: the VAE (default weights/tiny-vae@latest, from `reflade train vae`)."),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="sd3-medium: the SD3 checkpoint in the registry (default weights/sd3-medium@latest)."
        ),
    ] = None,
    cpus_per_worker: Annotated[
        float | None, typer.Option(help="CPUs each worker reserves (default: 0.5).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="Torch threads per worker (default: torch's).")] = None,
    replay_mib: Annotated[
        float | None,
        typer.Option(
            help="Replay each worker's first epoch from memory when its batches fit in this many MiB, instead of "
            "re-reading the data every epoch; 0: re-read (default: 1024)."
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the weights, noise, dropout and prompt choice (default: 0).")
    ] = None,
) -> None:
    """Train RefLayer with Ray Train and register it as model/reflayer (alias candidate).

    Streams the dataset's train split from the object store, checkpoints to runs/train/<run>/ in the bucket
    (uploaded asynchronously), and registers the final weights with lineage to the dataset, the VAE or base
    weights and the text encoder. Sub-command `vae` trains the tiny configuration's VAE first.

    Every option but --resume and --run overrides the configuration's `train` section (YAML file, then
    REFLADE_TRAIN_* variables); the defaults shown are the section's own.
    """
    if ctx.invoked_subcommand is not None:
        return
    cfg = get_config()
    flags = {
        "dataset": dataset,
        "preset": preset,
        "workers": workers,
        "use_gpu": gpu,
        "steps": steps,
        "phase": phase,
        "alpha_samples": alpha_samples,
        "lr_schedule": lr_schedule,
        "timestep_sampling": timestep_sampling,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "optimizer": optimizer,
        "ema_decay": ema_decay,
        "bf16": bf16,
        "gradient_checkpointing": gradient_checkpointing,
        "drop_text": drop_text,
        "drop_canvas": drop_canvas,
        "resolution": resolution,
        "checkpoint_every": checkpoint_every,
        "cache_latents": cache_latents,
        "vae": vae,
        "weights": weights,
        "cpus_per_worker": cpus_per_worker,
        "torch_threads": threads,
        "replay_mib": replay_mib,
        "seed": seed,
    }
    try:
        tc = train_config(cfg, {k: v for k, v in flags.items() if v is not None})
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if not tc.dataset:
        raise typer.BadParameter(
            "--dataset is required (e.g. --dataset dataset/reflade-demo, or train.dataset in the configuration)",
            param_hint="--dataset",
        )
    # Imported here: `reflade` loads every command group at start, and torch + Ray take seconds.
    from reflade.platform.cluster import connect
    from reflade.train.trainer import run_training

    connect(cfg)
    version = run_training(
        cfg,
        tc.dataset,
        tc.settings(),
        vae_ref=tc.vae,
        weights_ref=tc.weights,
        resume=resume,
        run_name=run,
        cache_latents=tc.cache_latents,
        cache_workers=tc.cache_workers,
        torch_threads=tc.torch_threads,
        log=console.print,
    )
    m = version.metrics
    console.print(
        f"{version.ref} (alias candidate): loss {m.get('loss')}, {m.get('steps')} steps, "
        f"{m.get('samples_per_s') or 0:.1f} samples/s; run {version.run_name}; parents {', '.join(version.parents)}"
    )


def train_config(cfg, overrides: dict[str, Any] | None = None):
    """The effective ``train`` section: the configuration's (defaults < YAML < ``REFLADE_TRAIN_*``) with
    ``overrides`` (the command line's flags, by field name) on top.

    Raises:
        ConfigError: an override out of range or an unknown field (named, with the known ones).
    """
    from reflade.platform.config import ConfigError
    from reflade.train.config import TrainConfig

    base = cfg.section("train") if "train" in cfg.sections else TrainConfig()
    overrides = dict(overrides or {})
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"unknown train settings {unknown} (known: {', '.join(known)})")
    return dataclasses.replace(base, **overrides)


@app.command("vae")
def vae(
    dataset: Annotated[
        str, typer.Option("--dataset", "-d", help="Dataset reference, e.g. dataset/reflade-demo.")
    ],
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps (default 1500: reflade.train.vae.DEFAULT_STEPS).")
    ] = None,
    size: Annotated[int, typer.Option(help="Side the images are resized to, pixels (a multiple of 4).")] = 64,
    batch_size: Annotated[int | None, typer.Option(help="Images per step (default 8).")] = None,
    lr: Annotated[
        float | None, typer.Option(help="Peak learning rate, AdamW, warmup then cosine decay (default 2e-3).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights, batches and noise.")] = 0,
    device: Annotated[str, typer.Option(help="Torch device: cpu or cuda.")] = "cpu",
    threads: Annotated[
        int | None, typer.Option(help="Torch CPU threads (default: torch's; Ray jobs start with 1).")
    ] = None,
) -> None:
    """Train the tiny configuration's VAE on a dataset's images and layers; register it as weights/tiny-vae."""
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter("--threads must be at least 1", param_hint="--threads")
        import torch

        torch.set_num_threads(threads)
    # Imported here: `reflade` loads every command group at start, and torch + diffusers take seconds.
    from reflade.train.vae_training import run_vae_phase

    # Options left out take the library's defaults (reflade.train.vae.DEFAULT_*), kept in one place.
    given = {k: v for k, v in {"steps": steps, "batch_size": batch_size, "lr": lr}.items() if v is not None}
    version = run_vae_phase(
        get_config(), dataset, size=size, seed=seed, device=device, log=console.print, **given
    )
    m = version.metrics
    console.print(
        f"{version.ref} ({'reused' if version.reused else 'new'}): held-out PSNR {m['psnr_holdout']:.2f} dB "
        f"(untrained {m['psnr_holdout_init']:.2f} dB), loss {m['loss']:.4f}, parents {', '.join(version.parents)}"
    )


def job_train(argv: list[str]) -> int:
    """Job kind for model training: ``reflade jobs submit train -- --dataset REF [--steps N] [--workers N]``."""
    return run_typer(app, list(argv), "reflade train")


def job_vae(argv: list[str]) -> int:
    """Job kind for the VAE phase: ``reflade jobs submit train-vae -- --dataset REF [--steps N]``."""
    return run_typer(app, ["vae", *argv], "reflade train")


if __name__ == "__main__":
    sys.exit(job_vae(sys.argv[1:]))
