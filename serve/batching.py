"""The decomposer deployment's batched code path, as plain functions (no Ray): what one ``@serve.batch`` call does
with the items it was handed. ``bench/gpu_serve.py`` drives the same functions on a GPU without Ray.

An item is a dict: ``image`` HxWx3 uint8, ``prompt``, ``kind``, ``steps``, ``guidance``, ``seed`` and ``model`` (an
exact registry reference or ``classical``). Items that share ``(model, steps, guidance)`` go to the model in one
``decompose`` call: images of any size (the decomposition API resizes), one seed each.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["decompose_group", "group_items"]


def group_items(items: list[dict[str, Any]]) -> dict[tuple[str, int, float], list[int]]:
    """Indices of ``items`` by what a batched model call must share: ``(model, steps, guidance)``, in first-seen
    order."""
    groups: dict[tuple[str, int, float], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault((it["model"], it["steps"], it["guidance"]), []).append(i)
    return groups


def decompose_group(model: Any, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``model.decompose`` call for items of one group -> one result per item, in order: ``layer`` (HxWx4
    uint8), ``batch_size`` and ``seconds`` (the call's), or ``error`` when the model refused the request before any
    compute (a :class:`ValueError`: a prompt or an option it cannot take, e.g. text-only for ``classical``). Any
    other exception propagates: it is the server's failure, not the client's. A refusal in a batch of several
    sends each item alone, so only the refused ones get an ``error``."""
    steps, guidance = items[0]["steps"], items[0]["guidance"]
    t0 = time.perf_counter()
    try:
        layers = model.decompose(
            [it["image"] for it in items],
            [it["prompt"] for it in items],
            [it["kind"] for it in items],
            steps=steps,
            guidance=guidance,
            seeds=[it["seed"] for it in items],
        )
    except ValueError as e:  # PromptError and bad options are ValueErrors, raised before any compute
        if len(items) == 1:
            return [{"error": f"{type(e).__name__}: {e}"}]
        # One refused item must not fail the others batched with it: each alone (refusals cost no compute).
        return [r for it in items for r in decompose_group(model, [it])]
    secs = time.perf_counter() - t0
    return [{"layer": layer, "batch_size": len(items), "seconds": secs} for layer in layers]
