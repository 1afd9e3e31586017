"""GPU check of the evaluation: the HPA score's feature networks at real size, the product's ScoreStage, and
RefLayer decomposition plus metrics, on one device without Ray; projects a 10K-sample test split on 8 GPUs.

Drives the PRODUCT's metric code (``reflade.eval``) with randomly initialised networks of the real shapes (no
download, no registry):

- ``networks``: LPIPS-alex (:func:`reflade.eval.features.build_lpips`: the ``lpips`` package's network with a
  random AlexNet backbone, its shipped linear heads), the CLIP ViT-L/14 vision tower (``CLIPVisionModelWithProjection``
  of ViT-L/14's config, random init) and FID's Inception-v3 (:func:`reflade.eval.networks.build_fid_inception`, pool
  features), each wrapped in the product's own callable (``_LPIPSNet``, ``_CLIPImageNet``, ``_PoolFeatureNet`` of
  :mod:`reflade.eval.networks`, built from the in-memory module and the spec :func:`load_network_folder` would read
  from a folder's ``reflade-net.json``; their resize and normalisation are part of the figures). Throughput of each
  alone: LPIPS pairs/s at ``--lpips-size`` (512), CLIP and Inception images/s at their own input size (224, 299),
  for each ``--*-batch``; warm-up calls excluded, the device synchronised around the timer.
  Without the ``lpips`` package the LPIPS figures are skipped (said so in the JSON and the table) and the stages
  below use a documented cost substitute (torchvision AlexNet features of both images, unit-normalised, squared
  difference averaged: LPIPS-alex's work without its heads), labelled ``lpips_substitute``.
- ``score_stage``: :class:`reflade.eval.scoring.ScoreStage` (weight-free metrics, S_vis, S_gen, FID features) over
  items made from synthetic scenes (:func:`reflade.engine.pipeline.synthetic_rows` -> Parquet round trip ->
  :func:`reflade.eval.scoring.expand_row`, prompt type ``text+box:fine``), predicted by a
  :class:`~reflade.eval.scoring.PredictStage` with ``copy-visible`` (no model) beforehand, outside the timer:
  samples/s of the metrics alone, ``--batch-size`` items per call as the job's batches. Then, once, the FID of the
  features through :func:`reflade.eval.fid.fid_from_moments` (a per-evaluation cost, seconds, not per sample).
- ``decompose``: RefLayer as ``bench/gpu_check.py`` builds it (``build_reflayer("sd3-medium")``, random init on the
  device; ``tiny`` on a CPU) through :meth:`RefLayerPipeline.decompose` at ``--resolution`` (1024), one item at a
  time: seconds per decomposition.
- ``e2e``: inference plus metrics, the job's two stages in one process: a ``PredictStage`` whose predictor is the
  product's :class:`~reflade.eval.predictors.DecomposerPredictor` over that pipeline (set on the stage's
  ``predictors`` attribute: the stage builds model predictors only from a registry reference), then ``ScoreStage``;
  samples/s over ``--e2e-items`` items in batches of ``--batch-size``.
- ``projection``: minutes for a 10,000-sample test split on 8 GPUs = 10000 / (8 * e2e samples/s) / 60, target
  <= 30 min, met or not met.

``--dtypes``: the metric networks' precision, each measured: ``bf16`` = float32 weights under
``torch.autocast(bfloat16)`` (this script wraps the stage call; default first on CUDA), ``fp32`` = as the product's
eval job runs them today (``load_feature_networks`` defaults to float32, no autocast). The first is the one used for
``e2e`` and the projection. ``--reflayer-weights``: RefLayer's weights (bf16 on CUDA, as serving runs them).

``--smoke``: a CPU run at tiny sizes in well under 2 minutes (the small stand-in CLIP config, the tiny RefLayer,
a few 64-px items, 2 steps, FID on 64 feature dimensions); covered by ``tests/eval/test_gpu_eval_script.py``.
The JSON (``--out``, default ``bench/results/gpu_eval.json``) is rewritten after every section: a later failure keeps
what was measured; a failed section records its error and the others still run.

    python bench/gpu_eval.py                       # real sizes on the GPU
    python bench/gpu_eval.py --smoke               # the CPU smoke run

On the lent GPU machine (Python 3.12, torch, torchvision, transformers, pandas, pyarrow, scipy, torchmetrics,
scikit-image, OpenCV; NO diffusers, lpips, importlib-metadata/lazy-importer, ray or boto3): carry the missing
pure-Python wheels in ``.whl`` (ignored by git); the script imports ``reflade`` from the source tree.

    # here, once (the versions of this venv):
    echo /.whl/ >> .git/info/exclude
    .venv/bin/pip wheel --no-deps -w .whl diffusers==0.42.1 lpips==0.1.4 importlib-metadata==10.2.0 \\
        lazy-importer==0.1.0
    # there: run(carry=[".whl"], timeout_s=540) with this command (about 3-5 min on an H100 at the defaults):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
    timeout 480 python3 bench/gpu_eval.py --out $OUT/gpu_eval.json 2>&1 | tee $OUT/gpu_eval.log

(``pip wheel --no-deps -w .whl . diffusers lpips`` also builds the project's own wheel; not needed: the source tree
is used.) Imports torch, torchvision, transformers, diffusers (the decomposition only), lpips, numpy, pandas,
pyarrow, OpenCV, scikit-image, torchmetrics; never ray or boto3 (``forbidden_modules`` in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib
import json
import os
import platform
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
FORBIDDEN = ("ray", "boto3", "botocore")
SECTIONS = ("networks", "score", "decompose", "e2e")

ANCHORS: dict[str, Any] = {
    "device": "H100, bf16 (the issue's figures)",
    "clip_vit_l14_images_per_s": 1800.0,
    "inception_v3_images_per_s": 5370.0,
    "lpips_alex_512_pairs_per_s": 3800.0,
    "decompose_1024_s": 1.1,
}
"""The issue's reference figures, for comparison only (comparable on an H100 at real size, not in a smoke run)."""
PROJECTION: dict[str, Any] = {"split_samples": 10000, "gpus": 8, "target_minutes": 30.0}

