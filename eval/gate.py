"""The gate: compare a candidate's report with a baseline's on the same setup, and promote by compare-and-swap.

Two reports are compared only when they scored the same dataset version and split, the same prompt types, with
the same feature-network versions, metric size and FID background (:func:`reflade.eval.job.run_key`); a report
made with stand-in feature networks is never compared with one made with real weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from reflade.eval.summary import HIGHER_IS_BETTER, LOWER_IS_BETTER
from reflade.platform.errors import ReportedError

__all__ = [
    "GateFailed",
    "GateResult",
    "check",
    "find_baseline",
    "production_of",
    "promote",
    "report_for",
]

PRODUCTION = "production"


class GateFailed(ReportedError):
    """The candidate is worse than the baseline by more than a configured margin (the message says where)."""


class NotComparable(ReportedError):
    """Two reports were made on different setups: their numbers cannot be compared."""


def production_of(subject: str) -> str:
    """``model/NAME@production`` for a model reference."""
    from reflade.platform.registry import Ref

    if "/" not in subject:
        raise NotComparable(f"--promote and the gate need a model reference, not {subject!r}")
    r = Ref.parse(subject)
    return f"{r.kind}/{r.name}@{PRODUCTION}"


def _key(report: dict[str, Any]) -> dict[str, Any]:
    from reflade.eval.job import run_key

    return run_key(report)


def comparable(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Raise :class:`NotComparable` naming what differs between two reports' setups."""
    sa, sb = a["setup"], b["setup"]
    if bool(sa.get("stand_in")) != bool(sb.get("stand_in")):
        which = a if sa.get("stand_in") else b
        raise NotComparable(
            f"refusing to compare a report made with stand-in feature networks ({which['subject']}) with one made "
            "with real weights: stand-in scores are not comparable with real ones"
        )
    ka, kb = _key(a), _key(b)
    diff = [k for k in ka if ka[k] != kb.get(k)]
    if diff:
        parts = "; ".join(f"{k}: {ka[k]} vs {kb.get(k)}" for k in diff)
        raise NotComparable(f"{a['subject']} and {b['subject']} were scored on different setups ({parts})")


def find_baseline(
    registry, ref: str, setup: dict[str, Any], *, log: Callable[[str], None] = print
) -> tuple[str | None, dict[str, Any] | None]:
    """The baseline's exact reference and its newest report on ``setup`` (None when it has none: the run scores it).

    Returns (None, None) when ``ref`` is an alias that does not exist yet (no ``production`` model so far).
    """
    from reflade.platform.registry import Ref, RegistryError

    r = Ref.parse(ref)
    if r.alias and r.alias not in registry.aliases(r.kind, r.name):
        log(f"{r.kind}/{r.name} has no alias {r.alias!r} yet: nothing to gate against")
        return None, None
    try:
        version = registry.resolve(ref)
    except RegistryError as e:
        raise NotComparable(f"baseline {ref}: {e}") from None
    from reflade.eval.job import COMPARABLE

    want = {k: setup.get(k) for k in COMPARABLE}
    for child in sorted(registry.children(version.ref), reverse=True):
        if not child.startswith("eval-report/"):
            continue
        meta = registry.resolve(child).metadata
        theirs = meta.get("setup") or {}
        if meta.get("subject") == version.ref and all(theirs.get(k) == v for k, v in want.items()):
            log(f"baseline {version.ref}: using its report {child}")
            return version.ref, json.loads(registry.read_bytes(child, "report.json"))
    log(f"baseline {version.ref} has no report on this setup: scoring it in this run")
    return version.ref, None


def report_for(report: dict[str, Any], model: str) -> dict[str, Any]:
    """The part of a report about one of the other models it scored, in report form (for :func:`check`)."""
    tables = [t for t in report["tables"] if t["model"] == model]
    if not tables:
        raise NotComparable(f"the report has no rows of {model}")
    return {"subject": model, "setup": report["setup"], "tables": tables}


