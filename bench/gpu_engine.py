"""Benchmark: the product's data-engine stages with its neural backends at real model sizes on one GPU, without
Ray or the object store: seconds per image per stage and end to end.

It drives the product and defines nothing of its own about models, holes, sampling sides or preprocessing:

- weights: random checkpoints written by the product (``reflade.engine.backends.random_weights``:
  ``--size real``: SAM ViT-H, OWLv2-base/16, a BLIP-base captioner and SD3-medium inpainting; ``--size tiny``:
  ``tiny_weights``), once, into ``--weights-dir``; the backends load them with their own loaders
  (``load_sam``, ``load_owlv2``, ``load_blip``, ``load_sd3_inpaint``) through ``engine.weights_dir``;
- stages: the product's stage objects, in the order of its plain loop (``reflade.engine.layout``): pre-filter and
  near-duplicates over all images, then ``LayerStages`` (scene, completion, matting, prompts, post-filter) on
  batches of ``--batch-size`` in the product's order (``largest_first``), with the neural family and
  ``completion_model: sd3-inpaint``;
- inputs: ``reflade.engine.synth.make_scene`` scenes of ``--image-size`` pixels, as PNG bytes.

Per-stage times are the stages' own (``Work.timings``: a batched stage's time is split evenly between its
images); each neural stage ends by copying its results to the CPU, which waits for the GPU. End to end is the
wall time of the whole run (pre-filter to post-filter, CUDA synchronised) over the number of images. Model
loading and one warm-up batch (other scenes) are timed apart and left out. Matting runs in this one process, image
after image (the Ray pipeline runs it in a pool beside the GPU stages: ``gpu_stages_s_per_image``, scene +
completion, is what the GPU alone takes).

Imports neither ray nor boto3 (the JSON lists any such module found loaded, ``forbidden_modules``): on the GPU
machine it runs from the source tree with diffusers, segment-anything, imagehash, PyWavelets and pymatting carried
as wheels (``bench/gpu_engine.sh``).

    python bench/gpu_engine.py --size real --scenes 16 --image-size 1024      # on the GPU
    python bench/gpu_engine.py --size tiny --scenes 3 --image-size 128        # the CPU check
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import pickle
import platform
import sys
import time
from pathlib import Path
from typing import Any

# Matting runs in this process beside torch (in the Ray pipeline it has its own actors). pymatting's numba code
# under numba's OpenMP layer leaves a thread team that slows every later torch CPU op about 40x here (a tiny
# complete_batch: 0.2 s of CPU before the first matting call, 8 s after); numba's own work queue does not.
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

RESULTS = Path(__file__).resolve().parent / "results"
FORBIDDEN = ("ray", "boto3", "botocore")
STAGES = ("prefilter", "scene", "completion", "matting", "prompts", "postfilter")
GPU_STAGES = ("scene", "completion")
DEFAULTS = {  # run settings per size: how much work, not what the models are
    "real": {"scenes": 16, "image_size": 1024, "steps": 28, "batch_size": 4},
    "tiny": {"scenes": 3, "image_size": 256, "steps": 2, "batch_size": 2},
}


def forbidden_modules() -> list[str]:
    """Loaded modules of the packages this driver must not need (ray, boto3, botocore)."""
    return sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)


def engine_config(size: str, weights_dir: Path, steps: int, batch_size: int, gpu: bool):
    """The engine configuration of the run: the product's defaults, its random checkpoints of ``size`` read
    from ``weights_dir``, SD3-family completion with ``steps`` steps, one GPU per model stage when ``gpu``."""
    from reflade.engine.backends.random_weights import engine_weights
    from reflade.engine.config import EngineConfig

    return EngineConfig(
        **engine_weights(size),
        weights_dir=str(weights_dir),
        completion_steps=steps,
        batch_size=batch_size,
        num_gpus=1.0 if gpu else 0.0,
    )


def scene_records(n: int, image_size: int, first_seed: int = 0) -> list[dict[str, Any]]:
    """``n`` synthetic scenes as the engine's input records (``source_id``, ``sha256``, ``name``, ``data``)."""
    from reflade.engine.synth import make_scene, scene_to_png_bytes

    out = []
    for seed in range(first_seed, first_seed + n):
        data = scene_to_png_bytes(make_scene(seed=seed, size=(image_size, image_size)))
        sha = hashlib.sha256(data).hexdigest()
        out.append(
            {"source_id": f"scene{seed:04d}", "sha256": sha, "name": f"scene{seed:04d}.png", "data": data}
        )
    return out


