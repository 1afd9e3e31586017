"""Human alignment: how well HPA, each part and each pair of parts follow the models' ELO ratings.

The table has the paper's shape (rld-method.md, "Human alignment"): columns HPA, S_vis, S_gen, S_fid, vis+gen,
fid+gen, vis+fid; rows Pearson and Spearman. Parts are correlated in their NORMALISED form (LPIPS and FID flipped,
higher is better), so a metric that agrees with people correlates positively; a pair is the mean of its two
normalised parts, which is where the bounds matter (a single part's correlation does not depend on them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from reflade.eval.hpa import HPANormalization

COLUMNS = ("HPA", "S_vis", "S_gen", "S_fid", "vis+gen", "fid+gen", "vis+fid")
_PART_OF = {"vis": "s_vis", "gen": "s_gen", "fid": "s_fid"}


@dataclass(kw_only=True)
class AlignmentTable:
    """Correlations of each column with ELO over the same models."""

    kind: str
    """Layer kind the metrics were computed on."""
    models: list[str]
    """The models correlated, in input order."""
    pearson: dict[str, float]
    """Column -> Pearson correlation with ELO (NaN when a column or the ELO is constant)."""
    spearman: dict[str, float]
    """Column -> Spearman rank correlation with ELO (ties get average ranks)."""

    def to_dict(self) -> dict:
        """JSON-ready form (NaN written as None)."""

        def clean(d: dict[str, float]) -> dict[str, float | None]:
            return {k: None if math.isnan(v) else v for k, v in d.items()}

        return {
            "kind": self.kind,
            "models": list(self.models),
            "pearson": clean(self.pearson),
            "spearman": clean(self.spearman),
        }

    def markdown(self) -> str:
        """The table as Markdown, two decimals, like the paper's."""
        lines = ["| | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for name, row in (("Pearson", self.pearson), ("Spearman", self.spearman)):
            lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in COLUMNS) + " |")
        return "\n".join(lines)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays of equal length; NaN if either is constant."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    den = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / den if den > 0 else math.nan


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks); NaN if either is constant."""
    return pearson(rankdata(x), rankdata(y))


def column_values(
    normalization: HPANormalization, kind: str, metrics: Mapping[str, float]
) -> dict[str, float]:
    """The seven columns of one model: HPA, the three normalised parts and the three pair means.

    Args:
        metrics: raw metrics with keys ``fid``, ``lpips``, ``dir``.
    """
    missing = [k for k in ("fid", "lpips", "dir") if k not in metrics]
    if missing:
        raise ValueError(f"alignment: metrics lack {missing} (have: {sorted(metrics)})")
    p = normalization.parts(kind, fid=metrics["fid"], lpips=metrics["lpips"], dir=metrics["dir"])
    out = {"HPA": sum(p.values()) / 3.0, "S_vis": p["s_vis"], "S_gen": p["s_gen"], "S_fid": p["s_fid"]}
    for col in COLUMNS[4:]:
        a, b = col.split("+")
        out[col] = (p[_PART_OF[a]] + p[_PART_OF[b]]) / 2.0
    return out


def human_alignment(
    metrics: Mapping[str, Mapping[str, float]],
    elo: Mapping[str, float],
    *,
    kind: str,
    normalization: HPANormalization | None = None,
) -> AlignmentTable:
    """Pearson and Spearman of HPA, each part and each pair of parts with ELO, over models.

    Args:
        metrics: model name -> raw metrics ``{"fid": ..., "lpips": ..., "dir": ...}`` of one layer kind.
        elo: model name -> ELO rating; must cover every model in ``metrics`` (extra models are ignored).
        kind: ``foreground`` or ``background`` (picks the bounds).
        normalization: the HPA bounds (default: the paper-fitted ones).

    Raises:
        ValueError: fewer than 3 models, or models without an ELO rating (named).
    """
    normalization = normalization or HPANormalization()
    models = list(metrics)
    no_elo = [m for m in models if m not in elo]
    if no_elo:
        raise ValueError(f"alignment: no ELO rating for {no_elo} (rated: {sorted(elo)})")
    if len(models) < 3:
        raise ValueError(f"alignment: needs at least 3 models to correlate, got {len(models)}: {models}")
    cols = [column_values(normalization, kind, metrics[m]) for m in models]
    ratings = np.array([elo[m] for m in models], dtype=np.float64)
    pear, spear = {}, {}
    for c in COLUMNS:
        values = np.array([row[c] for row in cols], dtype=np.float64)
        pear[c] = pearson(values, ratings)
        spear[c] = spearman(values, ratings)
    return AlignmentTable(kind=kind, models=models, pearson=pear, spearman=spear)