@dataclass
class GateResult:
    """The gate's verdict, metric by metric."""

    candidate: str
    baseline: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    """Each: kind, metric, candidate, baseline, drop (positive = worse), margin, passed, note."""

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)

    def summary(self) -> str:
        lines = [f"gate {self.candidate} vs {self.baseline}: {'PASSED' if self.passed else 'FAILED'}"]
        for c in self.checks:
            mark = "ok  " if c["passed"] else "FAIL"
            lines.append(
                f"  {mark} {c['kind']:<10} {c['metric']:<16} candidate {c['candidate']:.4g} baseline "
                f"{c['baseline']:.4g} drop {c['drop']:+.4g} (margin {c['margin']:g}){c['note']}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "baseline": self.baseline,
            "passed": self.passed,
            "checks": self.checks,
        }


def check(
    report: dict[str, Any], baseline_report: dict[str, Any], margins: dict[str, float], *, baseline: str
) -> GateResult:
    """Compare the candidate's pooled (all prompt types) metrics per kind with the baseline's.

    A metric fails when it is worse by more than its margin; a metric the baseline has and the candidate lacks
    (NaN) fails too; one neither has (e.g. the hidden-region error on real photos) is left out.

    Raises:
        NotComparable: the setups differ, or one report used stand-in networks and the other real ones.
        ValueError: a margin for a metric whose direction is unknown.
    """
    comparable(report, baseline_report)
    mine = {(t["kind"], t["prompt_type"]): t for t in report["tables"] if t["model"] == report["subject"]}
    theirs = {(t["kind"], t["prompt_type"]): t for t in baseline_report["tables"] if t["model"] == baseline}
    result = GateResult(candidate=report["subject"], baseline=baseline)
    for metric, margin in sorted(margins.items()):
        if metric not in HIGHER_IS_BETTER | LOWER_IS_BETTER:
            known = ", ".join(sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER))
            raise ValueError(f"gate: unknown metric {metric!r} (known: {known})")
        for kind in ("foreground", "background"):
            a, b = mine.get((kind, "all")), theirs.get((kind, "all"))
            if a is None or b is None:
                continue
            va, vb = float(a.get(metric, math.nan)), float(b.get(metric, math.nan))
            if math.isnan(va) and math.isnan(vb):
                continue
            drop = (vb - va) if metric in HIGHER_IS_BETTER else (va - vb)
            ok = not math.isnan(drop) and drop <= margin
            note = "" if not math.isnan(drop) else " (the candidate has no value)"
            result.checks.append(
                {
                    "kind": kind,
                    "metric": metric,
                    "candidate": va,
                    "baseline": vb,
                    "drop": drop,
                    "margin": margin,
                    "passed": ok,
                    "note": note,
                }
            )
    if not result.checks:
        raise NotComparable(
            f"no metric of {sorted(margins)} is defined for both {result.candidate} and {baseline}"
        )
    return result


def promote(
    registry,
    subject: str,
    expected: int | None,
    *,
    allow_first: bool = False,
    log: Callable[[str], None] = print,
) -> str:
    """Point ``production`` at ``subject`` if it still points at version ``expected`` (None: it must not exist).

    Returns:
        The exact reference production now points at.

    Raises:
        GateFailed: no production yet and not ``allow_first``; or production moved since the gate read it
            (nothing changed).
    """
    from reflade.platform.registry import AliasConflict, Ref

    r = Ref.parse(subject)
    if expected is None and not allow_first:
        raise GateFailed(
            f"{r.kind}/{r.name} has no {PRODUCTION} model yet, so there was nothing to gate against; "
            f"pass --allow-first to make {subject} the first production model"
        )
    try:
        move = registry.set_alias(subject, PRODUCTION, expected=expected)
    except AliasConflict as e:
        raise GateFailed(
            f"not promoted: {e}. Another run moved {PRODUCTION} after this one read it; evaluate against the "
            "new production model"
        ) from None
    before = "none" if move.from_version is None else f"@{move.from_version}"
    log(f"promoted: {r.kind}/{r.name}@{PRODUCTION} {before} -> @{move.to_version}")
    return f"{r.kind}/{r.name}@{move.to_version}"
