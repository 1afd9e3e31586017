"""The evaluation step of the main job: the candidate model, ``copy-visible`` and ``classical`` scored on the demo
dataset's test split as a Ray job (``reflade jobs submit eval -- run ...``), the report registered and copied to
the demo's output folder, and the weight-free completion errors printed beside both baselines.

The demo registers the stand-in feature networks (random init, no download), so its HPA, LPIPS, DIR and FID are
labelled "stand-in feature networks: not comparable with published HPA"; the weight-free metrics (alpha IoU, the
error inside the hidden region) are meaningful as they are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

DEMO_EVAL_SAMPLES = 32
"""Test rows scored by the demo (the first by sample id): about a minute on 2 cores."""
DEMO_METRIC_SIZE = 64
"""The demo's metric frame (its scenes are 256 px; the tiny model works at 64 px)."""
SHOWN = ("hidden_rgb_mae", "hidden_alpha_iou", "alpha_iou", "psnr_visible", "hpa")


def eval_step(cfg, registry, timer, made, console) -> None:
    """The main job's evaluation step (entry point ``reflade.demo`` ``30-eval``)."""
    from reflade.eval.network_convert import register_stand_ins
    from reflade.platform.jobs import Jobs
    from reflade.train.demo import DEMO_SAMPLE_STEPS, DEMO_THREADS, run_demo_job

    model, dataset = made.get("model"), made.get("dataset")
    if not model or not dataset:
        raise RuntimeError(
            "the evaluation step needs the training step's model and the engine step's dataset"
        )
    with timer.step("stand-in feature networks (weights/tiny-alexnet, tiny-clip, tiny-inception)"):
        for name, ref in register_stand_ins(registry).items():
            console.print(f"{name}: {ref} (random init)")
    with timer.step(f"evaluate {model} beside copy-visible and classical (Ray job: reflade eval run)"):
        args = [
            "run",
            "--model",
            model,
            "--dataset",
            f"{dataset}:test",
            "--stand-in",
            "--max-samples",
            str(DEMO_EVAL_SAMPLES),
            "--metric-size",
            str(DEMO_METRIC_SIZE),
            "--steps",
            str(DEMO_SAMPLE_STEPS),
            "--threads",
            str(DEMO_THREADS // 2 or 1),
        ]
        run_demo_job(Jobs(cfg), "eval", args, console)
        report = _latest_report(registry, model)
        folder = Path(made.get("output") or "demo-output") / "eval-report"
        registry.download(report.ref, folder, progress=False)
        made["eval_report"] = report.ref
        data = json.loads((folder / "report.json").read_text())
        console.print(data["title"])
        for c in data["comparisons"]:
            if c["metric"] not in SHOWN:
                continue
            others = ", ".join(
                f"{b} {_fmt(v['value'])}{'' if v['beats'] is None else (' (beaten)' if v['beats'] else ' (not beaten)')}"
                for b, v in c["baselines"].items()
            )
            console.print(f"  {c['kind']:<10} {c['metric']:<16} model {_fmt(c['value'])}  |  {others}")
        strips = sample_strips(folder, folder.parent / "decompositions")
        console.print(
            f"{len(strips)} pictures (image + prompt | each model's layer over a checkerboard | ground truth): "
            f"{folder.parent / 'decompositions'}"
        )
        console.print(f"report {report.ref}: {folder / 'report.html'}")


def sample_strips(report_folder: Path, out: Path) -> list[Path]:
    """One picture per sample of a report's grid (its best and worst items of each kind): the report's cells side
    by side (image with the prompt drawn, each model's layer over a checkerboard, the ground truth), each under its
    name; written to ``out`` as ``KIND-WHICH-ITEM.png``.

    Raises:
        FileNotFoundError: the folder holds no ``report.json``.
    """
    import re

    import numpy as np
    from PIL import Image, ImageDraw

    from reflade.engine.schema import decode_image, encode_png

    data = json.loads((report_folder / "report.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, entry in enumerate(data.get("grid", [])):
        cells = [
            (name, decode_image((report_folder / rel).read_bytes(), "RGB"))
            for name, rel in entry["cells"].items()
        ]
        h = max(a.shape[0] for _, a in cells)
        scale = max(1, 128 // h)  # small metric frames are enlarged (nearest) so a person can see them
        pad, label = 4, 14
        tiles = []
        for name, arr in cells:
            img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
            tile = Image.new("RGB", (img.width + pad, h * scale + label), "white")
            tile.paste(img, (0, label))
            ImageDraw.Draw(tile).text((1, 1), name[: max(4, img.width // 6)], fill=(0, 0, 0))
            tiles.append(np.asarray(tile))
        strip = np.concatenate(tiles, axis=1)
        item = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(entry["item_id"]))[:80]
        path = out / f"{k:02d}-{entry['kind']}-{entry['which']}-{item}.png"
        path.write_bytes(encode_png(strip))
        written.append(path)
    return written


def _latest_report(registry, model: str):
    children = sorted(
        (c for c in registry.children(model) if c.startswith("eval-report/")),
        key=lambda c: int(c.rsplit("@", 1)[1]),
    )
    if not children:
        raise RuntimeError(f"the eval job registered no report of {model}")
    return registry.resolve(children[-1])


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"
