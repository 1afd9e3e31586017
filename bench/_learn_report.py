"""bench/learn.py's arithmetic and pictures: the targets against the baselines, the table and the plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

KINDS = ("foreground", "background")
IOU_MARGIN = 0.1
"""The model's foreground alpha IoU must be at least classical's minus this."""
COLUMNS = (
    ("foreground", "alpha_iou", "fg IoU", "{:.3f}"),
    ("foreground", "alpha_sad", "fg SAD", "{:.2f}"),
    ("foreground", "psnr_visible", "fg PSNRv", "{:.1f}"),
    ("foreground", "ssim_visible", "fg SSIMv", "{:.3f}"),
    ("foreground", "hidden_rgb_mae", "fg occl", "{:.1f}"),
    ("background", "psnr_visible", "bg PSNRv", "{:.1f}"),
    ("background", "ssim_visible", "bg SSIMv", "{:.3f}"),
    ("background", "hidden_rgb_mae", "bg removed", "{:.1f}"),
)
"""(kind, metric, heading, format) of the printed table; ``occl``/``removed``: the mean absolute error (0-255) of
the premultiplied colour inside the occluded part of a foreground / the removed region of a background."""
HEADER = f"{'step':>6} {'train s':>8} {'loss':>7} " + " ".join(f"{h:>10}" for _, _, h, _ in COLUMNS)
PLOTTED = (
    ("foreground", "alpha_iou", "foreground alpha IoU (higher is better)"),
    ("foreground", "hidden_rgb_mae", "foreground: error in the occluded part (0-255)"),
    ("background", "hidden_rgb_mae", "background: error in the removed region (0-255)"),
    ("foreground", "psnr_visible", "foreground PSNR in the visible region (dB)"),
    ("background", "psnr_visible", "background PSNR in the visible region (dB)"),
)


def _f(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, int | float) and math.isfinite(value) else "-"


def _cells(metrics: dict[str, Any]) -> str:
    return " ".join(f"{_f(metrics.get(k, {}).get(m), fmt):>10}" for k, m, _, fmt in COLUMNS)


def curve_line(point: dict[str, Any]) -> str:
    loss = _f(point.get("loss"), "{:.4f}")
    line = f"{point['step']:>6} {point['train_s']:>8.1f} {loss:>7} " + _cells(point["metrics"])
    if point.get("train_metrics"):
        line += "\n" + f"{'(on training scenes)':>23} " + _cells(point["train_metrics"])
    return line


def targets(metrics: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets for one set of model metrics: occluded/removed error below copy-visible's for both kinds,
    foreground alpha IoU at least classical's minus :data:`IOU_MARGIN`."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        model = metrics.get(kind, {}).get("hidden_rgb_mae", math.nan)
        copy = base["copy-visible"].get(kind, {}).get("hidden_rgb_mae", math.nan)
        out[f"{kind}_hidden_below_copy_visible"] = bool(model < copy)
    iou = metrics.get("foreground", {}).get("alpha_iou", math.nan)
    floor = base["classical"].get("foreground", {}).get("alpha_iou", math.nan) - IOU_MARGIN
    out["foreground_iou_floor"] = floor
    out["foreground_iou_within_0.1_of_classical"] = bool(iou >= floor)
    out["all"] = all(v for k, v in out.items() if isinstance(v, bool))
    return out


def summarize(result: dict[str, Any]) -> None:
    """Adds ``summary``: the targets at the last point and at every point, the first step meeting each."""
    curve, base = result.get("curve") or [], result.get("baselines") or {}
    if not curve or not base:
        return
    per_point = [targets(p["metrics"], base) for p in curve]
    for p, t in zip(curve, per_point, strict=True):
        p["targets"] = t
    names = [k for k, v in per_point[-1].items() if isinstance(v, bool)]
    first = {n: next((p["step"] for p, t in zip(curve, per_point, strict=True) if t[n]), None) for n in names}
    final = curve[-1]
    result["summary"] = {
        "final_step": final["step"],
        "final_train_s": final["train_s"],
        "final": per_point[-1],
        "first_step_met": first,
        "verdict": "all targets met at the last point" if per_point[-1]["all"] else "targets NOT all met",
    }


def table(result: dict[str, Any]) -> str:
    lines = [HEADER] + [curve_line(p) for p in result.get("curve", [])]
    for name, metrics in (result.get("baselines") or {}).items():
        lines.append(f"{name:>23} " + _cells(metrics))
    s = result.get("summary")
    if s:
        lines.append(
            f"targets at step {s['final_step']}: "
            + ", ".join(f"{k} {v}" for k, v in s["final"].items() if isinstance(v, bool))
        )
        lines.append(
            "first step meeting each: " + ", ".join(f"{k} {v}" for k, v in s["first_step_met"].items())
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Each plotted metric against steps (top row) and against training seconds (bottom row); the baselines as
    horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve, base = result.get("curve") or [], result.get("baselines") or {}
    fig, axes = plt.subplots(2, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 7), squeeze=False)
    for col, (kind, metric, title) in enumerate(PLOTTED):
        ys = [p["metrics"].get(kind, {}).get(metric, math.nan) for p in curve]
        for row, (xkey, xlabel) in enumerate((("step", "training steps"), ("train_s", "training seconds"))):
            ax = axes[row][col]
            ax.plot([p[xkey] for p in curve], ys, "o-", color="tab:blue", label="RefLayer tiny")
            for name, colour in (("copy-visible", "tab:red"), ("classical", "tab:green")):
                value = base.get(name, {}).get(kind, {}).get(metric)
                if value is not None and math.isfinite(value):
                    ax.axhline(value, color=colour, linestyle="--", label=name)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(title, fontsize=9)
    axes[0][0].legend(fontsize=8)
    p = result.get("params", {})
    fig.suptitle(
        f"bench/learn.py {result.get('tag') or ''}: {p.get('train_rows')} training rows, {p.get('items')} held-out "
        f"items ({p.get('eval_scenes')} scenes), threads {result.get('threads', {}).get('torch_threads')}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
