"""``reflade eval ...``: thin commands over the evaluation library (the job, the gate, ELO, the weights)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from reflade.platform.cli import JsonOpt, console, get_config, run_typer

app = typer.Typer(
    help="Score models with HPA, its parts and weight-free metrics beside the copy-visible and classical "
    "baselines; gate and promote; ELO from human votes.",
    no_args_is_help=True,
)


def _registry():
    from reflade.platform.registry import Registry

    return Registry.from_config(get_config())


def eval_settings(cfg, overrides: dict[str, Any]):
    """The effective ``eval`` section: the configuration's with the command's flags (by field name) on top."""
    from reflade.eval.config import EvalConfig

    base = cfg.section("eval") if "eval" in cfg.sections else EvalConfig()
    settings = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    settings.validate()
    return settings


@app.command("run")
def run(
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="Model reference (model/reflayer@candidate), classical or copy-visible."
        ),
    ],
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset", "-d", help="Dataset reference[:split] (default: eval.dataset, split test)."
        ),
    ] = None,
    prompt_types: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated TYPE:GRANULARITY, a bare type (both), or 'all' (default: text+box:fine)."
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="Gate against this model (e.g. model/reflayer@production); exit 1 if worse by a margin."
        ),
    ] = None,
    promote: Annotated[
        bool,
        typer.Option("--promote", help="Move production to the model if the gate passes (compare-and-swap)."),
    ] = False,
    allow_first: Annotated[
        bool, typer.Option("--allow-first", help="With --promote and no production yet: promote anyway.")
    ] = False,
    stand_in: Annotated[
        bool,
        typer.Option(
            "--stand-in", help="Use the random-init feature networks (weights/tiny-*): tests and demos only."
        ),
    ] = False,
    metric_size: Annotated[
        int | None, typer.Option(help="Longest side of the metric frame, px (default 256).")
    ] = None,
    max_samples: Annotated[
        int | None, typer.Option(help="Score at most this many rows (default: all).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Sampling steps of the model (default 20).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every decomposition (default 0).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Items per batch (default 8).")] = None,
    predict_actors: Annotated[int | None, typer.Option(help="Actors that decompose (default 1).")] = None,
    score_actors: Annotated[
        int | None, typer.Option(help="Actors that compute the metrics (default 1).")
    ] = None,
    gpu: Annotated[
        bool, typer.Option("--gpu", help="One GPU per actor (models and feature networks).")
    ] = False,
    threads: Annotated[int | None, typer.Option(help="Torch threads per actor (default: Ray's).")] = None,
    bf16: Annotated[
        bool | None,
        typer.Option(
            "--bf16/--no-bf16", help="bf16 autocast of the feature networks (default: on with --gpu)."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the report's files into this folder.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Score MODEL and both baselines on a dataset split (Ray Data actor pools), write the JSON + HTML report and
    register it as an eval-report version (parents: the exact model, dataset and feature networks)."""
    from reflade.eval.config import STAND_IN_NETWORKS, parse_prompt_types
    from reflade.eval.job import EvalRequest, run_eval

    cfg = get_config()
    overrides: dict[str, Any] = {
        "dataset": dataset,
        "metric_size": metric_size,
        "max_samples": max_samples,
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "predict_actors": predict_actors,
        "score_actors": score_actors,
        "threads": threads,
        "num_gpus": 1.0 if gpu else None,
        "bf16": bf16,
    }
    if prompt_types is not None:
        try:
            overrides["prompt_types"] = list(parse_prompt_types(prompt_types))
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--prompt-types") from None
    if stand_in:
        overrides.update({f"{k}_net": v for k, v in STAND_IN_NETWORKS.items()})
    settings = eval_settings(cfg, overrides)
    request = EvalRequest(
        model=model,
        settings=settings,
        baseline=baseline,
        promote=promote,
        allow_first=allow_first,
        output=output,
    )
    outcome = run_eval(cfg, request, log=console.print)
    r = outcome.report
    if as_json:
        print(
            json.dumps(
                {
                    "report": outcome.version.ref,
                    "headline": r["headline"],
                    "gate": outcome.gate and outcome.gate.to_dict(),
                    "promoted": outcome.promoted,
                },
                indent=1,
            )
        )
        return
    console.print(r["title"])
    for c in r["comparisons"]:
        beats = ", ".join(
            f"{b} {v['value'] if v['value'] is None else round(v['value'], 4)} ({'beats' if v['beats'] else 'not better' if v['beats'] is False else 'n/a'})"
            for b, v in c["baselines"].items()
        )
        value = c["value"] if c["value"] is None else round(c["value"], 4)
        console.print(f"  {c['kind']:<10} {c['metric']:<16} {value}  vs {beats}")
    where = f"; files in {outcome.folder}" if outcome.folder else ""
    console.print(f"report {outcome.version.ref} (report.html, report.json){where}")
    if outcome.promoted:
        console.print(f"production -> {outcome.promoted}")


