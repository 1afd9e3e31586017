"""``reflade train ...``: thin commands over the training library functions."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from reflade.platform.cli import console, get_config, run_typer

app = typer.Typer(help="Train RefLayer: the tiny VAE phase, then the model.", no_args_is_help=True)


@app.callback()
def _train_group() -> None:
    """Train RefLayer: the tiny VAE phase, then the model."""
    # A callback keeps `train` a group of sub-commands, also when run as a job (`run_typer`).


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
) -> None:
    """Train the tiny configuration's VAE on a dataset's images and layers; register it as weights/tiny-vae."""
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


def job_vae(argv: list[str]) -> int:
    """Job kind for the VAE phase: ``reflade jobs submit train-vae -- --dataset REF [--steps N]``."""
    return run_typer(app, ["vae", *argv], "reflade train")


if __name__ == "__main__":
    sys.exit(job_vae(sys.argv[1:]))
