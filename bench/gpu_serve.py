"""GPU check of serving: the decomposer deployment's batched code path with RefLayer at SD3-medium size, on one GPU,
without Ray.

Drives ``reflade.serve.batching.decompose_group`` (what the deployment's ``@serve.batch`` method runs for each group of
requests) with the product's ``RefLayerPipeline`` over ``build_reflayer("sd3-medium")``, random init drawn on the
device (no download, no registry: SD3-medium's transformer and VAE shapes, the seeded random text stand-in), on items
as the ingress makes them (an HxWx3 uint8 image at ``--resolution``, a box + point + text prompt, ``foreground``,
``--steps``, guidance 1, a seed each). Cases, each after ``--warmup`` untimed calls:

- ``batch1``: ``--iters`` calls of one item: p50 / p95 latency (s);
- ``batch<N>``: ``--batch-iters`` calls of ``--batch`` items: items/s and seconds per call.

Both for each of ``--weights``: ``deployed`` = the weight dtype a decomposer replica loads with the ``serve``
section's defaults on this device (``reflade.serve.batching.replica_dtype``: bfloat16 on CUDA with ``serve.bf16``,
as bench/gpu_check.py's 1.05-1.14 s anchor was measured; float32 on the CPU), and ``float32`` = float32 weights
under bf16 autocast (what a replica does with ``serve.bf16: false``).
Anchors (H100): decomposition at batch 1, 1024 px, 28 steps, bf16 weights 1.05-1.14 s; 28 bare MM-DiT steps 0.86 s;
target p50 <= 1.2 s all in, stretch 1.0 s.

``--smoke`` runs the same code on the CPU with the tiny preset (random tiny VAE, MiniLM), 64 px, 2 steps: covered
by ``tests/serve/test_gpu_serve_script.py``. Without CUDA and without ``--device``, the smoke configuration runs (so
that ``make bench`` on a CPU machine finishes) and says so. The JSON (``--out``, default
``bench/results/gpu_serve.json``) is rewritten after every case; a failed case records its error and the others run.

    python bench/gpu_serve.py                      # sd3-medium on the GPU
    python bench/gpu_serve.py --smoke              # the CPU smoke run

On the lent GPU machine (Python 3.12, torch, transformers; no diffusers, importlib-metadata or zipp): carry their
wheels in ``.whl`` (ignored by git) as bench/gpu_decompose.sh does; the script imports ``reflade`` from the source
tree. About 2 minutes on an H100 at the defaults:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
    timeout 420 python3 bench/gpu_serve.py --out $OUT/gpu_serve.json 2>&1 | tee $OUT/gpu_serve.log

Imports torch, diffusers, transformers, numpy, OpenCV; never ray or boto3 (``forbidden_modules`` in the JSON).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # bench/ is no package (runpy does not add it)
    sys.path.append(str(Path(__file__).resolve().parent))
import _bench_machine as bm  # noqa: E402

gpu_check = bm.sibling("gpu_check")  # forbidden_modules, device_info
RESULTS = Path(__file__).resolve().parent / "results"
ANCHORS: dict[str, Any] = {
    "device": "H100 (the issue's figures)",
    "decompose_1024_bf16_s": [1.05, 1.14],
    "bare_28_steps_s": 0.86,
    "target_p50_s": 1.2,
    "stretch_p50_s": 1.0,
}
# name -> (real sizes, --smoke, help); None in parse_args picks from here
DEFAULTS: dict[str, tuple[Any, Any, str]] = {
    "preset": ("sd3-medium", "tiny", "RefLayer preset"),
    "resolution": (1024, 64, "the model's working resolution and the images' side, px"),
    "steps": (28, 2, "sampling steps (28: the anchors')"),
    "batch": (4, 4, "items per call of the batched case"),
    "warmup": (2, 1, "untimed calls before each case"),
    "iters": (10, 3, "timed calls of the batch-1 case"),
    "batch_iters": (3, 2, "timed calls of the batched case"),
}


def make_items(n: int, side: int, steps: int, model: str) -> list[dict[str, Any]]:
    """``n`` items as the ingress hands them to the decomposer: a synthetic scene, a box + point + text prompt."""
    from reflade.engine.synth import make_scene

    scene = make_scene(0, size=(side, side), n_objects=(2, 2))
    x0, y0, x1, y1 = (int(v) for v in scene.objects[0].box)
    prompt = {"box": [x0, y0, x1, y1], "points": [[(x0 + x1) // 2, (y0 + y1) // 2, 1]], "text": "the object"}
    return [
        {"image": scene.image, "prompt": prompt, "kind": "foreground", "steps": steps, "guidance": 1.0}
        | {"seed": i, "model": model}
        for i in range(n)
    ]


def build(args, device, weights: str):
    """The pipeline the deployment would hold: RefLayer at ``--preset``, random init, on ``device``; ``bf16``
    ``deployed``: cast as a replica casts (``replica_dtype``); ``float32``: left float32 (autocast on CUDA)."""
    import torch

    from reflade.train.model import build_reflayer
    from reflade.train.pipeline_reflayer import RefLayerPipeline

    if args.preset == "tiny":
        from reflade.train.vae import build_tiny_vae

        bundle = build_reflayer("tiny", vae=build_tiny_vae(seed=0), resolution=args.resolution)
    else:
        with torch.device(device):  # 2 B random weights: drawn on the GPU, not the CPU
            bundle = build_reflayer("sd3-medium", resolution=args.resolution)
    bundle.to(device)
    from reflade.serve.batching import replica_dtype
    from reflade.serve.config import ServeConfig

    dtype = replica_dtype(ServeConfig().bf16, str(device)) if weights == "deployed" else None
    if dtype:
        bundle.to(dtype=getattr(torch, dtype))
    bundle.model.eval().requires_grad_(False)
    return RefLayerPipeline(bundle)


def timed_calls(pipe, items, warmup: int, iters: int, sync) -> list[float]:
    from reflade.serve.batching import decompose_group

    for _ in range(warmup):
        decompose_group(pipe, items)
    out = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        results = decompose_group(pipe, items)
        sync()
        out.append(time.perf_counter() - t)
        bad = [r for r in results if "layer" not in r]
        if bad:
            raise RuntimeError(f"decompose_group refused an item: {bad[0]}")
    return out


def run(args, result: dict[str, Any], save) -> None:
    import numpy as np
    import torch

    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for weights in args.weights:
        t = time.perf_counter()
        try:
            pipe = build(args, device, weights)
        except Exception as e:  # noqa: BLE001 - record it, try the other weights
            result["errors"][f"build_{weights}"] = f"{type(e).__name__}: {e}"[:2000]
            save()
            continue
        entry: dict[str, Any] = {"build_s": time.perf_counter() - t, "cases": {}}
        entry["param_dtype"] = str(next(pipe.bundle.model.parameters()).dtype)
        # RefLayerPipeline's default: bf16 autocast on CUDA over float32 weights, none over bf16 weights
        entry["autocast_bf16"] = cuda and entry["param_dtype"] == "torch.float32"
        result["weights"][weights] = entry
        for name, n, iters in (
            ("batch1", 1, args.iters),
            (f"batch{args.batch}", args.batch, args.batch_iters),
        ):
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            try:
                items = make_items(n, args.resolution, args.steps, f"{args.preset}-random")
                calls = timed_calls(pipe, items, args.warmup, iters, sync)
            except Exception as e:  # noqa: BLE001 - a failed case must not lose the others
                result["errors"][f"{weights}.{name}"] = f"{type(e).__name__}: {e}"[:2000]
                print(traceback.format_exc(), file=sys.stderr)
                save()
                continue
            case = {"batch": n, "calls": len(calls), "seconds": calls}
            case.update(p50_s=float(np.median(calls)), p95_s=float(np.percentile(calls, 95)))
            case["items_per_s"] = n * len(calls) / sum(calls)
            case["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
            entry["cases"][name] = case
            print(
                f"{weights:<9}{name:<8} p50 {case['p50_s']:.3f} s  {case['items_per_s']:.2f} items/s",
                flush=True,
            )
            save()
        del pipe
        if cuda:
            torch.cuda.empty_cache()
    result["comparison"] = compare(result, args)


def compare(result: dict[str, Any], args) -> dict[str, Any]:
    """Each weights setting's batch-1 p50 against the target and stretch (comparable: an H100-class GPU, sd3-medium,
    1024 px, 28 steps)."""
    comparable = not args.smoke and args.device.startswith("cuda") and args.preset == "sd3-medium"
    comparable = comparable and args.resolution == 1024 and args.steps == 28
    out: dict[str, Any] = {"comparable": comparable}
    for weights, entry in result["weights"].items():
        one = entry["cases"].get("batch1")
        if one:
            p50 = one["p50_s"]
            out[weights] = {
                "p50_s": p50,
                "target_met": p50 <= ANCHORS["target_p50_s"],
                "stretch_met": p50 <= ANCHORS["stretch_p50_s"],
                "over_bare_28_steps": p50 / ANCHORS["bare_28_steps_s"],
            }
    return out


def print_table(result: dict[str, Any]) -> None:
    dev = result["device"]
    smoke = " (SMOKE: not comparable with the anchors)" if result["smoke"] else ""
    s = result["settings"]
    print(f"\nServing GPU check on {dev.get('name', dev['type'])}: {s['preset']}, {s['resolution']} px, {s['steps']} "
          f"steps{smoke}")  # fmt: skip
    print(f"{'weights':<10}{'case':<9}{'p50 s':>8}{'p95 s':>8}{'items/s':>9}{'peak GiB':>10}")
    for weights, entry in result["weights"].items():
        for name, c in entry["cases"].items():
            peak = f"{c['peak_gib']:.1f}" if c["peak_gib"] is not None else "-"
            print(
                f"{weights:<10}{name:<9}{c['p50_s']:>8.3f}{c['p95_s']:>8.3f}{c['items_per_s']:>9.2f}{peak:>10}"
            )
    comp = result.get("comparison") or {}
    for weights in result["weights"]:
        if weights in comp:
            c = comp[weights]
            verdict = "met" if c["target_met"] else "NOT met"
            note = (
                ""
                if comp["comparable"]
                else " (not comparable: not sd3-medium at 1024 px, 28 steps on a GPU)"
            )
            print(f"{weights}: batch-1 p50 {c['p50_s']:.3f} s: target <= {ANCHORS['target_p50_s']} s {verdict}, "
                  f"stretch {ANCHORS['stretch_p50_s']} s {'met' if c['stretch_met'] else 'not met'}{note}")  # fmt: skip
    for name, e in result["errors"].items():
        print(f"{name}: FAILED {e[:200]}")
    print(f"forbidden modules loaded: {result.get('forbidden_modules') or 'none'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny preset, 64 px, 2 steps")
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else the smoke run)"
    )
    p.add_argument("--weights", nargs="+", choices=("deployed", "float32"), default=None,
                   help="deployed: the dtype a replica loads (bf16 on CUDA by serve.bf16); float32: under "
                        "autocast (default: both on CUDA, deployed on the CPU)")  # fmt: skip
    for name, (real, smoke, text) in DEFAULTS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=str if name == "preset" else int, default=None,
                       choices=("sd3-medium", "tiny") if name == "preset" else None,
                       help=f"{text} (default {real}; smoke {smoke})")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's on CUDA; 1 on the CPU, where OpenMP's spinning threads "
                        "collapse on a shared machine)")  # fmt: skip
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_serve.json)")
    args = p.parse_args(argv)
    import torch

    if args.device is None:
        if not args.smoke and not torch.cuda.is_available():
            print("no CUDA device: running the --smoke configuration on the CPU", flush=True)
            args.smoke = True
        args.device = "cuda" if not args.smoke else "cpu"
    for name, (real, smoke, _) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else real)
    args.weights = args.weights or (
        ["deployed", "float32"] if args.device.startswith("cuda") else ["deployed"]
    )
    for name in ("resolution", "steps", "batch", "iters", "batch_iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.threads is None and not args.device.startswith("cuda"):
        args.threads = 1
    args.out = args.out or str(RESULTS / "gpu_serve.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    source = bm.ensure_reflade("reflade.serve.batching")
    device = torch.device(args.device)
    result: dict[str, Any] = {
        "script": "bench/gpu_serve.py",
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "reflade": source,
        "device": gpu_check.device_info(device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "anchors": ANCHORS,
        "weights": {},
        "errors": {},
    }
    out = Path(args.out)

    def save() -> None:
        result["forbidden_modules"] = gpu_check.forbidden_modules()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(out)

    t0 = time.perf_counter()
    try:
        run(args, result, save)  # no inference_mode around it: the deployment calls decompose_group bare
    except Exception as exc:  # noqa: BLE001 - keep what was measured
        result["errors"]["run"] = f"{type(exc).__name__}: {exc}"[:2000]
        print(traceback.format_exc(), file=sys.stderr)
    result["wall_s"] = time.perf_counter() - t0
    result["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    save()
    print_table(result)
    print(f"wrote {out}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