def run_stages(records: list[dict[str, Any]], ecfg, layers) -> list[dict[str, Any]]:
    """The product's stages over ``records`` in one process: pre-filter and near-duplicates over every image,
    then ``layers`` (a loaded ``LayerStages``) on batches of ``ecfg.batch_size``, in the product's input order
    (``largest_first``). Returns the per-image records (``work`` pickled), in that order."""
    from reflade.engine.layout import largest_first
    from reflade.engine.ray_stages import MarkDuplicates, PreFilterStage
    from reflade.engine.record_stage import to_batch, to_records
    from reflade.engine.stages.prefilter import find_near_duplicates

    bs = ecfg.batch_size
    rows = [dict(r, ok=True, stage="", reason="") for r in largest_first(records, lambda r: len(r["data"]))]
    pre = PreFilterStage(ecfg)
    done = [r for i in range(0, len(rows), bs) for r in to_records(pre(to_batch(rows[i : i + bs])))]
    pairs = [(r["source_id"], int(r["phash"])) for r in done if r["ok"] and int(r["phash"])]
    mark = MarkDuplicates(find_near_duplicates(pairs, ecfg.dup_hamming))
    out = []
    for i in range(0, len(done), bs):
        out += to_records(layers(mark(to_batch(done[i : i + bs]))))
    return out


def layer_digests(out: list[dict[str, Any]], ecfg) -> dict[str, str]:
    """{sample_id: sha256 of the layer PNG} of every kept layer (the rows' ids and layer bytes, as the shard
    writer builds them: ``schema.make_sample_id``, ``schema.encode_png``)."""
    from reflade.engine.schema import encode_png, make_sample_id

    config_hash = ecfg.fingerprint()
    digests = {}
    for r in out:
        work = pickle.loads(r["work"])
        for lay in work.layers:
            if r["ok"] and lay.ok:
                sid = make_sample_id(r["sha256"], lay.entity_id, lay.kind, config_hash)
                digests[sid] = hashlib.sha256(encode_png(lay.rgba)).hexdigest()
    return digests