CLIP_VIT_L14: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 768,
}
"""OpenAI CLIP ViT-L/14's vision tower (the shapes of ``openai/clip-vit-large-patch14``)."""
DEFINITIONS: dict[str, str] = {
    "networks.<dtype>.<net>.per_s": "LPIPS pairs/s or images/s of the product's wrapper alone (resize and "
    "normalisation included), random inputs already on the device, best over --*-batch; mean over --iters calls "
    "after --warmup, device synchronised",
    "score_stage.<dtype>.samples_per_s": "items / seconds of ScoreStage calls over items already predicted by "
    "copy-visible (PNG decode, weight-free metrics, S_vis, S_gen, FID features; one model per item)",
    "inference.decompose.s_per_decomposition": "RefLayerPipeline.decompose of one item, mean over "
    "--decompose-iters after one warm-up call",
    "inference.e2e.samples_per_s": "items / (PredictStage with RefLayer + ScoreStage seconds), serial in one "
    "process, batches of --batch-size; the projection uses this",
    "inference.e2e.samples_per_s_if_overlapped": "items / max(predict_s, score_s): an upper bound if the two "
    "stages ran concurrently (the job's two actor pools)",
    "inference.serial_estimate_samples_per_s": "1 / (s_per_decomposition + 1 / ScoreStage samples_per_s)",
    "bf16": "float32 weights under torch.autocast(bfloat16) (this script's wrapper); the product's eval job "
    "today runs the networks in float32 without autocast (the fp32 figures)",
    "scope": "the job also scores the copy-visible and classical baselines for every item (not in e2e), and "
    "reads, writes and reports through Ray Data: not measured here",
}
PROMPT_TYPE = "text+box:fine"
"""The paper's evaluation prompt (``reflade.eval.config.DEFAULT_PROMPT_TYPES``): one item per dataset row."""

# Per-mode defaults: (real sizes, --smoke). None in parse_args picks from here.
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "warmup": (3, 1),
    "iters": (10, 2),
    "lpips_batch": ([64], [4]),
    "lpips_size": (512, 64),
    "clip_batch": ([64, 256], [4]),
    "inception_batch": ([64, 256], [4]),
    "items": (128, 6),
    "batch_size": (8, 3),
    "metric_size": (256, 64),
    "scene_size": (512, 64),
    "preset": ("sd3-medium", "tiny"),
    "resolution": (1024, 64),
    "steps": (28, 2),
    "decompose_iters": (3, 2),
    "e2e_items": (16, 4),
    "fid_dims": (0, 64),
}


def ensure_reflade() -> str:
    """Make ``reflade.eval`` importable: the installed package, else this source tree (as bench/gpu_check.py)."""
    try:
        importlib.import_module("reflade.eval.scoring")
        return "installed"
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "reflade" or m.startswith("reflade.")]:
        del sys.modules[name]
    pkg = types.ModuleType("reflade")
    pkg.__path__ = [str(ROOT)]  # reflade.eval -> ROOT/eval, as [tool.setuptools.package-dir] maps it
    sys.modules["reflade"] = pkg
    importlib.import_module("reflade.eval.scoring")
    return f"source tree {ROOT}"


def forbidden_modules() -> list[str]:
    return sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in FORBIDDEN})


def lpips_importable() -> str | None:
    """None when the ``lpips`` package imports, else why not."""
    try:
        importlib.import_module("lpips")
        return None
    except Exception as exc:  # noqa: BLE001 - any import failure means no LPIPS
        return f"{type(exc).__name__}: {exc}"