@app.command("history")
def history(
    model: Annotated[
        str, typer.Argument(help="Model name (model/reflayer) or one version (model/reflayer@3).")
    ],
    as_json: JsonOpt = False,
) -> None:
    """The eval reports of a model's versions, found through lineage (reports are children of the model)."""
    from reflade.eval.history import reports_of

    rows = reports_of(_registry(), model)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    if not rows:
        console.print(f"no eval reports of {model} yet (`reflade eval run --model {model}`)")
        return
    for r in rows:
        h = r["headline"]
        hpa = " ".join(
            f"HPA {k} {h.get(f'hpa_{k}'):.4f}"
            for k in ("foreground", "background")
            if h.get(f"hpa_{k}") is not None
        )
        flag = " [stand-in networks]" if r["stand_in"] else ""
        console.print(f"{r['model']:<28} {r['report']:<30} {r['dataset']:<32} {hpa}{flag}  {r['created']}")


@app.command("compare")
def compare(
    candidate: Annotated[str, typer.Argument(help="eval-report reference of the candidate.")],
    baseline: Annotated[str, typer.Argument(help="eval-report reference of the baseline.")],
) -> None:
    """Gate one registered report against another (refuses different setups, and stand-in vs real networks)."""
    from reflade.eval import gate

    reg = _registry()
    a = json.loads(reg.read_bytes(candidate, "report.json"))
    b = json.loads(reg.read_bytes(baseline, "report.json"))
    settings = eval_settings(get_config(), {})
    result = gate.check(a, b, settings.gate_margins, baseline=b["subject"])
    console.print(result.summary())
    if not result.passed:
        raise typer.Exit(1)


@app.command("photos")
def photos(
    model: Annotated[
        list[str],
        typer.Option("--model", "-m", help="Model reference (repeatable); classical is always added."),
    ] = ["model/reflayer@candidate"],  # noqa: B006 (typer reads the default, nobody mutates it)
    model_dir: Annotated[
        Path | None,
        typer.Option(help="A saved model folder (RefLayerBundle.save) instead of registry references."),
    ] = None,
    out: Annotated[Path, typer.Option(help="The picture to write (PNG).")] = Path(
        "docs/images/real-photos.png"
    ),
    steps: Annotated[int, typer.Option(help="Sampling steps of each decomposition.")] = 20,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
) -> None:
    """Decompose scikit-image's bundled photos (astronaut, coffee, chelsea), a box and a point prompt each, with
    the model(s) and classical, and write one picture of the layers."""
    from reflade.engine.classical_decomposer import ClassicalDecomposer
    from reflade.engine.schema import encode_png
    from reflade.eval.photos import decompose_photos, photo_sheet
    from reflade.train.pipeline_reflayer import RefLayerPipeline

    decomposers: dict[str, Any] = {}
    if model_dir is not None:
        from reflade.train.bundle import RefLayerBundle

        decomposers[model_dir.name] = RefLayerPipeline(RefLayerBundle.load(model_dir))
    else:
        reg = _registry()
        for ref in model:
            pipe = RefLayerPipeline.from_registry(ref, reg)
            decomposers[pipe.name] = pipe
    decomposers["classical"] = ClassicalDecomposer()
    items, layers = decompose_photos(decomposers, steps=steps, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode_png(photo_sheet(items, layers)))
    console.print(f"{len(items)} prompts x {len(decomposers)} decomposers ({', '.join(decomposers)}): {out}")


