"""HPA, the human-preference-aligned score: min-max normalised FID, LPIPS and DIR, averaged (rld-method.md).

``HPA = ((fid_max - FID) / (fid_max - fid_min) + (lpips_max - LPIPS) / (lpips_max - lpips_min)
+ (DIR - dir_min) / (dir_max - dir_min)) / 3``, with one set of bounds per layer kind.

The paper does not publish its bounds. Default bounds (the rule, and why): the BEST end of each part is its
ideal value, FID 0, LPIPS 0, DIR (a cosine) 1, and only the three ranges are fitted (least squares, all five rows of
the paper's results table per kind). With the best ends fixed the minima are no longer unidentifiable, the fit has
3 parameters for 5 rows, and it still reproduces every published HPA within rounding: residuals below 1e-4
(background) and 3e-4 (foreground), smaller than the unconstrained 4-parameter fit quoted in rld-method.md for
the foreground (1.6e-3, whose implied DIR maximum would exceed 1, impossible for a cosine). Ranges: background
FID 40.10, LPIPS 0.2391, DIR 0.4797 (rld-method.md's free fit: 39.3, 0.238, 0.491); foreground FID 64.46,
LPIPS 0.2253, DIR 0.9162 (free fit: 66.0, 0.273, 0.817).

Clipping: off by default. No score can pass the ideal end, so a part can exceed 1 only by a bound set by hand;
a model WORSE than the fitted worst end gets a negative part, which keeps it ranked below a merely bad one (a clip
would tie them and blind the gate). ``clip=True`` clips each part to [0, 1] before the mean.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

KINDS = ("foreground", "background")
PARTS = ("s_fid", "s_vis", "s_gen")
"""The three normalised parts, in the paper's order of names: FID (faithfulness), LPIPS (preservation), DIR
(completion)."""


@dataclass(kw_only=True, frozen=True)
class HPABounds:
    """Min-max bounds of the three raw metrics for one layer kind."""

    fid_min: float = 0.0
    """FID at which S_fid's normalised part is 1 (the ideal, identical distributions)."""
    fid_max: float
    """FID at which S_fid's normalised part is 0."""
    lpips_min: float = 0.0
    """LPIPS (S_vis, visible region) at which its part is 1 (the ideal, identical visible pixels)."""
    lpips_max: float
    """LPIPS at which its part is 0."""
    dir_min: float
    """Directional cosine (S_gen) at which its part is 0."""
    dir_max: float = 1.0
    """Directional cosine at which its part is 1 (the ideal: the completion moves exactly like the ground truth)."""

    def __post_init__(self) -> None:
        for name in ("fid", "lpips", "dir"):
            lo, hi = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
                raise ValueError(f"HPA bounds: {name}_min={lo} must be finite and below {name}_max={hi}")

    def parts(self, fid: float, lpips: float, dir: float) -> dict[str, float]:
        """The three normalised parts, each 1 at its ideal end and 0 at its worst bound (not clipped).

        Args:
            fid: FID of the composited layer sets (lower is better).
            lpips: S_vis, LPIPS on the visible region (lower is better).
            dir: S_gen, directional cosine (higher is better).

        Returns:
            ``{"s_fid": ..., "s_vis": ..., "s_gen": ...}``; NaN where the input is NaN.
        """
        return {
            "s_fid": (self.fid_max - fid) / (self.fid_max - self.fid_min),
            "s_vis": (self.lpips_max - lpips) / (self.lpips_max - self.lpips_min),
            "s_gen": (dir - self.dir_min) / (self.dir_max - self.dir_min),
        }


# Fitted as described in the module docstring (tests/eval/test_hpa.py recomputes the paper's rows with them).
PAPER_FOREGROUND = HPABounds(fid_max=64.46, lpips_max=0.2253, dir_min=1.0 - 0.9162)
PAPER_BACKGROUND = HPABounds(fid_max=40.10, lpips_max=0.2391, dir_min=1.0 - 0.4797)


@dataclass(kw_only=True)
class HPANormalization:
    """The HPA normalisation: bounds per layer kind and the clipping rule; stored in every report."""

    foreground: HPABounds = field(default_factory=lambda: PAPER_FOREGROUND)
    """Bounds for foreground layers (default: fitted to the paper's foreground rows)."""
    background: HPABounds = field(default_factory=lambda: PAPER_BACKGROUND)
    """Bounds for background layers (default: fitted to the paper's background rows)."""
    clip: bool = False
    """Clip each normalised part to [0, 1] before averaging (off: see the module docstring)."""

    def bounds(self, kind: str) -> HPABounds:
        """The bounds of one layer kind (``foreground`` or ``background``); ValueError names the known kinds."""
        if kind not in KINDS:
            raise ValueError(f"HPA: unknown layer kind {kind!r} (known: {', '.join(KINDS)})")
        return getattr(self, kind)

    def parts(self, kind: str, *, fid: float, lpips: float, dir: float) -> dict[str, float]:
        """Normalised parts (``s_fid``, ``s_vis``, ``s_gen``) of one kind's raw metrics, clipped if ``clip``."""
        out = self.bounds(kind).parts(fid, lpips, dir)
        if self.clip:
            out = {k: v if math.isnan(v) else min(1.0, max(0.0, v)) for k, v in out.items()}
        return out

    def score(self, kind: str, *, fid: float, lpips: float, dir: float) -> float:
        """HPA of one kind: the mean of the three normalised parts (NaN if any metric is NaN)."""
        p = self.parts(kind, fid=fid, lpips=lpips, dir=dir)
        return sum(p.values()) / 3.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form: ``{"foreground": {...6 bounds}, "background": {...}, "clip": bool}``."""
        return {
            "foreground": asdict(self.foreground),
            "background": asdict(self.background),
            "clip": self.clip,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HPANormalization:
        """Inverse of :meth:`to_dict`; a missing kind or bound keeps its default.

        Raises:
            ValueError: an unknown key (naming the known ones), a non-numeric bound, or min >= max.
        """
        known = (*KINDS, "clip")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"HPA normalisation: unknown key(s) {unknown} (known: {', '.join(known)})")
        default = cls()
        kinds: dict[str, HPABounds] = {}
        bound_names = [f.name for f in fields(HPABounds)]
        for kind in KINDS:
            values = asdict(getattr(default, kind))
            given = data.get(kind) or {}
            bad = sorted(set(given) - set(bound_names))
            if bad:
                raise ValueError(
                    f"HPA normalisation: unknown bound(s) {bad} for {kind} (known: {', '.join(bound_names)})"
                )
            for name, value in given.items():
                try:
                    values[name] = float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"HPA normalisation: {kind}.{name}={value!r} is not a number") from None
            kinds[kind] = HPABounds(**values)
        clip = data.get("clip", default.clip)
        if not isinstance(clip, bool):
            raise ValueError(f"HPA normalisation: clip={clip!r} must be true or false")
        return cls(**kinds, clip=clip)