def device_info(device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, memory_gib=p.total_memory / 2**30, cuda=torch.version.cuda)
    else:
        info["name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    for mod in ("diffusers", "transformers", "torchvision", "lpips"):
        try:
            info[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


def projection(samples_per_s: float, spec: dict[str, Any] = PROJECTION) -> dict[str, Any]:
    """Minutes for ``split_samples`` samples on ``gpus`` GPUs at ``samples_per_s`` each, against the target."""
    minutes = spec["split_samples"] / (spec["gpus"] * samples_per_s) / 60.0
    met = minutes <= spec["target_minutes"]
    return {
        **spec,
        "samples_per_s_per_gpu": samples_per_s,
        "minutes": minutes,
        "met": met,
        "verdict": "met" if met else "not met",
        "formula": "split_samples / (gpus * samples_per_s_per_gpu) / 60",
    }


class _AlexDistance:
    """LPIPS-alex's cost without the ``lpips`` package: torchvision AlexNet features (random init) of both images at
    LPIPS's five ReLU taps, unit-normalised per position, squared difference averaged -> B. NOT LPIPS (no linear
    heads, no scaling layer): a throughput substitute only, labelled ``lpips_substitute`` wherever used."""

    @staticmethod
    def build():
        import torch
        from torchvision.models import alexnet

        class AlexDistance(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.features = alexnet(weights=None).features
                self.taps = {1, 4, 7, 9, 11}  # the ReLUs LPIPS's slices end at

            def forward(self, a, b):
                x = torch.cat([a, b])
                total = 0.0
                for i, layer in enumerate(self.features):
                    x = layer(x)
                    if i in self.taps:
                        f = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                        fa, fb = f.chunk(2)
                        total = total + (fa - fb).pow(2).sum(1).mean((1, 2))
                    if i == max(self.taps):
                        break
                return total

        return AlexDistance()


class EvalCheck:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.torch = torch
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.out = Path(args.out)
        self.lpips_missing = lpips_importable()
        self.result: dict[str, Any] = {
            "script": "bench/gpu_eval.py",
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "smoke": bool(args.smoke),
            "device": device_info(self.device),
            "dtype": args.dtypes[0],
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "anchors": ANCHORS,
            "definitions": DEFINITIONS,
            "networks": {},
            "score_stage": {},
            "inference": {},
            "projection": None,
            "errors": {},
            "notes": [],
        }
        if self.lpips_missing:
            self.note(
                f"lpips is not importable ({self.lpips_missing}): LPIPS figures skipped; ScoreStage uses "
                "lpips_substitute (AlexNet features, not LPIPS) so that its figures still count LPIPS-like work"
            )

    # ------------------------------------------------------------------ bookkeeping
    def note(self, text: str) -> None:
        self.result["notes"].append(text)
        print(f"note: {text}", flush=True)

    def save(self) -> None:
        self.result["forbidden_modules"] = forbidden_modules()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.out)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        if not self.cuda:
            return None
        return self.torch.cuda.max_memory_allocated(self.device) / 2**30

    def wanted(self, section: str) -> bool:
        return not self.args.only or section in self.args.only

    def section(self, name: str, fn) -> Any:
        """Run one measurement; record its error instead of raising, and save the JSON either way."""
        self.reset_peak()
        t0 = time.perf_counter()
        try:
            value = fn()
            if isinstance(value, dict):
                value.setdefault("peak_gib", self.peak_gib())
                value["section_wall_s"] = time.perf_counter() - t0
            return value
        except Exception as exc:  # noqa: BLE001 - a failed section must not lose the others
            msg = f"{type(exc).__name__}: {exc}"
            self.result["errors"][name] = {"error": msg[:2000], "traceback": traceback.format_exc()[-4000:]}
            print(f"{name:<36} FAILED {msg[:300]}", flush=True)
            if self.cuda:
                self.torch.cuda.empty_cache()
            return None
        finally:
            self.save()

    def timed(self, fn, warmup: int, iters: int) -> float:
        """Seconds per call of ``fn`` (mean over ``iters`` after ``warmup`` calls), device synchronised."""
        for _ in range(warmup):
            fn()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / iters

    def autocast(self, dtype_name: str):
        """bf16: ``torch.autocast(bfloat16)`` around the product's calls (weights stay float32); fp32: nothing."""
        if dtype_name == "bf16":
            return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ the metric networks
    def _finish(self, net):
        """As :func:`reflade.eval.networks.load_network_folder` ends: on the device, float32, eval, no grads."""
        net.to(device=self.device)
        net.model.to(dtype=self.torch.float32)
        net.eval().requires_grad_(False)
        return net

    def build_networks(self):
        torch = self.torch
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        from reflade.eval.network_convert import TINY_CLIP_VISION_CONFIG
        from reflade.eval.networks import (
            FeatureNetworks,
            _CLIPImageNet,
            _LPIPSNet,
            _PoolFeatureNet,
            build_fid_inception,
        )

        def count(m) -> int:
            return sum(p.numel() for p in m.parameters())

        torch.manual_seed(0)
        info: dict[str, Any] = {}
        t0 = time.perf_counter()
        if self.lpips_missing:
            lp = _AlexDistance.build()
            lp_spec = {"network": "lpips", "arch": "lpips_substitute", "config": {}, "random_init": True}
        else:
            from reflade.eval.features import build_lpips

            lp = build_lpips("alex")  # pnet_rand=True inside: random AlexNet, the package's linear heads
            lp_spec = {"network": "lpips", "arch": "alexnet-features", "config": {}, "random_init": True}
        lpips_net = self._finish(_LPIPSNet(lp, "lpips", lp_spec))
        info["lpips"] = {"arch": lp_spec["arch"], "params": count(lp), "substitute": bool(self.lpips_missing)}

        clip_cfg = TINY_CLIP_VISION_CONFIG if self.args.smoke else CLIP_VIT_L14
        with torch.device(self.device):  # random init where it runs (fast on a GPU)
            clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_cfg))
        clip_spec = {
            "network": "clip",
            "arch": "clip-vision",
            "config": {
                "image_size": clip_cfg["image_size"],
                "mean": OPENAI_CLIP_MEAN,
                "std": OPENAI_CLIP_STD,
            },
            "random_init": True,
        }
        clip_net = self._finish(_CLIPImageNet(clip, "clip", clip_spec))
        info["clip"] = {
            "arch": "clip-vision",
            "config": "tiny stand-in (reflade.eval.network_convert.TINY_CLIP_VISION_CONFIG)"
            if self.args.smoke
            else "ViT-L/14",
            "vision_config": clip_cfg,
            "attn_implementation": getattr(clip.config, "_attn_implementation", None),
            "params": count(clip),
        }

        with torch.device(self.device):
            inception = build_fid_inception()
        inception.fc = torch.nn.Identity()  # the 2048-d pool features, as load_network_folder does
        inc_spec = {"network": "inception", "arch": "inception-v3-fid", "config": {"image_size": 299}}
        inc_net = self._finish(_PoolFeatureNet(inception, "inception", {**inc_spec, "random_init": True}))
        info["inception"] = {"arch": "inception-v3-fid", "params": count(inception)}
        self.sync()
        info["build_s"] = time.perf_counter() - t0
        self.result["networks"]["build"] = info
        print(f"built metric networks in {info['build_s']:.1f} s", flush=True)
        return FeatureNetworks(
            lpips=lpips_net,
            clip=clip_net,
            inception=inc_net,
            refs={k: f"random-init:{info[k]['arch']}" for k in ("lpips", "clip", "inception")},
            stand_in=True,
            device=self.device,
        )

    def measure_networks(self, nets, dtype_name: str) -> None:
        torch = self.torch
        args = self.args
        out = self.result["networks"].setdefault(dtype_name, {})
        g = torch.Generator(device="cpu").manual_seed(1)

        def rand(b: int, side: int, lo: float = 0.0):
            x = torch.rand(b, 3, side, side, generator=g)
            return (x * (1.0 - lo) + lo).to(self.device)  # lo = -1: [-1, 1] (LPIPS's convention)

        cases = []
        if not self.lpips_missing:
            cases.append(("lpips", args.lpips_batch, args.lpips_size, "pairs/s"))
        else:
            out["lpips"] = {"skipped": f"lpips is not importable ({self.lpips_missing})"}
            print(f"{'lpips_alex':<28}{dtype_name:>6}  skipped: lpips is not importable", flush=True)
        cases.append(("clip", args.clip_batch, nets.clip.size, "images/s"))
        cases.append(("inception", args.inception_batch, nets.inception.size, "images/s"))
        for name, batches, side, unit in cases:

            def run(name=name, batches=batches, side=side, unit=unit):
                net = getattr(nets, name)
                entry: dict[str, Any] = {"unit": unit, "input_px": side, "batches": {}}
                for b in batches:
                    if name == "lpips":
                        a, c = rand(b, side, -1.0), rand(b, side, -1.0)

                        def call(a=a, c=c, net=net):
                            return net(a, c)
                    else:
                        x = rand(b, side)

                        def call(x=x, net=net):
                            return net(x)

                    with torch.inference_mode(), self.autocast(dtype_name):
                        sec = self.timed(call, args.warmup, args.iters)
                    entry["batches"][str(b)] = {"s_per_batch": sec, "per_s": b / sec}
                best = max(entry["batches"].items(), key=lambda kv: kv[1]["per_s"])
                entry["batch"], entry["per_s"] = int(best[0]), best[1]["per_s"]
                return entry

            entry = self.section(f"networks_{dtype_name}_{name}", run)
            if entry:
                out[name] = entry
                each = ", ".join(f"b{k}: {v['per_s']:.1f}" for k, v in entry["batches"].items())
                print(
                    f"{name:<28}{dtype_name:>6}{entry['batch']:>6}{entry['per_s']:>12.1f} {unit}  ({each})",
                    flush=True,
                )

    # ------------------------------------------------------------------ items
    def make_items(self, n: int) -> list[dict[str, Any]]:
        """``n`` item records of synthetic scenes (foreground and background rows), as the job reads them."""
        from reflade.engine.config import EngineConfig
        from reflade.engine.pipeline import synthetic_rows
        from reflade.engine.schema import rows_to_table, table_to_rows
        from reflade.engine.synth import make_scenes
        from reflade.eval.scoring import expand_row

        side = self.args.scene_size
        items: list[dict[str, Any]] = []
        cfg = EngineConfig()
        for i, scene in enumerate(make_scenes(max(n, 1) * 4, seed=0, size=(side, side), n_objects=(2, 3))):
            rows = synthetic_rows(scene, f"scene{i}", "gpu-eval", "test", cfg)
            rows = table_to_rows(rows_to_table(rows))  # as Ray Data hands them over from the Parquet shards
            items += [rec for row in rows for rec in expand_row(row, [PROMPT_TYPE])]
            if len(items) >= n:
                break
        if len(items) < n:
            raise RuntimeError(f"only {len(items)} items of type {PROMPT_TYPE} from the synthetic scenes")
        return items[:n]

    @staticmethod
    def batches(records: list[dict[str, Any]], size: int):
        import pandas as pd

        return [pd.DataFrame(records[i : i + size]) for i in range(0, len(records), size)]

    # ------------------------------------------------------------------ the ScoreStage
    def score_case(self, nets, records, dtype_name: str, with_fid: bool) -> dict[str, Any]:
        import numpy as np

        from reflade.eval.fid import FeatureMoments, fid_from_moments
        from reflade.eval.scoring import PredictStage, ScoreStage

        args = self.args
        models = ["copy-visible"]
        predict = PredictStage(models, args.metric_size, seed=0)
        t0 = time.perf_counter()
        predicted = [predict(df) for df in self.batches(records, args.batch_size)]
        predict_s = time.perf_counter() - t0
        score = ScoreStage(models, args.metric_size, nets, device=str(self.device))
        with self.autocast(dtype_name):
            score(predicted[0])  # warm-up: the first batch again (kernels, allocator), outside the timer
            self.sync()
            t0 = time.perf_counter()
            scored = [score(df) for df in predicted]
            self.sync()
        seconds = time.perf_counter() - t0
        n = sum(len(df) for df in predicted)
        rows = [r for df in scored for r in df.to_dict("records")]
        ok = len(rows) == n and all(
            np.isfinite(r["s_vis"]) and np.isfinite(r["s_gen"]) and len(r["feat_pred"]) > 0 for r in rows
        )
        entry = {
            "models": models,
            "items": n,
            "batch_size": args.batch_size,
            "metric_size": args.metric_size,
            "scene_px": args.scene_size,
            "seconds": seconds,
            "samples_per_s": n / seconds,
            "s_per_sample": seconds / n,
            "copy_visible_predict_s": predict_s,
            "output_ok": bool(ok),
            "feature_dim": len(rows[0]["feat_pred"]) if rows else None,
        }
        if with_fid:
            dims = args.fid_dims or None
            by_kind: dict[str, tuple[FeatureMoments, FeatureMoments]] = {}
            for r in rows:
                pred, gt = np.asarray([r["feat_pred"]])[:, :dims], np.asarray([r["feat_gt"]])[:, :dims]
                if r["kind"] not in by_kind:
                    by_kind[r["kind"]] = (
                        FeatureMoments.empty(pred.shape[1]),
                        FeatureMoments.empty(pred.shape[1]),
                    )
                by_kind[r["kind"]][0].update(pred)
                by_kind[r["kind"]][1].update(gt)
            kind, (fake, real) = max(by_kind.items(), key=lambda kv: kv[1][0].n)
            t0 = time.perf_counter()
            value = fid_from_moments(real, fake)
            entry["fid_compute"] = {
                "kind": kind,
                "n": real.n,
                "dims": real.total.shape[0],
                "seconds": time.perf_counter() - t0,
                "value": value,
                "note": "fid_from_moments once per layer kind per evaluation (torchmetrics, float64 on the CPU); "
                "a fixed cost, not per sample" + (f"; smoke: first {dims} feature dims only" if dims else ""),
            }
        return entry

    # ------------------------------------------------------------------ RefLayer
    def build_reflayer(self):
        torch = self.torch
        from reflade.train.model import build_reflayer, count_parameters

        args = self.args
        overrides = {"num_layers": args.layers} if args.layers else {}
        t0 = time.perf_counter()
        if args.preset == "tiny":
            from reflade.train.vae import build_tiny_vae

            bundle = build_reflayer(
                "tiny", vae=build_tiny_vae(seed=0), resolution=args.resolution, **overrides
            )
        else:
            with torch.device(self.device):  # 2 B random weights: drawn on the GPU, not the CPU
                bundle = build_reflayer("sd3-medium", resolution=args.resolution, **overrides)
        bundle.to(self.device)
        if args.reflayer_weights == "bf16":
            bundle.to(dtype=torch.bfloat16)
        bundle.model.eval()
        for p in bundle.model.parameters():
            p.requires_grad_(False)
        self.sync()
        self.result["inference"]["build"] = {
            "preset": args.preset,
            "resolution": bundle.resolution,
            "weights": args.reflayer_weights,
            "seconds": time.perf_counter() - t0,
            "params_reflayer": count_parameters(bundle.model),
            "params_vae": count_parameters(bundle.vae),
        }
        print(f"built RefLayer {args.preset}: {json.dumps(self.result['inference']['build'])}", flush=True)
        return bundle

    def decompose_case(self, pipe, record: dict[str, Any]) -> dict[str, Any]:
        from reflade.eval.scoring import item_from_record

        args = self.args
        it = item_from_record(record)

        def run():
            return pipe.decompose(
                [it.image], [it.prompt], [it.kind], steps=args.steps, guidance=args.guidance, seeds=0
            )

        with self.torch.inference_mode():
            sec = self.timed(run, 1, args.decompose_iters)
            out = run()
        ok = len(out) == 1 and out[0].shape == (*it.image.shape[:2], 4) and out[0].dtype.name == "uint8"
        return {
            "resolution": pipe.bundle.resolution,
            "steps": args.steps,
            "guidance": args.guidance,
            "kind": it.kind,
            "image_px": list(it.image.shape[:2]),
            "batch": 1,
            "s_per_decomposition": sec,
            "output_ok": bool(ok),
        }

    def e2e_case(self, pipe, nets, records, dtype_name: str) -> dict[str, Any]:
        from reflade.eval.predictors import DecomposerPredictor
        from reflade.eval.scoring import PredictStage, ScoreStage

        args = self.args
        name = pipe.name
        predict = PredictStage(["copy-visible"], args.metric_size, seed=0)
        # The product builds a model's predictor only from a registry reference; this is the one it would build.
        predict.predictors = [DecomposerPredictor(pipe, name, steps=args.steps, guidance=args.guidance)]
        score = ScoreStage([name], args.metric_size, nets, device=str(self.device))
        frames = self.batches(records, args.batch_size)
        with self.torch.inference_mode():
            with self.autocast(dtype_name):
                score(predict(frames[0].iloc[:1]))  # warm-up: one item, outside the timer
            self.sync()
            predict_s = score_s = 0.0
            refused = 0
            for df in frames:
                t0 = time.perf_counter()
                p = predict(df)
                self.sync()
                t1 = time.perf_counter()
                with self.autocast(dtype_name):
                    s = score(p)
                self.sync()
                t2 = time.perf_counter()
                predict_s += t1 - t0
                score_s += t2 - t1
                refused += int((s["refused"] != "").sum())
        n = len(records)
        total = predict_s + score_s
        return {
            "model": name,
            "items": n,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "guidance": args.guidance,
            "metrics_dtype": dtype_name,
            "refused": refused,
            "predict_s": predict_s,
            "score_s": score_s,
            "seconds": total,
            "samples_per_s": n / total,
            "s_per_sample": total / n,
            "samples_per_s_if_overlapped": n / max(predict_s, score_s),
        }

    # ------------------------------------------------------------------ the whole check
    def run(self) -> None:
        args = self.args
        primary = args.dtypes[0]
        need_nets = any(self.wanted(s) for s in ("networks", "score", "e2e"))
        nets = self.section("build_networks", self.build_networks) if need_nets else None
        if nets is not None and self.wanted("networks"):
            for dtype_name in args.dtypes:
                self.measure_networks(nets, dtype_name)

        records: list[dict[str, Any]] = []
        if any(self.wanted(s) for s in ("score", "decompose", "e2e")):
            t0 = time.perf_counter()
            records = self.section("items", lambda: self.make_items(max(args.items, args.e2e_items))) or []
            self.result["items_build_s"] = time.perf_counter() - t0

        if nets is not None and records and self.wanted("score"):
            for dtype_name in args.dtypes:
                entry = self.section(
                    f"score_stage_{dtype_name}",
                    lambda d=dtype_name: self.score_case(
                        nets, records[: args.items], d, with_fid=d == primary and args.fid
                    ),
                )
                if entry:
                    self.result["score_stage"][dtype_name] = entry
                    print(
                        f"{'score_stage (copy-visible)':<28}{dtype_name:>6}{args.batch_size:>6}"
                        f"{entry['samples_per_s']:>12.2f} samples/s  ({entry['items']} items, "
                        f"{args.metric_size} px metric frame)",
                        flush=True,
                    )

        if records and (self.wanted("decompose") or self.wanted("e2e")):
            bundle = self.section("build_reflayer", self.build_reflayer)
            if bundle is not None:
                from reflade.train.pipeline_reflayer import RefLayerPipeline

                pipe = RefLayerPipeline(bundle, mixed_precision=self.cuda)
                inf = self.result["inference"]
                if self.wanted("decompose"):
                    fg = next((r for r in records if r["kind"] == "foreground"), records[0])
                    entry = self.section("decompose", lambda: self.decompose_case(pipe, fg))
                    if entry:
                        inf["decompose"] = entry
                        print(
                            f"{'decompose':<28}{args.reflayer_weights:>6}{1:>6}"
                            f"{entry['s_per_decomposition']:>12.3f} s  ({entry['resolution']} px, "
                            f"{args.steps} steps)",
                            flush=True,
                        )
                if nets is not None and self.wanted("e2e"):
                    entry = self.section(
                        "e2e", lambda: self.e2e_case(pipe, nets, records[: args.e2e_items], primary)
                    )
                    if entry:
                        inf["e2e"] = entry
                        print(
                            f"{'inference + metrics':<28}{primary:>6}{args.batch_size:>6}"
                            f"{entry['samples_per_s']:>12.3f} samples/s  (predict {entry['predict_s']:.2f} s, "
                            f"score {entry['score_s']:.2f} s, {entry['items']} items)",
                            flush=True,
                        )
                dec, sc = inf.get("decompose"), self.result["score_stage"].get(primary)
                if dec and sc:
                    inf["serial_estimate_samples_per_s"] = 1.0 / (
                        dec["s_per_decomposition"] + 1.0 / sc["samples_per_s"]
                    )
                del pipe, bundle
                self.reset_peak()

        e2e = self.result["inference"].get("e2e")
        if e2e:
            self.result["projection"] = {
                **projection(e2e["samples_per_s"]),
                "from": "inference.e2e.samples_per_s",
            }
        self.result["comparison"] = self.comparison()

    def comparison(self) -> dict[str, Any]:
        """Each measured figure beside its anchor (ratio measured / anchor; for seconds, anchor / measured)."""
        primary = self.args.dtypes[0]
        nets = self.result["networks"].get(primary, {})
        dec = self.result["inference"].get("decompose") or {}
        pairs = {
            "clip_vit_l14_images_per_s": (nets.get("clip") or {}).get("per_s"),
            "inception_v3_images_per_s": (nets.get("inception") or {}).get("per_s"),
            "lpips_alex_512_pairs_per_s": (nets.get("lpips") or {}).get("per_s"),
            "decompose_1024_s": dec.get("s_per_decomposition"),
        }
        out: dict[str, Any] = {"comparable": not self.args.smoke and self.cuda}
        for key, measured in pairs.items():
            anchor = ANCHORS[key]
            speed = None
            if measured:
                speed = (
                    anchor / measured
                    if key.endswith("_s") and not key.endswith("per_s")
                    else measured / anchor
                )
            out[key] = {"measured": measured, "anchor": anchor, "speed_vs_anchor": speed}
        return out


