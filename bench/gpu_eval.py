"""GPU check of the evaluation: the HPA score's feature networks at real size, the product's ScoreStage, and
RefLayer decomposition plus metrics, on one device without Ray; projects a 10K-sample test split on 8 GPUs.

Drives the PRODUCT's metric code (``reflade.eval``) with randomly initialised networks of the real shapes (no
download, no registry). Sections (``--only`` picks some):

- ``networks`` (bench/_gpu_eval_networks.py): LPIPS-alex pairs/s at ``--lpips-size`` (512), CLIP ViT-L/14 and FID's
  Inception-v3 images/s at their own input size (224, 299), each alone in the product's wrapper, for each
  ``--*-batch``; warm-up calls excluded, the device synchronised around the timer. Without the ``lpips`` package the
  LPIPS figures are skipped (said so in the JSON and the table) and the stages below use a labelled cost substitute
  (``lpips_substitute``);
- ``score`` (bench/_gpu_eval_inference.py, as the next two): ScoreStage samples/s over synthetic-scene items
  predicted by ``copy-visible`` beforehand, ``--batch-size`` items per call; then FID from the moments, once;
- ``decompose``: RefLayer (``build_reflayer("sd3-medium")``, random init on the device; ``tiny`` on a CPU) through
  ``RefLayerPipeline.decompose`` at ``--resolution`` (1024): seconds per decomposition;
- ``e2e``: inference plus metrics, a PredictStage with the product's DecomposerPredictor then ScoreStage, over
  ``--e2e-items`` items in batches of ``--batch-size``;
- ``projection``: minutes for a 10,000-sample test split on 8 GPUs = 10000 / (8 * e2e samples/s) / 60, target
  <= 30 min, met or not met; each figure beside the issue's anchors (H100, bf16).

``--dtypes``: the metric networks' precision, each measured: ``bf16`` = ``ScoreStage(bf16=True)``, the product's
``eval.bf16`` (its default on CUDA: float32 weights under bf16 autocast; the networks alone under the same autocast),
``fp32`` = ``eval.bf16`` off. The first is the one used for ``e2e`` and the projection. ``--reflayer-weights``:
RefLayer's weights (bf16 on CUDA, as serving runs them).

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
import datetime as _dt
import gc
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # bench/ is no package (runpy does not add it)
    sys.path.append(str(Path(__file__).resolve().parent))
import _bench_machine as bm  # noqa: E402
import _gpu_eval_inference as inference  # noqa: E402
import _gpu_eval_networks as networks  # noqa: E402

gpu_check = bm.sibling("gpu_check")  # forbidden_modules, device_info
RESULTS = Path(__file__).resolve().parent / "results"
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
    "bf16": "ScoreStage(bf16=True), the product's eval.bf16 (on by default on CUDA): float32 weights under "
    "torch.autocast(bfloat16) inside the stage (bf16_autocast says whether it applied: CUDA only); the networks "
    "alone under the same autocast; fp32: eval.bf16 off",
    "scope": "the job also scores the copy-visible and classical baselines for every item (not in e2e), and "
    "reads, writes and reports through Ray Data: not measured here",
}

# Options with per-mode defaults: name -> (real sizes, --smoke, help). None in parse_args picks from here.
DEFAULTS: dict[str, tuple[Any, Any, str]] = {
    "warmup": (3, 1, "warm-up calls per network figure"),
    "iters": (10, 2, "timed calls per network figure"),
    "lpips_batch": ([64], [4], "LPIPS pairs per call"),
    "lpips_size": (512, 64, "LPIPS input side in px"),
    "clip_batch": ([64, 256], [4], "CLIP images per call"),
    "inception_batch": ([64, 256], [4], "Inception images per call"),
    "items": (128, 6, "items through ScoreStage"),
    "batch_size": (8, 3, "items per stage call, as eval.batch_size"),
    "metric_size": (256, 64, "eval.metric_size, the metric frame's longest side"),
    "scene_size": (512, 64, "synthetic scenes' side in px"),
    "preset": ("sd3-medium", "tiny", "RefLayer preset (sd3-medium or tiny)"),
    "resolution": (1024, 64, "decomposition resolution"),
    "steps": (28, 2, "sampling steps (28: the anchor's)"),
    "decompose_iters": (3, 2, "timed decompositions"),
    "e2e_items": (16, 4, "items through inference + metrics"),
    "fid_dims": (0, 64, "use only the first N feature dims for the FID timing (0: all 2048)"),
}


def lpips_importable() -> str | None:
    """None when the ``lpips`` package imports, else why not."""
    try:
        importlib.import_module("lpips")
        return None
    except Exception as exc:  # noqa: BLE001 - any import failure means no LPIPS
        return f"{type(exc).__name__}: {exc}"


def device_info(device) -> dict[str, Any]:
    """bench/gpu_check.py's (torch, CUDA, diffusers, transformers), plus the CPU's name and torchvision's and
    lpips's versions."""
    info = gpu_check.device_info(device)
    if device.type != "cuda":
        info["name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    for mod in ("torchvision", "lpips"):
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


class EvalCheck:
    """The run: its device, arguments and JSON result, the section bookkeeping, and the order of the sections."""

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
        self.result["forbidden_modules"] = gpu_check.forbidden_modules()
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
        return self.torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

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

    # ------------------------------------------------------------------ the whole check
    def run(self) -> None:
        args, primary = self.args, self.args.dtypes[0]
        need_nets = any(self.wanted(s) for s in ("networks", "score", "e2e"))
        nets = self.section("build_networks", lambda: networks.build_networks(self)) if need_nets else None
        if nets is not None and self.wanted("networks"):
            for dtype_name in args.dtypes:
                networks.measure_networks(self, nets, dtype_name)

        records: list[dict[str, Any]] = []
        if any(self.wanted(s) for s in ("score", "decompose", "e2e")):
            t0 = time.perf_counter()
            n = max(args.items, args.e2e_items)
            records = self.section("items", lambda: inference.make_items(self, n)) or []
            self.result["items_build_s"] = time.perf_counter() - t0

        if nets is not None and records and self.wanted("score"):
            items = records[: args.items]
            for d in args.dtypes:
                fid = d == primary and args.fid
                if entry := self.section(
                    f"score_stage_{d}", lambda d=d, fid=fid: inference.score_case(self, nets, items, d, fid)
                ):
                    self.result["score_stage"][d] = entry
                    print(
                        f"{'score_stage (copy-visible)':<28}{d:>6}{args.batch_size:>6}"
                        f"{entry['samples_per_s']:>12.2f} samples/s  ({entry['items']} items, "
                        f"{args.metric_size} px metric frame)",
                        flush=True,
                    )

        if records and (self.wanted("decompose") or self.wanted("e2e")):
            self.run_inference(nets, records, primary)
            self.reset_peak()  # RefLayer released
        if e2e := self.result["inference"].get("e2e"):
            self.result["projection"] = {
                **projection(e2e["samples_per_s"]),
                "from": "inference.e2e.samples_per_s",
            }
        self.result["comparison"] = self.comparison()

    def run_inference(self, nets, records: list[dict[str, Any]], primary: str) -> None:
        args, inf = self.args, self.result["inference"]
        bundle = self.section("build_reflayer", lambda: inference.build_reflayer(self))
        if bundle is None:
            return
        from reflade.train.pipeline_reflayer import RefLayerPipeline

        pipe = RefLayerPipeline(bundle, mixed_precision=self.cuda)
        if self.wanted("decompose"):
            fg = next((r for r in records if r["kind"] == "foreground"), records[0])
            if entry := self.section("decompose", lambda: inference.decompose_case(self, pipe, fg)):
                inf["decompose"] = entry
                print(
                    f"{'decompose':<28}{args.reflayer_weights:>6}{1:>6}{entry['s_per_decomposition']:>12.3f} s  "
                    f"({entry['resolution']} px, {args.steps} steps)",
                    flush=True,
                )
        if nets is not None and self.wanted("e2e"):
            items = records[: args.e2e_items]
            if entry := self.section("e2e", lambda: inference.e2e_case(self, pipe, nets, items, primary)):
                inf["e2e"] = entry
                print(
                    f"{'inference + metrics':<28}{primary:>6}{args.batch_size:>6}{entry['samples_per_s']:>12.3f} "
                    f"samples/s  (predict {entry['predict_s']:.2f} s, score {entry['score_s']:.2f} s, "
                    f"{entry['items']} items)",
                    flush=True,
                )
        dec, sc = inf.get("decompose"), self.result["score_stage"].get(primary)
        if dec and sc:
            inf["serial_estimate_samples_per_s"] = 1.0 / (
                dec["s_per_decomposition"] + 1.0 / sc["samples_per_s"]
            )

    def comparison(self) -> dict[str, Any]:
        """Each measured figure beside its anchor (ratio measured / anchor; for seconds, anchor / measured)."""
        nets = self.result["networks"].get(self.args.dtypes[0], {})
        pairs = {key: (nets.get(name) or {}).get("per_s") for name, key in networks.KEYS.items()}
        pairs["decompose_1024_s"] = (self.result["inference"].get("decompose") or {}).get(
            "s_per_decomposition"
        )
        out: dict[str, Any] = {"comparable": not self.args.smoke and self.cuda}
        for key, measured in pairs.items():
            anchor, speed = ANCHORS[key], None
            if measured:
                speed = measured / anchor if key.endswith("per_s") else anchor / measured
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

    for dtype, nets in result["networks"].items():
        if dtype == "build":
            continue
        for name, e in nets.items():
            label = f"{name} ({e.get('input_px', '-')} px)"
            if e.get("skipped"):
                print(f"{name:<34}{dtype:>6}  skipped: {e['skipped'][:80]}")
            else:
                line(label, dtype, e["batch"], e["per_s"], e["unit"], networks.KEYS[name])
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
    for name, (real, smoke, text) in DEFAULTS.items():
        shown = " ".join(map(str, real)) if isinstance(real, list) else real
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=str if name == "preset" else int,
            nargs="+" if isinstance(real, list) else None,
            choices=("sd3-medium", "tiny") if name == "preset" else None,
            help=f"{text} (default {shown}; smoke {smoke if not isinstance(smoke, list) else smoke[0]})",
        )
    p.add_argument("--layers", type=int, default=None, help="override the transformer's depth (shape checks)")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance scale (default 1, as eval.guidance)")
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True,
                   help="time fid_from_moments once on the ScoreStage features (default on)")  # fmt: skip
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
    for name, (real, smoke, _) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else real)
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
    source = bm.ensure_reflade("reflade.eval.scoring")
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
