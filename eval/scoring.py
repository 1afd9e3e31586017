"""Scoring items: dataset rows -> items (one per prompt type) -> predictions -> per-(item, model) metric rows.

Two stage classes do the work on pandas batches, with the same code whether Ray Data runs them in actor pools
(:mod:`reflade.eval.job`) or a single process calls them in a loop (the benchmark's arms, :func:`score_local`):

- :class:`PredictStage` holds every predictor (the model loaded once per actor) and adds, per model, the predicted
  layer at the metric frame (PNG) or the reason it was refused;
- :class:`ScoreStage` holds the feature networks and turns each item into one row per model: the weight-free
  metrics, S_vis (LPIPS), S_gen (DIR), and the FID features of the prediction and of the ground truth, both
  composited on :data:`~reflade.eval.fid.FID_BACKGROUND`.

Every metric is computed in the item's metric frame: the ground truth's pixel frame with its longest side resized to
``eval.metric_size``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from reflade.engine.schema import decode_image, decode_mask, encode_png
from reflade.eval.metrics import layer_metrics, metric_frame, resize_layer, resize_mask
from reflade.eval.predictors import EvalItem, build_predictor

__all__ = [
    "ITEM_COLUMNS",
    "PredictStage",
    "ScoreStage",
    "expand_row",
    "has_exact_truth",
    "item_from_record",
    "prompt_type_of",
    "score_local",
]

ITEM_COLUMNS = (
    "item_id",
    "sample_id",
    "prompt_type",
    "kind",
    "image",
    "layer",
    "visible_mask",
    "prompt_json",
    "exact",
)
"""Columns of an item record (one dataset row and one of its prompts)."""


def prompt_type_of(prompt: dict[str, Any]) -> str:
    """``TYPE:GRANULARITY`` of a sample-format prompt (``text+box:fine``)."""
    return f"{prompt.get('type')}:{prompt.get('granularity') or 'fine'}"


def has_exact_truth(row: dict[str, Any]) -> bool:
    """True when the row's layer is exact behind occluders: rows the engine made from synthetic scenes."""
    backends = (row.get("provenance") or {}).get("backends") or {}
    names = [k for k, _ in backends] if isinstance(backends, list) else list(backends)
    return "synthetic" in names


def _prompt_to_json(prompt: dict[str, Any]) -> str:
    p = {k: prompt.get(k) for k in ("type", "granularity", "points", "box", "mask", "text")}
    if isinstance(p.get("mask"), bytes | bytearray):
        p["mask"] = {"png_base64": base64.b64encode(bytes(p["mask"])).decode()}
    if p.get("points") is not None:
        p["points"] = [list(map(float, pt)) for pt in p["points"]]
    if p.get("box") is not None:
        p["box"] = [float(v) for v in p["box"]]
    return json.dumps({k: v for k, v in p.items() if v is not None})


def _prompt_from_json(text: str) -> dict[str, Any]:
    p = json.loads(text)
    mask = p.get("mask")
    if isinstance(mask, dict):
        p["mask"] = base64.b64decode(mask["png_base64"])
    return p


def expand_row(row: dict[str, Any], prompt_types: Sequence[str]) -> list[dict[str, Any]]:
    """Item records of one dataset row: one per prompt of a requested type (a row lacking a type adds none)."""
    wanted = set(prompt_types)
    out, seen = [], set()
    exact = has_exact_truth(row)
    for prompt in row.get("prompts") or []:
        ptype = prompt_type_of(prompt)
        if ptype not in wanted or ptype in seen:
            continue
        seen.add(ptype)
        out.append(
            {
                "item_id": f"{row['sample_id']}/{ptype}",
                "sample_id": row["sample_id"],
                "prompt_type": ptype,
                "kind": row["kind"],
                "image": row["image"],
                "layer": row["layer"],
                "visible_mask": row["visible_mask"],
                "prompt_json": _prompt_to_json(prompt),
                "exact": exact,
            }
        )
    return out


