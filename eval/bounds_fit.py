"""Fitting the HPA normalisation bounds to human judgement: the ranges that make HPA agree best with ELO ratings.

``reflade eval elo VOTES --reports ... --fit-bounds`` calls :func:`fit_bounds`; the ratings come from
:mod:`reflade.eval.elo`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import minimize

from reflade.eval.alignment import AlignmentTable, human_alignment, pearson, spearman
from reflade.eval.elo import EloError
from reflade.eval.hpa import HPABounds, HPANormalization

__all__ = ["BoundsFit", "fit_bounds"]

_IDEAL = {"fid_min": 0.0, "lpips_min": 0.0, "dir_max": 1.0}


def _ranges(b: HPABounds) -> np.ndarray:
    """(FID, LPIPS, DIR) ranges of one kind's bounds."""
    return np.array([b.fid_max - b.fid_min, b.lpips_max - b.lpips_min, b.dir_max - b.dir_min])


def _with_ranges(b: HPABounds, ranges: np.ndarray) -> HPABounds:
    """Bounds with the best ends at the ideal values and the given (FID, LPIPS, DIR) ranges."""
    fid, lpips, dir_ = (float(r) for r in ranges)
    return replace(b, **_IDEAL, fid_max=fid, lpips_max=lpips, dir_min=1.0 - dir_)


@dataclass(kw_only=True)
class BoundsFit:
    """HPA bounds of one layer kind before and after fitting them to ELO ratings."""

    kind: str
    """The layer kind whose bounds were fitted (the other kind is left as it was)."""
    models: list[str]
    """Models the correlations are over."""
    before: HPANormalization
    """The normalisation given."""
    after: HPANormalization
    """The fitted normalisation."""
    before_table: AlignmentTable
    """Human alignment with the given bounds."""
    after_table: AlignmentTable
    """Human alignment with the fitted bounds."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: kind, models, and per side the normalisation and the alignment table."""
        return {
            "kind": self.kind,
            "models": list(self.models),
            "before": {"normalization": self.before.to_dict(), "alignment": self.before_table.to_dict()},
            "after": {"normalization": self.after.to_dict(), "alignment": self.after_table.to_dict()},
        }

    def summary(self) -> str:
        """A few lines for a person: HPA's Pearson and Spearman with ELO before and after, and both bounds."""

        def bounds(n: HPANormalization) -> str:
            b = n.bounds(self.kind)
            return (
                f"FID [{b.fid_min:g}, {b.fid_max:.4g}]  LPIPS [{b.lpips_min:g}, {b.lpips_max:.4g}]  "
                f"DIR [{b.dir_min:.4g}, {b.dir_max:g}]"
            )

        lines = [f"HPA bounds fitted to ELO: {self.kind}, {len(self.models)} models"]
        for name, n, table in (
            ("before", self.before, self.before_table),
            ("after", self.after, self.after_table),
        ):
            lines.append(
                f"  {name:<6}  Pearson {table.pearson['HPA']:+.4f}  Spearman {table.spearman['HPA']:+.4f}  "
                f"{bounds(n)}"
            )
        return "\n".join(lines)


