"""The evaluation report: ``report.json`` (every number) and ``report.html`` (tables, figures, a sample grid).

The folder is what the registry stores as an ``eval-report`` version::

    report.json  report.html  figures/*.png  samples/*.png

Figures are drawn with matplotlib (Agg, no display); the HTML is one static page with relative links only (no
script, no external resource), so it opens from the registry's files, a local copy, or an artifact store.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reflade.eval.config import BASELINES
from reflade.eval.fid import fid_caveat
from reflade.eval.summary import PER_SAMPLE, WEIGHT_FREE, compare_to_baselines

__all__ = ["STAND_IN_TITLE", "write_report"]

STAND_IN_TITLE = "stand-in feature networks: not comparable with published HPA"
"""Said in the title of every report whose LPIPS, CLIP or Inception network is randomly initialised."""
REPORT_SCHEMA = 1
TABLE_METRICS = ("hpa", "fid", "lpips", "dir", *WEIGHT_FREE)
COMPARED = (*WEIGHT_FREE, "s_vis", "s_gen", "s_fid", "hpa")
RANKED_BY = ("hidden_rgb_mae", "s_vis")
"""The grid's order: the error inside the hidden region where the truth is exact, else LPIPS on the visible part."""


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        return _clean(x.item())
    return x


def _ranking(samples: list[dict[str, Any]], subject: str, kind: str) -> tuple[str, list[dict[str, Any]]]:
    mine = [s for s in samples if s["model"] == subject and s["kind"] == kind and not s.get("refused")]
    for metric in RANKED_BY:
        vals = [s for s in mine if s.get(metric) is not None and not math.isnan(s[metric])]
        if vals:
            return metric, sorted(vals, key=lambda s: s[metric])  # lower is better for both
    return "", []


def write_report(
    folder: Path,
    *,
    subject: str,
    models: Sequence[str],
    setup: dict[str, Any],
    tables: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    pictures: Callable[[list[str]], dict[str, dict[str, Any]]],
    report_samples: int = 4,
) -> dict[str, Any]:
    """Write the report's files into ``folder`` (created) and return the JSON content.

    Args:
        subject: what was evaluated (an exact model reference or a baseline's name).
        models: every model scored, the subject first.
        setup: the run's setup (dataset, prompt types, networks, ``stand_in``, sizes, normalisation).
        tables: :meth:`reflade.eval.summary.Accumulator.tables`.
        samples: per-sample metric rows (:attr:`Accumulator.samples`).
        pictures: item ids -> {item id: {"row": dataset row, "preds": {model: PNG bytes}}} for the grid.
        report_samples: best and worst items shown per kind.
    """
    folder = Path(folder)
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    title = f"RefLade evaluation: {subject} on {setup['dataset']}"
    if setup.get("stand_in"):
        title += f" ({STAND_IN_TITLE})"
    pooled = [t for t in tables if t["prompt_type"] == "all"]
    headline: dict[str, Any] = {}
    for t in pooled:
        if t["model"] == subject:
            for m in ("hpa", "fid", "lpips", "dir", "hidden_rgb_mae", "alpha_iou"):
                headline[f"{m}_{t['kind']}"] = t[m]
    caveats = {
        t["kind"]: fid_caveat(t["fid_samples"])
        for kind in ("foreground", "background")
        for t in pooled
        if t["model"] == subject and t["kind"] == kind
    }
    grid = _grid(folder, samples, subject, models, pictures, report_samples)
    figures = _figures(folder, tables, samples, models)
    report = {
        "schema": REPORT_SCHEMA,
        "title": title,
        "subject": subject,
        "models": list(models),
        "setup": setup,
        "headline": headline,
        "tables": tables,
        "comparisons": compare_to_baselines(tables, subject, BASELINES, COMPARED),
        "fid_caveat": caveats,
        "grid": grid,
        "figures": figures,
        "refused": {m: sum(1 for s in samples if s["model"] == m and s.get("refused")) for m in models},
    }
    report = _clean(report)
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    (folder / "report.html").write_text(_html(report))
    report["headline"] = {k: v for k, v in report["headline"].items() if v is not None}
    return report