def print_table(result: dict[str, Any]) -> None:
    dev = result["device"]
    primary = result["dtype"]
    smoke = " (SMOKE: tiny sizes, not comparable with the anchors)" if result["smoke"] else ""
    print(f"\nEvaluation GPU check on {dev.get('name', dev['type'])}, metrics {primary}{smoke}")
    print(f"{'figure':<34}{'dtype':>6}{'batch':>6}{'measured':>12}  {'unit':<10}{'anchor':>9}{'x anchor':>9}")
    comp = result.get("comparison") or {}

    def line(name, dtype, batch, value, unit, anchor_key=None, rated=None):
        a = comp.get(anchor_key) if anchor_key else None
        anchor = f"{a['anchor']:>9g}" if a else f"{'':>9}"
        comparable = comp.get("comparable") and (dtype == primary if rated is None else rated)
        ratio = f"{a['speed_vs_anchor']:>9.2f}" if a and a.get("speed_vs_anchor") and comparable else ""
        v = f"{value:>12.3f}" if isinstance(value, float) else f"{value!s:>12}"
        print(f"{name:<34}{dtype:>6}{batch!s:>6}{v}  {unit:<10}{anchor}{ratio}")

    keys = {"lpips": "lpips_alex_512_pairs_per_s", "clip": "clip_vit_l14_images_per_s",
            "inception": "inception_v3_images_per_s"}  # fmt: skip
    for dtype, nets in result["networks"].items():
        if dtype == "build":
            continue
        for name, e in nets.items():
            label = f"{name} ({e.get('input_px', '-')} px)"
            if e.get("skipped"):
                print(f"{name:<34}{dtype:>6}  skipped: {e['skipped'][:80]}")
            else:
                line(label, dtype, e["batch"], e["per_s"], e["unit"], keys[name])
    for dtype, e in result["score_stage"].items():
        line("ScoreStage (metrics alone)", dtype, e["batch_size"], e["samples_per_s"], "samples/s")
        if e.get("fid_compute"):
            f = e["fid_compute"]
            line(f"fid_from_moments ({f['dims']} dims)", dtype, f["n"], f["seconds"], "s (once)")
    inf = result["inference"]
    if inf.get("decompose"):
        d = inf["decompose"]
        wd = result["settings"]["reflayer_weights"]
        line(f"decompose {d['resolution']} px, {d['steps']} steps", wd, 1, d["s_per_decomposition"], "s",
             "decompose_1024_s", rated=True)  # fmt: skip
    if inf.get("e2e"):
        e = inf["e2e"]
        line("inference + metrics (serial)", primary, e["batch_size"], e["samples_per_s"], "samples/s")
        line(
            "  if the stages overlapped",
            primary,
            e["batch_size"],
            e["samples_per_s_if_overlapped"],
            "samples/s",
        )
    if inf.get("serial_estimate_samples_per_s"):
        line(
            "  1/(decompose + 1/ScoreStage)", primary, "-", inf["serial_estimate_samples_per_s"], "samples/s"
        )
    p = result.get("projection")
    if p:
        print(
            f"\nprojection: {p['split_samples']} samples on {p['gpus']} GPUs at {p['samples_per_s_per_gpu']:.3f} "
            f"samples/s each: {p['minutes']:.1f} min (target <= {p['target_minutes']:g} min): {p['verdict'].upper()}"
        )
    else:
        print("\nprojection: not computed (no inference + metrics figure)")
    for note in result["notes"]:
        print(f"note: {note}")
    for name, e in result["errors"].items():
        print(f"{name:<34} FAILED {e['error'][:200]}")
    print(f"forbidden modules loaded: {result.get('forbidden_modules') or 'none'}")


