"""Aggregating scored rows into the report's tables: per model, layer kind and prompt type.

:class:`Accumulator` takes the per-(item, model) rows of :class:`reflade.eval.scoring.ScoreStage` batch by batch
(the driver streams them; features are folded into mergeable moments and never all held at once) and
:meth:`Accumulator.tables` gives, per group, the mean of every per-sample metric, FID from the accumulated
features, and HPA with its normalised parts. The group ``prompt_type = "all"`` pools every prompt type of a kind.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reflade.eval.fid import FeatureMoments, fid_from_moments
from reflade.eval.hpa import HPANormalization

__all__ = [
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "PER_SAMPLE",
    "Accumulator",
    "better",
    "compare_to_baselines",
]

WEIGHT_FREE = (
    "alpha_iou",
    "alpha_sad",
    "alpha_mse",
    "psnr_visible",
    "ssim_visible",
    "hidden_rgb_mae",
    "hidden_alpha_iou",
)
"""Metrics that need no network: meaningful whatever the feature networks are."""
PER_SAMPLE = (*WEIGHT_FREE, "s_vis", "s_gen")
"""Per-sample metrics, averaged per group (NaN samples left out)."""
HIGHER_IS_BETTER = {"alpha_iou", "psnr_visible", "ssim_visible", "hidden_alpha_iou", "s_gen", "hpa"}
LOWER_IS_BETTER = {"alpha_sad", "alpha_mse", "hidden_rgb_mae", "s_vis", "s_fid"}


def better(metric: str, a: float, b: float) -> bool | None:
    """Whether value ``a`` of ``metric`` is strictly better than ``b`` (None when either is NaN or unknown)."""
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return None
    if metric in HIGHER_IS_BETTER:
        return a > b
    if metric in LOWER_IS_BETTER:
        return a < b
    return None


def _nanmean(values: list[float]) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


@dataclass
class _Group:
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    n: int = 0
    refused: int = 0
    pred: FeatureMoments | None = None
    truth: FeatureMoments | None = None

    def add(self, row: dict[str, Any]) -> None:
        self.n += 1
        if row.get("refused"):
            self.refused += 1
            return
        for m in PER_SAMPLE:
            v = row.get(m)
            self.values[m].append(float("nan") if v is None else float(v))
        fp, fg = row.get("feat_pred"), row.get("feat_gt")
        if fp is not None and fg is not None:
            fp, fg = np.asarray(fp, np.float64)[None], np.asarray(fg, np.float64)[None]
            if self.pred is None:
                self.pred, self.truth = FeatureMoments.empty(fp.shape[1]), FeatureMoments.empty(fg.shape[1])
            self.pred.update(fp)
            self.truth.update(fg)


class Accumulator:
    """Per-(model, kind, prompt type) running statistics of scored rows.

    Args:
        normalization: the HPA bounds applied to each group's FID, LPIPS (``s_vis``) and DIR (``s_gen``).
    """

    def __init__(self, normalization: HPANormalization):
        self.normalization = normalization
        self.groups: dict[tuple[str, str, str], _Group] = defaultdict(_Group)
        self.samples: list[dict[str, Any]] = []
        """Every row's per-sample metrics (no features, no pixels): the report's distributions and rankings."""

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        """Fold scored rows in (dicts with the :class:`~reflade.eval.scoring.ScoreStage` columns)."""
        for row in rows:
            for ptype in (row["prompt_type"], "all"):
                self.groups[(row["model"], row["kind"], ptype)].add(row)
            self.samples.append(
                {
                    k: row.get(k)
                    for k in ("item_id", "sample_id", "prompt_type", "kind", "model", "refused", *PER_SAMPLE)
                }
            )

    def tables(self) -> list[dict[str, Any]]:
        """One dict per group: ``model``, ``kind``, ``prompt_type``, ``n``, ``refused``, the per-sample means,
        ``fid`` (NaN under 2 samples), ``lpips`` / ``dir`` (the paper's names for S_vis / S_gen means), the
        normalised parts ``s_fid_norm`` ``s_vis_norm`` ``s_gen_norm`` and ``hpa``."""
        out = []
        for (model, kind, ptype), g in sorted(self.groups.items()):
            row: dict[str, Any] = {"model": model, "kind": kind, "prompt_type": ptype, "n": g.n}
            row["refused"] = g.refused
            for m in PER_SAMPLE:
                row[m] = _nanmean(g.values.get(m, []))
            fid = float("nan")
            if g.pred is not None and g.pred.n >= 2:
                fid = fid_from_moments(g.truth, g.pred)
            row["s_fid"] = fid
            row["fid_samples"] = 0 if g.pred is None else g.pred.n
            row["fid"], row["lpips"], row["dir"] = fid, row["s_vis"], row["s_gen"]
            parts = self.normalization.parts(kind, fid=fid, lpips=row["s_vis"], dir=row["s_gen"])
            row.update({f"{k}_norm": v for k, v in parts.items()})
            row["hpa"] = self.normalization.score(kind, fid=fid, lpips=row["s_vis"], dir=row["s_gen"])
            out.append(row)
        return out


def compare_to_baselines(
    tables: list[dict[str, Any]], subject: str, baselines: Iterable[str], metrics: Iterable[str]
) -> list[dict[str, Any]]:
    """Per kind (all prompt types pooled) and metric: the subject's value, each baseline's and whether the subject
    is better (``beats``: True / False / None when a value is missing)."""
    index = {(t["model"], t["kind"], t["prompt_type"]): t for t in tables}
    out = []
    for kind in ("foreground", "background"):
        mine = index.get((subject, kind, "all"))
        if mine is None:
            continue
        for metric in metrics:
            entry: dict[str, Any] = {
                "kind": kind,
                "metric": metric,
                "value": mine.get(metric),
                "baselines": {},
            }
            for b in baselines:
                theirs = index.get((b, kind, "all"))
                if theirs is None or b == subject:
                    continue
                entry["baselines"][b] = {
                    "value": theirs.get(metric),
                    "beats": better(metric, mine.get(metric), theirs.get(metric)),
                }
            out.append(entry)
    return out
