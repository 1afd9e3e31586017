"""The decomposer deployment's batched code path, as plain functions (no Ray): what one ``@serve.batch`` call does
with the items it was handed. ``bench/gpu_serve.py`` drives the same functions on a GPU without Ray.

An item is a dict: ``image`` HxWx3 uint8, ``prompt``, ``kind``, ``steps``, ``guidance``, ``seed`` and ``model`` (an
exact registry reference or ``classical``). Items that share ``(model, steps, guidance)`` go to the model in one
``decompose`` call: images of any size (the decomposition API resizes), one seed each.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["decompose_group", "group_items", "replica_dtype", "request_item"]


def request_item(req: Any, prompt: dict[str, Any], *, model: str, default_steps: int) -> dict[str, Any]:
    """The item the ingress hands the decomposer for one prompt of a checked request
    (:class:`reflade.serve.requests.DecomposeRequest`): the service's default steps when the request names none,
    guidance 1 (the conditional branch only) unless given, ``model`` the exact reference or ``classical``."""
    return {
        "image": req.image,
        "prompt": prompt,
        "kind": req.kind,
        "steps": req.steps or default_steps,
        "guidance": 1.0 if req.guidance is None else req.guidance,
        "seed": req.seed,
        "model": model,
    }


def replica_dtype(bf16: bool, device: str) -> str | None:
    """The weight dtype a decomposer replica casts its models to: ``"bfloat16"`` on a GPU with ``serve.bf16``
    (the measured 1024 px decomposition is 1.05-1.14 s on an H100 with bf16 weights, 1.53 s with float32 weights
    under autocast), else None (float32, as saved)."""
    return "bfloat16" if bf16 and str(device).startswith("cuda") else None


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
