"""bench/gpu_eval.py's item-level sections: the product's ScoreStage alone, one RefLayer decomposition, and
inference plus metrics (the job's two stages in one process, no Ray).

- items: synthetic scenes (:func:`reflade.engine.pipeline.synthetic_rows` -> Parquet round trip, as Ray Data hands
  them over -> :func:`reflade.eval.scoring.expand_row`, prompt type ``text+box:fine``);
- ``score``: :class:`~reflade.eval.scoring.ScoreStage` (``bf16=`` the dtype, the product's ``eval.bf16``) over items
  predicted beforehand by a ``copy-visible`` :class:`~reflade.eval.scoring.PredictStage`, ``--batch-size`` items per
  call; then once :func:`reflade.eval.fid.fid_from_moments` of the features (a per-evaluation cost);
- ``decompose``: RefLayer as ``bench/gpu_check.py`` builds it (random init on the device) through
  :meth:`RefLayerPipeline.decompose`, one item at a time;
- ``e2e``: a PredictStage whose predictor is the product's :class:`~reflade.eval.predictors.DecomposerPredictor` over
  that pipeline (set on the stage's ``predictors``: the stage builds model predictors only from a registry
  reference), then ScoreStage, in batches of ``--batch-size``.

The functions take the running ``EvalCheck`` (its device, arguments and timer).
"""

from __future__ import annotations

import json
import time
from typing import Any

PROMPT_TYPE = "text+box:fine"
"""The paper's evaluation prompt (``reflade.eval.config.DEFAULT_PROMPT_TYPES``): one item per dataset row."""


def make_items(check, n: int) -> list[dict[str, Any]]:
    """``n`` item records of synthetic scenes (foreground and background rows), as the job reads them."""
    from reflade.engine.config import EngineConfig
    from reflade.engine.pipeline import synthetic_rows
    from reflade.engine.schema import rows_to_table, table_to_rows
    from reflade.engine.synth import make_scenes
    from reflade.eval.scoring import expand_row

    side = check.args.scene_size
    items: list[dict[str, Any]] = []
    for i, scene in enumerate(make_scenes(max(n, 1) * 4, seed=0, size=(side, side), n_objects=(2, 3))):
        rows = table_to_rows(
            rows_to_table(synthetic_rows(scene, f"scene{i}", "gpu-eval", "test", EngineConfig()))
        )
        items += [rec for row in rows for rec in expand_row(row, [PROMPT_TYPE])]
        if len(items) >= n:
            return items[:n]
    raise RuntimeError(f"only {len(items)} items of type {PROMPT_TYPE} from the synthetic scenes")


def batches(records: list[dict[str, Any]], size: int):
    import pandas as pd

    return [pd.DataFrame(records[i : i + size]) for i in range(0, len(records), size)]


def score_case(check, nets, records, dtype_name: str, with_fid: bool) -> dict[str, Any]:
    import numpy as np

    from reflade.eval.scoring import PredictStage, ScoreStage

    args, models = check.args, ["copy-visible"]
    predict = PredictStage(models, args.metric_size, seed=0)
    t0 = time.perf_counter()
    predicted = [predict(df) for df in batches(records, args.batch_size)]
    predict_s = time.perf_counter() - t0
    score = ScoreStage(models, args.metric_size, nets, device=str(check.device), bf16=dtype_name == "bf16")
    score(predicted[0])  # warm-up: the first batch again (kernels, allocator), outside the timer
    check.sync()
    t0 = time.perf_counter()
    scored = [score(df) for df in predicted]
    check.sync()
    seconds = time.perf_counter() - t0
    n = sum(len(df) for df in predicted)
    rows = [r for df in scored for r in df.to_dict("records")]
    ok = len(rows) == n and all(
        np.isfinite(r["s_vis"]) and np.isfinite(r["s_gen"]) and len(r["feat_pred"]) > 0 for r in rows
    )
    entry = {"models": models, "items": n, "batch_size": args.batch_size, "metric_size": args.metric_size}
    entry.update(
        scene_px=args.scene_size, bf16_autocast=score.bf16, seconds=seconds, samples_per_s=n / seconds
    )
    entry.update(s_per_sample=seconds / n, copy_visible_predict_s=predict_s, output_ok=bool(ok))
    entry["feature_dim"] = len(rows[0]["feat_pred"]) if rows else None
    if with_fid:
        entry["fid_compute"] = fid_case(rows, args.fid_dims or None)
    return entry


