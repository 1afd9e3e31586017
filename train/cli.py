"""``reflade train ...``: thin commands over the training library functions."""

from __future__ import annotations

import sys
from typing import Annotated

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
            help="Dataset reference whose train split is streamed, e.g. dataset/reflade-demo.",
        ),
    ] = None,
    preset: Annotated[
        str, typer.Option(help="Model preset: tiny (64 px, CPU minutes) or sd3-medium.")
    ] = "tiny",
    workers: Annotated[
        int, typer.Option(help="Ray Train workers (DDP ranks: gloo on CPU, NCCL on GPU).")
    ] = 1,
    gpu: Annotated[
        bool, typer.Option("--gpu", help="One GPU per worker (and per latent-encoder actor).")
    ] = False,
    steps: Annotated[
        int, typer.Option(help="Optimiser steps in all (a resumed run counts the earlier ones).")
    ] = 100,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run named by --run from its last checkpoint.")
    ] = False,
    run: Annotated[
        str | None,
        typer.Option("--run", help="Run name under runs/train/ in the bucket (default: a new one)."),
    ] = None,
    phase: Annotated[
        str, typer.Option(help="transformer (flow matching), alpha (alpha decoder) or both.")
    ] = "transformer",
    batch_size: Annotated[int, typer.Option(help="Samples per micro-batch per worker.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimiser step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (after the warmup).")] = 1e-4,
    warmup_steps: Annotated[int, typer.Option(help="Linear learning-rate warmup steps.")] = 10,
    optimizer: Annotated[str, typer.Option(help="adamw (fused on CUDA) or sgd.")] = "adamw",
    ema_decay: Annotated[
        float, typer.Option(help="EMA of the weights (0: off); the EMA weights are registered.")
    ] = 0.0,
    bf16: Annotated[
        bool | None, typer.Option("--bf16/--no-bf16", help="bf16 autocast (default: on GPU, off on CPU).")
    ] = None,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Recompute activations in the backward pass.")
    ] = False,
    drop_text: Annotated[
        float, typer.Option(help="Probability of dropping a sample's text (guidance).")
    ] = 0.1,
    drop_canvas: Annotated[
        float, typer.Option(help="Probability of dropping a sample's canvas (guidance).")
    ] = 0.1,
    resolution: Annotated[
        int | None, typer.Option(help="Training side in pixels (default: the preset's).")
    ] = None,
    checkpoint_every: Annotated[
        int, typer.Option(help="Checkpoint every this many steps (and at the end).")
    ] = 50,
    cache_latents: Annotated[
        bool,
        typer.Option(
            "--cache-latents",
            help="Encode the train split once (VAE latents, text embeddings) in a first Ray Data pass; "
            "training reads the cache instead of running the frozen encoders every step.",
        ),
    ] = False,
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
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs each worker reserves.")] = 0.5,
    threads: Annotated[int | None, typer.Option(help="Torch threads per worker (default: torch's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the weights, noise, dropout and prompt choice.")] = 0,
) -> None:
    """Train RefLayer with Ray Train and register it as model/reflayer (alias candidate).

    Streams the dataset's train split from the object store, checkpoints to runs/train/<run>/ in the bucket
    (uploaded asynchronously), and registers the final weights with lineage to the dataset, the VAE or base
    weights and the text encoder. Sub-command `vae` trains the tiny configuration's VAE first.
    """
    if ctx.invoked_subcommand is not None:
        return
    if not dataset:
        raise typer.BadParameter(
            "--dataset is required (e.g. --dataset dataset/reflade-demo)", param_hint="--dataset"
        )
    # Imported here: `reflade` loads every command group at start, and torch + Ray take seconds.
    from reflade.train.trainer import TrainSettings, run_training

    try:
        settings = TrainSettings(
            preset=preset,
            phase=phase,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=warmup_steps,
            optimizer=optimizer,
            grad_accum=grad_accum,
            ema_decay=ema_decay,
            bf16=bf16,
            gradient_checkpointing=gradient_checkpointing,
            drop_text=drop_text,
            drop_canvas=drop_canvas,
            resolution=resolution,
            workers=workers,
            use_gpu=gpu,
            cpus_per_worker=cpus_per_worker,
            checkpoint_every=checkpoint_every,
            seed=seed,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    cfg = get_config()
    from reflade.platform.cluster import connect

    connect(cfg)
    version = run_training(
        cfg,
        dataset,
        settings,
        vae_ref=vae,
        weights_ref=weights,
        resume=resume,
        run_name=run,
        cache_latents=cache_latents,
        torch_threads=threads,
        log=console.print,
    )
    m = version.metrics
    console.print(
        f"{version.ref} (alias candidate): loss {m.get('loss')}, {m.get('steps')} steps, "
        f"{m.get('samples_per_s') or 0:.1f} samples/s; run {version.run_name}; parents {', '.join(version.parents)}"
    )


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
    from reflade.train.vae import run_vae_phase

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