def fit_bounds(
    metrics_by_model: Mapping[str, Mapping[str, float]],
    elo: Mapping[str, float],
    kind: str,
    normalization: HPANormalization | None = None,
    *,
    limits: tuple[float, float] = (0.1, 10.0),
    grid: int = 9,
) -> BoundsFit:
    """Fit one kind's HPA ranges so that HPA correlates best (Pearson, then Spearman) with ELO over models.

    The best ends stay at the ideal values (FID 0, LPIPS 0, DIR 1); the worst ends, i.e. the three ranges, are
    searched within ``limits`` times the given ranges: a log-spaced grid, then Nelder-Mead from its best point.
    Without clipping, HPA is ``1 - (FID / R_fid + LPIPS / R_lpips + (1 - DIR) / R_dir) / 3``, and a correlation
    ignores any positive affine change of HPA, so only the ratios of the ranges matter: their overall scale is
    kept (the geometric mean of the three factors applied to the given ranges is 1), leaving two free parameters.
    Where the correlation cannot tell points apart (e.g. a metric equal for every model), the one closer to the
    given ranges is kept.

    Args:
        metrics_by_model: model -> raw metrics ``{"fid", "lpips", "dir"}`` of this kind.
        elo: model -> rating (e.g. :func:`fit_elo`); must cover every model in ``metrics_by_model``.
        kind: ``foreground`` or ``background``.
        normalization: the bounds to start from (default: the paper-fitted ones).
        limits: smallest and largest factor applied to each given range.
        grid: grid points per parameter (odd, so that the given ranges are on the grid).

    Raises:
        EloError: fewer than 3 models, a model without an ELO rating or without a metric, non-finite metrics,
            or ratings that are all equal (nothing to follow).
        ValueError: an unknown kind, or bad ``limits`` / ``grid``.
    """
    before = normalization or HPANormalization()
    current = before.bounds(kind)  # ValueError names the known kinds
    lo, hi = limits
    if not (0 < lo <= 1 <= hi) or grid < 3 or grid % 2 == 0:
        raise ValueError(
            f"fit_bounds: need 0 < limits[0] <= 1 <= limits[1] and an odd grid >= 3, got {limits}, {grid}"
        )
    models = list(metrics_by_model)
    if len(models) < 3:
        raise EloError(f"fit_bounds: needs at least 3 models to correlate, got {len(models)}: {models}")
    no_elo = [m for m in models if m not in elo]
    if no_elo:
        raise EloError(f"fit_bounds: no ELO rating for {no_elo} (rated: {sorted(elo)})")
    raw = np.empty((len(models), 3))
    for k, m in enumerate(models):
        missing = [key for key in ("fid", "lpips", "dir") if key not in metrics_by_model[m]]
        if missing:
            raise EloError(
                f"fit_bounds: metrics of {m!r} lack {missing} (have: {sorted(metrics_by_model[m])})"
            )
        raw[k] = [float(metrics_by_model[m][key]) for key in ("fid", "lpips", "dir")]
    if not np.all(np.isfinite(raw)):
        bad = [m for m, row in zip(models, raw, strict=True) if not np.all(np.isfinite(row))]
        raise EloError(f"fit_bounds: non-finite metrics for {bad}")
    ratings = np.array([float(elo[m]) for m in models])
    if np.ptp(ratings) == 0:
        raise EloError(
            f"fit_bounds: the ELO ratings of {models} are all equal; there is nothing for HPA to follow"
        )

    start = _ranges(current)
    log_lo, log_hi = math.log(lo), math.log(hi)

    def factors(x: np.ndarray) -> np.ndarray:
        return np.array([x[0], x[1], -x[0] - x[1]])  # log factors, summing to 0 (scale kept)

    def hpa(x: np.ndarray) -> np.ndarray:
        trial = replace(before, **{kind: _with_ranges(current, start * np.exp(factors(x)))})
        return np.array([trial.score(kind, fid=f, lpips=lp, dir=d) for f, lp, d in raw])

    def feasible(x: np.ndarray) -> bool:
        f = factors(x)
        return bool(np.all(f >= log_lo - 1e-12) and np.all(f <= log_hi + 1e-12))

    def key(x: np.ndarray) -> tuple[float, float, float]:
        # Rounded so that float noise does not decide; then Spearman, then closeness to the given ranges.
        values = hpa(x)
        p, s = pearson(values, ratings), spearman(values, ratings)
        p = -math.inf if math.isnan(p) else round(p, 10)
        s = -math.inf if math.isnan(s) else s
        return p, s, -float(np.abs(factors(x)).sum())

    axis = np.linspace(log_lo, log_hi, grid)
    candidates = [np.array([u, v]) for u in axis for v in axis if feasible(np.array([u, v]))]
    best = max(candidates, key=key)

    def loss(x: np.ndarray) -> float:
        if not feasible(x):
            return 2.0  # above any -Pearson: Nelder-Mead stays inside the limits
        p = pearson(hpa(x), ratings)
        return 1.0 if math.isnan(p) else -p

    step = (log_hi - log_lo) / (grid - 1)
    simplex = np.array([best, best + [step / 2, 0.0], best + [0.0, step / 2]])
    refined = minimize(
        loss, best, method="Nelder-Mead", options={"initial_simplex": simplex, "xatol": 1e-6, "fatol": 1e-12}
    ).x
    if feasible(refined) and key(refined) > key(best):
        best = refined

    after = replace(before, **{kind: _with_ranges(current, start * np.exp(factors(best)))})
    metrics = {m: dict(metrics_by_model[m]) for m in models}
    return BoundsFit(
        kind=kind,
        models=models,
        before=before,
        after=after,
        before_table=human_alignment(metrics, elo, kind=kind, normalization=before),
        after_table=human_alignment(metrics, elo, kind=kind, normalization=after),
    )