def _pick(args: argparse.Namespace, name: str) -> None:
    if getattr(args, name) is None:
        setattr(args, name, DEFAULTS[name][1 if args.smoke else 0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke run: tiny CLIP config, tiny RefLayer, a few 64-px items, 2 steps")  # fmt: skip
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu; smoke: cpu)"
    )
    p.add_argument("--dtypes", nargs="+", choices=("bf16", "fp32"), default=None,
                   help="metric networks' precision, each measured; the first drives e2e and the projection "
                        "(default: bf16 fp32 on CUDA, fp32 on the CPU)")  # fmt: skip
    p.add_argument("--reflayer-weights", choices=("bf16", "fp32"), default=None,
                   help="RefLayer's weights (default bf16 on CUDA, fp32 on the CPU)")  # fmt: skip
    p.add_argument(
        "--warmup", type=int, default=None, help="warm-up calls per network figure (default 3; smoke 1)"
    )
    p.add_argument(
        "--iters", type=int, default=None, help="timed calls per network figure (default 10; smoke 2)"
    )
    p.add_argument(
        "--lpips-batch", type=int, nargs="+", default=None, help="LPIPS pairs per call (default 64)"
    )
    p.add_argument(
        "--lpips-size", type=int, default=None, help="LPIPS input side in px (default 512; smoke 64)"
    )
    p.add_argument(
        "--clip-batch", type=int, nargs="+", default=None, help="CLIP images per call (default 64 256)"
    )
    p.add_argument("--inception-batch", type=int, nargs="+", default=None,
                   help="Inception images per call (default 64 256)")  # fmt: skip
    p.add_argument("--items", type=int, default=None, help="items through ScoreStage (default 128; smoke 6)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="items per stage call, as eval.batch_size (default 8; smoke 3)")  # fmt: skip
    p.add_argument("--metric-size", type=int, default=None,
                   help="eval.metric_size, the metric frame's longest side (default 256; smoke 64)")  # fmt: skip
    p.add_argument("--scene-size", type=int, default=None, help="synthetic scenes' side in px (default 512)")
    p.add_argument("--preset", choices=("sd3-medium", "tiny"), default=None,
                   help="RefLayer preset (default sd3-medium; smoke tiny)")  # fmt: skip
    p.add_argument("--layers", type=int, default=None, help="override the transformer's depth (shape checks)")
    p.add_argument(
        "--resolution", type=int, default=None, help="decomposition resolution (default 1024; smoke 64)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="sampling steps (default 28, the anchor's; smoke 2)"
    )
    p.add_argument("--guidance", type=float, default=1.0, help="guidance scale (default 1, as eval.guidance)")
    p.add_argument(
        "--decompose-iters", type=int, default=None, help="timed decompositions (default 3; smoke 2)"
    )
    p.add_argument(
        "--e2e-items", type=int, default=None, help="items through inference + metrics (default 16)"
    )
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True,
                   help="time fid_from_moments once on the ScoreStage features (default on)")  # fmt: skip
    p.add_argument("--fid-dims", type=int, default=None,
                   help="use only the first N feature dims for the FID timing (0: all 2048; smoke 64)")  # fmt: skip
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (default: torch's defaults)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run only these sections")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_eval.json)")
    args = p.parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    cuda = args.device.startswith("cuda")
    for name in DEFAULTS:
        _pick(args, name)
    args.dtypes = args.dtypes or (["bf16", "fp32"] if cuda else ["fp32"])
    args.reflayer_weights = args.reflayer_weights or ("bf16" if cuda else "fp32")
    for name in ("items", "batch_size", "e2e_items", "steps", "iters", "decompose_iters", "metric_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.metric_size < 16:
        p.error("--metric-size must be at least 16 (eval.metric_size's minimum)")
    args.out = args.out or str(RESULTS / "gpu_eval.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    source = ensure_reflade()
    check = EvalCheck(args)
    check.result["reflade"] = source
    if check.cuda:
        if args.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
        check.result["settings"]["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        check.result["settings"]["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    t0 = time.perf_counter()
    try:
        check.run()
    except Exception as exc:  # noqa: BLE001 - keep what was measured
        check.result["errors"]["run"] = {
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
        print(traceback.format_exc(), file=sys.stderr)
    check.result["wall_s"] = time.perf_counter() - t0
    check.result["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    check.save()
    print_table(check.result)
    print(f"wrote {check.out}")
    return 1 if check.result["errors"] else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