def summarise(out: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Seconds per input image per stage (the stage's time summed over the images, over all images: the stages
    add up to about the end-to-end time) and end to end, and what came out."""
    works = [pickle.loads(r["work"]) for r in out]
    n = len(out)
    stages = {}
    for stage in STAGES:
        times = [w.timings[stage] for w in works if stage in w.timings]
        stages[stage] = {"s_per_image": sum(times) / max(1, n), "images": len(times)}
    quarantined: dict[str, int] = {}
    for r in out:
        if not r["ok"]:
            key = f"{r['stage']}: {r['reason'].split(':')[0]}"
            quarantined[key] = quarantined.get(key, 0) + 1
    return {
        "images": n,
        "stages": stages,
        "e2e_s_per_image": wall_s / max(1, n),
        "gpu_stages_s_per_image": sum(stages[s]["s_per_image"] for s in GPU_STAGES),
        "entities_per_image": sum(len(w.entities) for w in works) / max(1, n),
        "layers_kept": sum(lay.ok for r, w in zip(out, works, strict=True) if r["ok"] for lay in w.layers),
        "layers_rejected": sum(not lay.ok for w in works for lay in w.layers),
        "quarantined": quarantined,
    }


def device_info(torch) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"type": "cpu", "card": platform.processor() or platform.machine(), "torch": torch.__version__}
    props = torch.cuda.get_device_properties(0)
    return {
        "type": "cuda",
        "card": torch.cuda.get_device_name(0),
        "memory_gb": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "diffusers", "segment-anything", "pymatting", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build or find the weights, load the stages, warm up on the first batch, time the run; the result dict."""
    import torch

    from reflade.engine.backends.random_weights import build_random_weights
    from reflade.engine.layout import LayerStages

    gpu = args.device == "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    result: dict[str, Any] = {
        "benchmark": "gpu_engine",
        "when": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "size": args.size,
        "settings": {k: getattr(args, k) for k in ("scenes", "image_size", "steps", "batch_size")},
        "device": device_info(torch),
        "versions": versions(),
        "python": platform.python_version(),
        "numba_threading_layer": os.environ.get("NUMBA_THREADING_LAYER"),
    }
    t0 = time.perf_counter()
    weights_dir = Path(args.weights_dir)
    build_random_weights(weights_dir, args.size, device="cuda" if gpu else "cpu")
    result["weights_s"] = time.perf_counter() - t0
    ecfg = engine_config(args.size, weights_dir, args.steps, args.batch_size, gpu)
    records = scene_records(args.scenes, args.image_size)
    t0 = time.perf_counter()
    layers = LayerStages("neural", ecfg)
    sync()
    result["load_s"] = time.perf_counter() - t0
    result["weights"] = [w for stage in layers.stages[:2] for w in stage.backend.weights]
    t0 = time.perf_counter()
    warm = run_stages(scene_records(args.batch_size, args.image_size, first_seed=args.scenes), ecfg, layers)
    sync()  # the warm-up (other scenes): first calls, kernel choices, the allocator, numba's compilation
    result["warmup_s"] = time.perf_counter() - t0
    result["warmup_stages"] = sorted({s for r in warm for s in pickle.loads(r["work"]).timings})
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    out = run_stages(records, ecfg, layers)
    sync()
    result.update(summarise(out, time.perf_counter() - t0))
    # this process's CPU seconds per image: beside the wall time, what a shared machine's load takes away
    result["e2e_cpu_s_per_image"] = (time.process_time() - c0) / max(1, len(out))
    result["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None
    result["rows"] = layer_digests(out, ecfg)
    result["forbidden_modules"] = forbidden_modules()
    return result


def print_table(result: dict[str, Any]) -> None:
    e2e = result["e2e_s_per_image"]
    print(f"\n{result['device']['card']} | {result['size']} models | {result['images']} images")
    print(f"{'stage':<12}{'s/image':>10}{'share':>8}")
    for stage, entry in result["stages"].items():
        s = entry["s_per_image"]
        print(f"{stage:<12}{s:>10.3f}{100 * s / max(e2e, 1e-9):>7.0f}%")
    print(f"{'end to end':<12}{e2e:>10.3f}  ({result['e2e_cpu_s_per_image']:.3f} s of this process's CPU)")
    print(f"{'GPU stages':<12}{result['gpu_stages_s_per_image']:>10.3f}  (scene + completion)")
    mem = result["peak_gpu_mem_gb"]
    print(
        f"load {result['load_s']:.1f} s, warm-up {result['warmup_s']:.1f} s, weights {result['weights_s']:.1f} s"
        + (f", peak GPU memory {mem} GB" if mem is not None else "")
    )
    print(
        f"entities/image {result['entities_per_image']:.1f}, layers kept {result['layers_kept']}, "
        f"rejected {result['layers_rejected']}, quarantined {result['quarantined'] or 'none'}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=tuple(DEFAULTS), default="real", help="model sizes (random weights)")
    p.add_argument("--weights-dir", default=None, help="where the random checkpoints are (written if absent)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--scenes", type=int, default=None, help="synthetic scenes (images) timed")
    p.add_argument("--image-size", type=int, default=None, help="side of each scene, pixels")
    p.add_argument("--steps", type=int, default=None, help="completion steps (engine.completion_steps)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (engine.batch_size)")
    p.add_argument(
        "--out", default=None, help="JSON path (default bench/results/gpu_engine_<size>_<card>.json)"
    )
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.scenes, args.image_size, args.steps, args.batch_size) < 1:
        p.error("--scenes, --image-size, --steps and --batch-size must be at least 1")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.weights_dir is None:
        args.weights_dir = str(Path.home() / ".cache" / "reflade" / f"random-weights-{args.size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    card = "".join(c if c.isalnum() else "_" for c in result["device"]["card"]).strip("_").lower()
    out = Path(args.out) if args.out else RESULTS / f"gpu_engine_{args.size}_{card or 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print_table(result)
    print(f"wrote {out}")
    missed = sorted(set(STAGES) - set(result["warmup_stages"]))
    if missed:
        print(
            f"WARNING: the warm-up batch did not reach {', '.join(missed)}: their first calls are in the timing"
        )
    if result["forbidden_modules"]:
        print(f"WARNING: loaded {', '.join(result['forbidden_modules'])}: the GPU machine has none of them")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