def item_from_record(rec: dict[str, Any], seed: int = 0) -> EvalItem:
    """Decode an item record (:func:`expand_row`) into an :class:`EvalItem`."""
    return EvalItem(
        item_id=str(rec["item_id"]),
        sample_id=str(rec["sample_id"]),
        prompt_type=str(rec["prompt_type"]),
        kind=str(rec["kind"]),
        image=decode_image(rec["image"], "RGB"),
        truth=decode_image(rec["layer"], "RGBA"),
        visible=decode_mask(rec["visible_mask"]),
        prompt=_prompt_from_json(rec["prompt_json"]),
        exact=bool(rec["exact"]),
        seed=seed,
    )


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return df.to_dict("records")


class PredictStage:
    """Decompose every item with every model; adds ``pred_I`` (PNG at the metric frame, or None) and
    ``refused_I`` (the reason, or "") for the I-th model.

    Args:
        models: predictor specs (exact model references, ``classical``, ``copy-visible``), in report order.
        metric_size: longest side of the metric frame.
        storage_fields, registry_prefix: where the registry is (a worker's own credentials); None: no registry
            (only ``classical`` and ``copy-visible`` then).
        steps, guidance, seed: the decomposition's settings.
        device: torch device of the models.
        threads: torch threads in this process (0: leave as is).
    """

    def __init__(
        self,
        models: Sequence[str],
        metric_size: int,
        storage_fields: dict[str, Any] | None = None,
        registry_prefix: str = "registry",
        *,
        steps: int = 20,
        guidance: float = 1.0,
        seed: int = 0,
        device: str = "cpu",
        threads: int = 0,
        cache_dir: str | None = None,
        registry: Any = None,
    ):
        if threads:
            import torch

            torch.set_num_threads(threads)
        if registry is None and storage_fields is not None:
            from reflade.platform.worker import worker_registry

            registry = worker_registry(storage_fields, registry_prefix)
        self.metric_size = int(metric_size)
        self.seed = int(seed)
        self.predictors = [
            build_predictor(
                m, registry, steps=steps, guidance=guidance, device=device, cache_dir=cache_dir or None
            )
            for m in models
        ]

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        items = [item_from_record(r, self.seed) for r in _records(df)]
        out = df.copy()
        for i, predictor in enumerate(self.predictors):
            preds = predictor.predict(items)
            pngs, reasons = [], []
            for it, pred in zip(items, preds, strict=True):
                if isinstance(pred, str):
                    pngs.append(None)
                    reasons.append(pred)
                    continue
                frame = metric_frame(*it.truth.shape[:2], self.metric_size)
                pngs.append(encode_png(resize_layer(pred, frame)))
                reasons.append("")
            out[f"pred_{i}"] = pngs
            out[f"refused_{i}"] = reasons
        return out