# ---------------------------------------------------------------------------------------------- figures
def _figures(folder: Path, tables, samples, models) -> list[dict[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for kind in ("foreground", "background"):
        rows = [t for t in tables if t["kind"] == kind and t["prompt_type"] != "all"]
        if not rows:
            continue
        ptypes = sorted({t["prompt_type"] for t in rows})
        for metric, label in (
            ("hpa", "HPA (higher is better)"),
            ("hidden_rgb_mae", "hidden-region RGB error"),
        ):
            fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(ptypes) + 2), 3.4))
            width = 0.8 / max(1, len(models))
            for i, m in enumerate(models):
                by = {t["prompt_type"]: t.get(metric) for t in rows if t["model"] == m}
                vals = [np.nan if by.get(p) is None else by[p] for p in ptypes]
                ax.bar(np.arange(len(ptypes)) + i * width, vals, width, label=m)
            ax.set_xticks(
                np.arange(len(ptypes)) + width * (len(models) - 1) / 2, ptypes, rotation=30, ha="right"
            )
            ax.set_ylabel(label)
            ax.set_title(f"{kind}: {metric} per prompt type", fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            name = f"figures/{kind}-{metric}-by-prompt.png"
            fig.savefig(folder / name, dpi=90)
            plt.close(fig)
            out.append({"kind": kind, "what": f"{metric} per prompt type", "path": name})
        for metric in ("alpha_iou", "hidden_rgb_mae", "s_vis"):
            fig, ax = plt.subplots(figsize=(4.5, 3.0))
            drawn = False
            for m in models:
                vals = [
                    s[metric]
                    for s in samples
                    if s["model"] == m and s["kind"] == kind and s.get(metric) is not None
                ]
                vals = [v for v in vals if not math.isnan(v)]
                if vals:
                    ax.hist(vals, bins=20, alpha=0.5, label=m)
                    drawn = True
            if not drawn:
                plt.close(fig)
                continue
            ax.set_title(f"{kind}: {metric} per sample")
            ax.legend(fontsize=7)
            fig.tight_layout()
            name = f"figures/{kind}-{metric}-distribution.png"
            fig.savefig(folder / name, dpi=90)
            plt.close(fig)
            out.append({"kind": kind, "what": f"{metric} distribution", "path": name})
    return out


def _grid(folder: Path, samples, subject, models, pictures, n: int) -> list[dict[str, Any]]:
    from reflade.engine.browse import draw_prompts, over_checkerboard
    from reflade.engine.schema import decode_image, encode_png
    from reflade.eval.metrics import metric_frame, resize_image, resize_layer
    from reflade.eval.scoring import prompt_type_of

    chosen: list[tuple[str, str, dict[str, Any], str]] = []
    for kind in ("foreground", "background"):
        metric, ranked = _ranking(samples, subject, kind)
        if not ranked or n == 0:
            continue
        best, worst = ranked[:n], ranked[-n:][::-1]
        seen = set()
        for label, group in (("best", best), ("worst", worst)):
            for s in group:
                if (label, s["item_id"]) not in seen:
                    seen.add((label, s["item_id"]))
                    chosen.append((kind, label, s, metric))
    if not chosen:
        return []
    pics = pictures(sorted({c[2]["item_id"] for c in chosen}))
    out = []
    for k, (kind, label, s, metric) in enumerate(chosen):
        pic = pics.get(s["item_id"]) or {}
        row = pic.get("row")
        if row is None:
            continue
        image = decode_image(row["image"], "RGB")
        frame = metric_frame(*image.shape[:2], int(max(1, max(_frame_of(pic, image)))))
        ptype = s["prompt_type"]
        prompt = next((dict(p) for p in row["prompts"] if prompt_type_of(p) == ptype), None)
        drawn = draw_prompts(image, [prompt] if prompt else [])
        cells = {"image + prompt": resize_image(drawn, frame)}
        for m in models:
            png = pic["preds"].get(m)
            cells[m] = (
                over_checkerboard(decode_image(png, "RGBA"))
                if png is not None
                else np.zeros((*frame, 3), np.uint8)
            )
        cells["ground truth"] = over_checkerboard(resize_layer(decode_image(row["layer"], "RGBA"), frame))
        files = {}
        for j, (name, arr) in enumerate(cells.items()):
            rel = f"samples/{k:03d}-{j}.png"
            (folder / rel).write_bytes(encode_png(np.ascontiguousarray(arr)))
            files[name] = rel
        out.append(
            {
                "kind": kind,
                "which": label,
                "item_id": s["item_id"],
                "ranked_by": metric,
                "value": s.get(metric),
                "cells": files,
            }
        )
    return out


def _frame_of(pic: dict[str, Any], image: np.ndarray) -> tuple[int, int]:
    """The metric frame the predictions were stored at (their PNG size), else the image's."""
    from reflade.engine.schema import decode_image

    for png in pic.get("preds", {}).values():
        if png is not None:
            return decode_image(png, "RGBA").shape[:2]
    return image.shape[:2]


# ---------------------------------------------------------------------------------------------- HTML
def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _html(r: dict[str, Any]) -> str:
    e = html.escape
    s = r["setup"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(r['title'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#eee}"
        ".scroll{overflow-x:auto}td:first-child,th:first-child{text-align:left}.warn{color:#a40;font-weight:bold}"
        ".yes{color:#070}.no{color:#a00}img{image-rendering:pixelated}</style></head><body>",
        f"<h1>{e(r['title'])}</h1>",
    ]
    if s.get("stand_in"):
        parts.append(
            f"<p class='warn'>{e(STAND_IN_TITLE)}: the LPIPS, CLIP or Inception network is randomly "
            "initialised; only the weight-free metrics mean anything.</p>"
        )
    parts.append("<h2>Setup</h2><table>")
    for k in ("dataset", "prompt_types", "metric_size", "fid_background", "steps", "guidance", "seed"):
        parts.append(f"<tr><td>{e(k)}</td><td>{e(json.dumps(s.get(k)))}</td></tr>")
    for k, v in s["networks"].items():
        parts.append(f"<tr><td>network {e(k)}</td><td>{e(v)}</td></tr>")
    bounds = {
        k: ({b: round(x, 6) for b, x in v.items()} if isinstance(v, dict) else v)
        for k, v in s["normalization"].items()
    }
    parts.append(f"<tr><td>HPA bounds</td><td>{e(json.dumps(bounds))}</td></tr></table>")
    for kind, text in r["fid_caveat"].items():
        parts.append(f"<p><b>FID ({e(kind)}):</b> {e(text)}</p>")
    parts.append("<h2>Beside the baselines</h2><table><tr><th>kind</th><th>metric</th><th>model</th>")
    bnames = [b for b in BASELINES if b != r["subject"]]
    parts.extend(f"<th>{e(b)}</th><th>beats {e(b)}?</th>" for b in bnames)
    parts.append("</tr>")
    for c in r["comparisons"]:
        cells = [f"<td>{e(c['kind'])}</td><td>{e(c['metric'])}</td><td>{_fmt(c['value'])}</td>"]
        for b in bnames:
            bb = c["baselines"].get(b) or {}
            beats = bb.get("beats")
            mark = (
                "–"
                if beats is None
                else ("<span class='yes'>yes</span>" if beats else "<span class='no'>no</span>")
            )
            cells.append(f"<td>{_fmt(bb.get('value'))}</td><td>{mark}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table><h2>Tables</h2>")
    for kind in ("foreground", "background"):
        rows = [t for t in r["tables"] if t["kind"] == kind]
        if not rows:
            continue
        parts.append(
            f"<h3>{e(kind)}</h3><div class='scroll'><table><tr><th>model</th><th>prompt type</th><th>n</th>"
            "<th>refused</th>"
        )
        parts.extend(f"<th>{e(m)}</th>" for m in TABLE_METRICS)
        parts.append("</tr>")
        for t in rows:
            parts.append(
                f"<tr><td>{e(t['model'])}</td><td>{e(t['prompt_type'])}</td><td>{t['n']}</td><td>{t['refused']}</td>"
                + "".join(f"<td>{_fmt(t.get(m))}</td>" for m in TABLE_METRICS)
                + "</tr>"
            )
        parts.append("</table></div>")
    parts.append("<h2>Figures</h2>")
    for f in r["figures"]:
        parts.append(
            f"<figure><img src='{e(f['path'])}' alt='{e(f['what'])}'><figcaption>{e(f['kind'])}: "
            f"{e(f['what'])}</figcaption></figure>"
        )
    if r["grid"]:
        parts.append("<h2>Best and worst samples</h2>")
        names = list(r["grid"][0]["cells"])
        parts.append("<table><tr><th>sample</th>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
        for g in r["grid"]:
            label = f"{g['kind']} {g['which']}<br>{e(g['item_id'])}<br>{e(g['ranked_by'])} {_fmt(g['value'])}"
            cells = "".join(
                f"<td><img src='{e(g['cells'][n])}' width='128' alt='{e(n)}'></td>"
                for n in names
                if n in g["cells"]
            )
            parts.append(f"<tr><td>{label}</td>{cells}</tr>")
        parts.append("</table>")
    parts.append(
        f"<p>Per-sample metrics: {', '.join(PER_SAMPLE)}. Refused items: {e(json.dumps(r['refused']))}.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)