@app.command("stand-in-weights")
def stand_in_weights() -> None:
    """Build and register the random-init stand-in feature networks (weights/tiny-alexnet, tiny-clip,
    tiny-inception) for tests and CPU demos; every report made with them says so in its title."""
    from reflade.eval.network_convert import register_stand_ins

    for name, ref in register_stand_ins(_registry()).items():
        console.print(f"{name}: {ref}")


@app.command("convert-weights")
def convert_weights(
    network: Annotated[str, typer.Argument(help="alexnet, inception or clip.")],
    src: Annotated[
        Path, typer.Argument(help="The published checkpoint (.pth file; for clip, the model folder).")
    ],
    out: Annotated[Path, typer.Argument(help="Folder to write (safetensors + reflade-net.json).")],
) -> None:
    """Convert a published checkpoint into the folder `reflade registry import` takes (see the README for each
    network's source and licence). Checkpoints load with torch.load(weights_only=True), never as pickles."""
    from reflade.eval import network_convert as networks

    converters = {
        "alexnet": networks.convert_alexnet,
        "inception": networks.convert_inception,
        "clip": networks.convert_clip,
    }
    if network not in converters:
        raise typer.BadParameter(
            f"unknown network {network!r} (known: {', '.join(converters)})", param_hint="NETWORK"
        )
    converters[network](src, out)
    console.print(
        f"wrote {out}; next: reflade registry import weights/<name> {out} --license ... --source ..."
    )


@app.command("elo")
def elo(
    votes: Annotated[str, typer.Argument(help="JSONL file, folder of .jsonl files, or votes/NAME[@V].")],
    reports: Annotated[
        str | None,
        typer.Option(help="Comma-separated eval-report references: correlate their metrics with the ELO."),
    ] = None,
    kind: Annotated[
        str, typer.Option(help="Layer kind of the correlation: foreground or background.")
    ] = "background",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of the confidence intervals.")] = 200,
    fit: Annotated[
        bool,
        typer.Option("--fit-bounds", help="Fit the HPA ranges to agree with the ELO; print before/after."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """ELO ratings (Bradley-Terry, bootstrap intervals) from pairwise votes; with --reports, the paper's
    human-alignment table (Pearson and Spearman of HPA, each part and each pair with ELO)."""
    from reflade.eval.elo import elo_with_ci, read_votes
    from reflade.eval.history import alignment_inputs

    reg = _registry() if votes.startswith("votes/") or reports else None
    ratings = elo_with_ci(read_votes(votes, reg), n_bootstrap=bootstrap)
    out: dict[str, Any] = {"elo": {m: r.to_dict() for m, r in ratings.items()}}
    if reports:
        from reflade.eval.alignment import human_alignment
        from reflade.eval.bounds_fit import fit_bounds

        metrics, normalization = alignment_inputs(
            reg, [r.strip() for r in reports.split(",") if r.strip()], kind
        )
        elo_points = {m: ratings[m].rating for m in metrics if m in ratings}
        missing = sorted(set(metrics) - set(elo_points))
        if missing:
            console.print(f"no votes for {', '.join(missing)}: left out of the correlation")
        metrics = {m: v for m, v in metrics.items() if m in elo_points}
        table = human_alignment(metrics, elo_points, kind=kind, normalization=normalization)
        out["alignment"] = table.to_dict()
        if fit:
            result = fit_bounds(metrics, elo_points, kind, normalization)
            out["fit"] = result.to_dict()
    if as_json:
        print(json.dumps(out, indent=1))
        return
    for m, r in sorted(ratings.items(), key=lambda kv: -kv[1].rating):
        console.print(f"{m:<32} ELO {r.rating:7.1f}  [{r.low:7.1f}, {r.high:7.1f}]  {r.n_votes} votes")
    if "alignment" in out:
        console.print(table.markdown())
    if "fit" in out:
        console.print(result.summary())


def job_main(argv: list[str]) -> int:
    """Job kind ``eval``: ``reflade jobs submit eval -- run --model REF [...]``."""
    return run_typer(app, list(argv), "reflade eval")


if __name__ == "__main__":
    sys.exit(job_main(sys.argv[1:]))