def _group_by_shape(frames: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i, f in enumerate(frames):
        groups.setdefault(tuple(f), []).append(i)
    return groups


class ScoreStage:
    """One row per (item, model): weight-free metrics, ``s_vis``, ``s_gen``, ``feat_pred``/``feat_gt`` (FID
    features), ``pred_png``; a refused item keeps its reason in ``refused`` and NaN metrics.

    Args:
        models: the same list, in the same order, as the :class:`PredictStage` before it.
        networks: a :class:`reflade.eval.networks.FeatureNetworks`, or the references to load it from:
            ``{"lpips": ref, "clip": ref, "inception": ref}`` (loaded once per actor through the registry).
    """

    def __init__(
        self,
        models: Sequence[str],
        metric_size: int,
        networks: Any,
        storage_fields: dict[str, Any] | None = None,
        registry_prefix: str = "registry",
        *,
        device: str = "cpu",
        threads: int = 0,
        cache_dir: str | None = None,
        fid_background: tuple[int, int, int] | None = None,
        bf16: bool | None = None,
    ):
        if threads:
            import torch

            torch.set_num_threads(threads)
        from reflade.eval.fid import FID_BACKGROUND

        if isinstance(networks, dict):
            from reflade.eval.networks import load_feature_networks
            from reflade.platform.worker import worker_registry

            registry = worker_registry(storage_fields, registry_prefix)
            networks = load_feature_networks(
                registry,
                lpips_ref=networks["lpips"],
                clip_ref=networks["clip"],
                inception_ref=networks["inception"],
                device=device,
                cache_dir=cache_dir or None,
            )
        self.networks = networks
        self.models = list(models)
        self.metric_size = int(metric_size)
        self.device = device
        self.background = tuple(fid_background or FID_BACKGROUND)
        on_cuda = str(device).startswith("cuda")
        self.bf16 = on_cuda if bf16 is None else bool(bf16) and on_cuda
        # bf16 features carry ~3 significant digits: a smaller difference than that is no direction (S_gen)
        self.min_relative_norm = 1e-2 if self.bf16 else 1e-4

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        import torch

        from reflade.eval.features import directional_similarity, lpips_visible
        from reflade.eval.fid import composite_torch

        recs = _records(df)
        items = [item_from_record(r) for r in recs]
        frames = [metric_frame(*it.truth.shape[:2], self.metric_size) for it in items]
        truths = [resize_layer(it.truth, f) for it, f in zip(items, frames, strict=True)]
        visibles = [resize_mask(it.visible, f) for it, f in zip(items, frames, strict=True)]
        rows: list[dict[str, Any]] = []
        for i, model in enumerate(self.models):
            preds: list[np.ndarray | None] = [
                decode_image(r[f"pred_{i}"], "RGBA") if r.get(f"pred_{i}") is not None else None for r in recs
            ]
            for j, it in enumerate(items):
                row = {
                    "item_id": it.item_id,
                    "sample_id": it.sample_id,
                    "prompt_type": it.prompt_type,
                    "kind": it.kind,
                    "model": model,
                    "refused": recs[j].get(f"refused_{i}") or "",
                    "pred_png": recs[j].get(f"pred_{i}"),
                    "s_vis": float("nan"),
                    "s_gen": float("nan"),
                    "feat_pred": None,
                    "feat_gt": None,
                }
                if preds[j] is not None:
                    row.update(
                        layer_metrics(preds[j], truths[j], visibles[j], kind=it.kind, exact_hidden=it.exact)
                    )
                rows.append(row)
            # The networks run batched over items of one frame shape (one aspect ratio).
            for idx in _group_by_shape(frames).values():
                idx = [j for j in idx if preds[j] is not None]
                if not idx:
                    continue
                pred = _tensor([preds[j] for j in idx])
                gt = _tensor([truths[j] for j in idx])
                vis = torch.from_numpy(np.stack([visibles[j] for j in idx]).astype(np.float32)).unsqueeze(1)
                pred, gt, vis = pred.to(self.device), gt.to(self.device), vis.to(self.device)
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
                    s_vis = (
                        lpips_visible(pred[:, :3], gt[:, :3], vis, self.networks.lpips).float().cpu().numpy()
                    )
                    s_gen = directional_similarity(
                        pred[:, :3],
                        gt[:, :3],
                        vis,
                        self.networks.clip,
                        min_relative_norm=self.min_relative_norm,
                    )
                    s_gen = s_gen.float().cpu().numpy()
                    both = torch.cat(
                        [
                            composite_torch(pred[:, :3], pred[:, 3:], self.background),
                            composite_torch(gt[:, :3], gt[:, 3:], self.background),
                        ]
                    )
                    feats = self.networks.inception(both).float().cpu().numpy()
                n = len(idx)
                base = i * len(items)
                for k, j in enumerate(idx):
                    row = rows[base + j]
                    row["s_vis"] = float(s_vis[k])
                    row["s_gen"] = float(s_gen[k])
                    row["feat_pred"] = feats[k].astype(np.float32).tolist()
                    row["feat_gt"] = feats[n + k].astype(np.float32).tolist()
        return pd.DataFrame(rows)


def _tensor(layers: Sequence[np.ndarray]):
    import torch

    return torch.from_numpy(np.stack(layers)).permute(0, 3, 1, 2).float() / 255.0


def score_local(
    records: Iterable[dict[str, Any]],
    predict: PredictStage,
    score: ScoreStage,
    *,
    batch_size: int = 8,
) -> pd.DataFrame:
    """The same stages in this process, ``batch_size`` items at a time (1: a per-sample loop)."""
    recs = list(records)
    parts = []
    for start in range(0, len(recs), batch_size):
        batch = pd.DataFrame(recs[start : start + batch_size])
        parts.append(score(predict(batch)))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
