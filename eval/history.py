"""Finding reports: a model's eval reports through lineage, and the inputs of a human-alignment table.

Registry versions are immutable, so a model never points at its reports: each ``eval-report`` version lists the
exact model version among its parents, and the registry's lineage edges lead from the model to it.
"""

from __future__ import annotations

import json
from typing import Any

from reflade.eval.hpa import HPANormalization
from reflade.platform.errors import ReportedError

__all__ = ["alignment_inputs", "reports_of"]


def reports_of(registry, model: str) -> list[dict[str, Any]]:
    """Every eval report of ``model`` (``model/NAME``: all versions; ``model/NAME@V``: that one), oldest first.

    Each row: ``model`` (exact), ``report`` (exact), ``dataset``, ``prompt_types``, ``stand_in``, ``headline``
    (the report's pooled metrics), ``created``.
    """
    from reflade.platform.registry import Ref

    r = Ref.parse(model)
    if "@" not in model:  # a bare name: every version (Ref.parse reads it as @latest)
        versions = [f"{r.kind}/{r.name}@{v}" for v in registry.versions(r.kind, r.name)]
        if not versions:
            registry.resolve(model)  # raises the registry's own "unknown name" error, with suggestions
    else:
        versions = [registry.resolve(model).ref]
    rows = []
    for ref in versions:
        for child in registry.children(ref):
            if not child.startswith("eval-report/"):
                continue
            v = registry.resolve(child)
            setup = v.metadata.get("setup") or {}
            rows.append(
                {
                    "model": ref,
                    "report": v.ref,
                    "dataset": setup.get("dataset"),
                    "prompt_types": setup.get("prompt_types"),
                    "stand_in": bool(setup.get("stand_in")),
                    "headline": v.metrics,
                    "created": v.manifest.get("created"),
                }
            )
    return sorted(rows, key=lambda row: (row["created"] or "", row["report"]))


def alignment_inputs(
    registry, reports: list[str], kind: str
) -> tuple[dict[str, dict[str, float]], HPANormalization]:
    """Per report's subject, its pooled ``fid`` / ``lpips`` / ``dir`` of one kind, and the reports' shared
    normalisation.

    Raises:
        ReportedError: reports on different setups, or one without that kind.
    """
    from reflade.eval.gate import comparable

    docs = [json.loads(registry.read_bytes(ref, "report.json")) for ref in reports]
    for d in docs[1:]:
        comparable(docs[0], d)
    out: dict[str, dict[str, float]] = {}
    for ref, d in zip(reports, docs, strict=True):
        t = next(
            (
                t
                for t in d["tables"]
                if t["model"] == d["subject"] and t["kind"] == kind and t["prompt_type"] == "all"
            ),
            None,
        )
        if t is None:
            raise ReportedError(f"{ref} has no {kind} rows")
        out[d["subject"]] = {"fid": t["fid"], "lpips": t["lpips"], "dir": t["dir"]}
    return out, HPANormalization.from_dict(docs[0]["setup"]["normalization"])