def fid_case(rows: list[dict[str, Any]], dims: int | None) -> dict[str, Any]:
    """fid_from_moments once, on the layer kind with the most rows (the first ``dims`` feature dims)."""
    import numpy as np

    from reflade.eval.fid import FeatureMoments, fid_from_moments

    by_kind: dict[str, tuple[FeatureMoments, FeatureMoments]] = {}
    for r in rows:
        pred, gt = np.asarray([r["feat_pred"]])[:, :dims], np.asarray([r["feat_gt"]])[:, :dims]
        fake, real = by_kind.setdefault(
            r["kind"], (FeatureMoments.empty(pred.shape[1]), FeatureMoments.empty(pred.shape[1]))
        )
        fake.update(pred)
        real.update(gt)
    kind, (fake, real) = max(by_kind.items(), key=lambda kv: kv[1][0].n)
    t0 = time.perf_counter()
    value = fid_from_moments(real, fake)
    return {
        "kind": kind,
        "n": real.n,
        "dims": real.total.shape[0],
        "seconds": time.perf_counter() - t0,
        "value": value,
        "note": "fid_from_moments once per layer kind per evaluation (torchmetrics, float64 on the CPU); a fixed "
        "cost, not per sample" + (f"; smoke: first {dims} feature dims only" if dims else ""),
    }


def build_reflayer(check):
    """RefLayer at ``--preset`` (random init; ``sd3-medium`` drawn on the device), weights per
    ``--reflayer-weights``, frozen; what was built goes to ``result["inference"]["build"]``."""
    import torch

    from reflade.train.model import build_reflayer as build
    from reflade.train.model import count_parameters

    args = check.args
    overrides = {"num_layers": args.layers} if args.layers else {}
    t0 = time.perf_counter()
    if args.preset == "tiny":
        from reflade.train.vae import build_tiny_vae

        bundle = build("tiny", vae=build_tiny_vae(seed=0), resolution=args.resolution, **overrides)
    else:
        with torch.device(check.device):  # 2 B random weights: drawn on the GPU, not the CPU
            bundle = build("sd3-medium", resolution=args.resolution, **overrides)
    bundle.to(check.device)
    if args.reflayer_weights == "bf16":
        bundle.to(dtype=torch.bfloat16)
    bundle.model.eval().requires_grad_(False)
    check.sync()
    info = {"preset": args.preset, "resolution": bundle.resolution, "weights": args.reflayer_weights}
    info.update(seconds=time.perf_counter() - t0, params_reflayer=count_parameters(bundle.model))
    info["params_vae"] = count_parameters(bundle.vae)
    check.result["inference"]["build"] = info
    print(f"built RefLayer {args.preset}: {json.dumps(info)}", flush=True)
    return bundle


def decompose_case(check, pipe, record: dict[str, Any]) -> dict[str, Any]:
    import torch

    from reflade.eval.scoring import item_from_record

    args, it = check.args, item_from_record(record)

    def run():
        return pipe.decompose(
            [it.image], [it.prompt], [it.kind], steps=args.steps, guidance=args.guidance, seeds=0
        )

    with torch.inference_mode():
        sec = check.timed(run, 1, args.decompose_iters)
        out = run()
    ok = len(out) == 1 and out[0].shape == (*it.image.shape[:2], 4) and out[0].dtype.name == "uint8"
    entry = {
        "resolution": pipe.bundle.resolution,
        "steps": args.steps,
        "guidance": args.guidance,
        "kind": it.kind,
    }
    entry.update(image_px=list(it.image.shape[:2]), batch=1, s_per_decomposition=sec, output_ok=bool(ok))
    return entry


def e2e_case(check, pipe, nets, records, dtype_name: str) -> dict[str, Any]:
    import torch

    from reflade.eval.predictors import DecomposerPredictor
    from reflade.eval.scoring import PredictStage, ScoreStage

    args, name = check.args, pipe.name
    predict = PredictStage(["copy-visible"], args.metric_size, seed=0)
    # The product builds a model's predictor only from a registry reference; this is the one it would build.
    predict.predictors = [DecomposerPredictor(pipe, name, steps=args.steps, guidance=args.guidance)]
    score = ScoreStage([name], args.metric_size, nets, device=str(check.device), bf16=dtype_name == "bf16")
    frames = batches(records, args.batch_size)
    predict_s = score_s = 0.0
    refused = 0
    with torch.inference_mode():
        score(predict(frames[0].iloc[:1]))  # warm-up: one item, outside the timer
        check.sync()
        for df in frames:
            t0 = time.perf_counter()
            p = predict(df)
            check.sync()
            t1 = time.perf_counter()
            s = score(p)
            check.sync()
            predict_s, score_s = predict_s + t1 - t0, score_s + time.perf_counter() - t1
            refused += int((s["refused"] != "").sum())
    n, total = len(records), predict_s + score_s
    entry = {"model": name, "items": n, "batch_size": args.batch_size, "steps": args.steps}
    entry.update(guidance=args.guidance, metrics_dtype=dtype_name, bf16_autocast=score.bf16, refused=refused)
    entry.update(predict_s=predict_s, score_s=score_s, seconds=total, samples_per_s=n / total)
    entry.update(s_per_sample=total / n, samples_per_s_if_overlapped=n / max(predict_s, score_s))
    return entry
