"""``reflade engine ...`` and ``reflade data ...``: thin commands over the engine's library functions."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from reflade.platform.cli import console, get_config

engine_app = typer.Typer(
    help="The data engine: raw photos -> six stages on Ray Data -> a dataset version.", no_args_is_help=True
)
data_app = typer.Typer(
    help="Datasets for people: export, import a curated folder, statistics.", no_args_is_help=True
)


@engine_app.callback()
def _engine_group() -> None:
    """The data engine: raw photos -> six stages on Ray Data -> a dataset version."""
    # A callback keeps `engine` a group with a `run` sub-command, also when run as a job (`run_typer`).


@engine_app.command("run")
def run(
    input: Annotated[
        str, typer.Option("--input", "-i", help="Folder, s3:// prefix, manifest file or registry ref.")
    ],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name to register (dataset/NAME).")],
    backends: Annotated[
        str, typer.Option(help="Backend family: classical (CPU, no weights) or neural.")
    ] = "classical",
    limit: Annotated[int | None, typer.Option(help="At most this many inputs.")] = None,
    synthetic: Annotated[
        int, typer.Option(help="Also add this many synthetic scenes (exact ground truth).")
    ] = 0,
    synthetic_size: Annotated[int, typer.Option(help="Side of the synthetic scenes, pixels.")] = 256,
    synthetic_split: Annotated[
        str | None,
        typer.Option(
            help="Split of the synthetic rows: train, test, quality, or hash (whole scenes by id, "
            "engine.synthetic_test_fraction to test). Default: the configuration's (test)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run's figures as JSON.")] = False,
) -> None:
    """Stream raw images through the six stages and register the dataset version (resumable, exactly-once)."""
    from reflade.engine.pipeline import run_engine, stage_table

    cfg = get_config()
    result = run_engine(
        cfg,
        input,
        dataset,
        backends=backends,
        limit=limit,
        synthetic=synthetic,
        synthetic_size=synthetic_size,
        synthetic_split=synthetic_split,
        log=console.print,
    )
    if as_json:
        print(json.dumps(result.as_dict(), indent=1, default=str))
        return
    console.print(stage_table(result))
    console.print(
        f"images in {result.images_in} = kept {result.images_kept} + quarantined {result.images_quarantined}; "
        f"layers out {result.layers_out} = kept {result.layers_kept} + rejected {result.layers_rejected}"
    )
    if result.quarantine_reasons:
        top = sorted(result.quarantine_reasons.items(), key=lambda kv: -kv[1])[:10]
        console.print("quarantine reasons: " + ", ".join(f"{k} {v}" for k, v in top))
    console.print(f"{result.dataset} ({'reused' if result.reused else 'new'}) in {result.wall_s:.1f} s")


@engine_app.command("tiny-weights")
def tiny_weights() -> None:
    """Build the tiny random-init SAM, OWLv2, RePaint, BLIP-captioner and SD3-inpainting models and register them
    (weights/tiny-*), so that `--backends neural` runs without external checkpoints (tests, CPU demos; not for
    quality)."""
    from reflade.engine.backends.tiny_weights import ALL_TINY_NAMES, register_tiny_weights

    for name, ref in register_tiny_weights(_registry(), ALL_TINY_NAMES).items():
        console.print(f"{name}: {ref}")


@engine_app.command("random-weights")
def random_weights(
    out: Annotated[Path, typer.Option("--out", help="Folder to write them into (complete ones are kept).")],
    size: Annotated[str, typer.Option(help="real (about 9 GB) or tiny.")] = "real",
    device: Annotated[str, typer.Option(help="Where the models are built (cuda: much faster).")] = "cpu",
) -> None:
    """Write random-init checkpoints of the neural models into a local folder, without a registry: `real` (SAM
    ViT-H, OWLv2-base/16, a BLIP-base captioner, SD3-medium inpainting) or `tiny`. For throughput checks on a
    machine without an object store (engine.weights_dir; bench/gpu_engine.py), not for quality."""
    from reflade.engine.backends.random_weights import build_random_weights, engine_weights

    try:
        folders = build_random_weights(out, size, device=device)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--size") from None
    for name, folder in folders.items():
        console.print(f"{name}: {folder}")
    settings = {"weights_dir": str(out), **engine_weights(size)}
    console.print("engine: " + json.dumps(settings))


def job_main(argv: list[str]) -> int:
    """Job kind ``engine``: ``reflade jobs submit engine -- run --input ... --dataset ...``."""
    from reflade.platform.cli import run_typer

    return run_typer(engine_app, argv, "reflade engine")


def _registry():
    from reflade.platform.registry import Registry

    return Registry.from_config(get_config())


@data_app.command("export")
def export(
    ref: Annotated[str, typer.Argument(help="dataset/NAME[@VERSION][:SPLIT]")],
    dest: Annotated[Path, typer.Argument(help="Folder to write the browsable samples into.")],
    limit: Annotated[int | None, typer.Option(help="At most this many rows.")] = None,
) -> None:
    """Write a dataset version as folders a person can browse (image, layer on a checkerboard, prompts, JSON)."""
    from reflade.engine.browse import export_rows
    from reflade.engine.schema import load_rows

    rows = load_rows(_registry(), ref)
    rows = rows[:limit] if limit is not None else rows
    n = export_rows(rows, dest)
    console.print(f"exported {n} samples of {ref} to {dest}")


@data_app.command("import")
def import_(
    src: Annotated[Path, typer.Argument(help="A folder written by `reflade data export` (curated by hand).")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name to register.")],
    split: Annotated[
        str, typer.Option(help="Split given to every row ('keep': each sample's own).")
    ] = "quality",
    parent: Annotated[
        list[str] | None, typer.Option("--parent", help="Lineage: the dataset it was curated from.")
    ] = None,
) -> None:
    """Read a browsable folder back, validate every sample, and register it as a dataset version."""
    from reflade.engine.browse import import_folder
    from reflade.engine.schema import write_shard

    rows = import_folder(src, None if split == "keep" else split)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "shards").mkdir()
        write_shard(rows, str(Path(tmp) / "shards" / "imported.parquet"))
        v = _registry().create(
            "dataset",
            dataset,
            tmp,
            parents=parent or [],
            metadata={"imported_from": str(src.resolve()), "rows": len(rows)},
        )
    console.print(f"{'reused' if v.reused else 'registered'} {v.ref}: {len(rows)} rows, split {split}")


@data_app.command("stats")
def stats_(
    ref: Annotated[str, typer.Argument(help="dataset/NAME[@VERSION][:SPLIT]")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Counts by split, kind, category and prompt type."""
    from rich.table import Table

    from reflade.engine.browse import stats
    from reflade.engine.schema import load_rows

    s = stats(load_rows(_registry(), ref))
    if as_json:
        print(json.dumps(s, indent=1))
        return
    console.print(f"{ref}: {s['rows']} rows from {s['sources']} source images")
    for title, key in (
        ("split", "by_split"),
        ("kind", "by_kind"),
        ("category", "by_category"),
        ("prompt type", "by_prompt_type"),
    ):
        table = Table(title, "rows")
        for k, v in s[key].items():
            table.add_row(str(k), str(v))
        console.print(table)


if __name__ == "__main__":
    sys.exit(job_main(sys.argv[1:]))
