"""The staged layout's two scheduling levers, each against the path it replaced, on this machine's CPUs:

- matting: the staged layout's stages 2-6 over synthetic scenes (classical backends, two matting actors), the
  matting pool taking whole images (``MattingStage``, one image's entities in sequence: the old chain) or one
  entity per call (``add_layer_stages``: split, matted in parallel, gathered); wall seconds of the Ray dataset
  after the pre-filter, and the layers of both compared byte for byte;
- completion: the neural completion pool alone (tiny RePaint weights from a registry in a SeaweedFS of its own)
  over input blocks of ``batch_size`` images, one call at a time or ``completion_calls_in_flight`` calls sharing
  their sampler batches; wall seconds, sampler calls (counted by wrapping the backend's ``sample``), and the
  largest difference between the two arms' completions.

Usage: ``.venv/bin/python bench/engine_levers.py [--images 24] [--repeat 2] [--batch-size 2] [--out FILE]``. The
1-minute load average before and after each arm is in the JSON: on shared cores, compare arms of one run only. Each arm runs once
untimed first (Ray's workers, imports and the weights cache warm)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _engine_world import ProductWorld  # noqa: E402

from reflade.engine.backends import make_scene_backend  # noqa: E402
from reflade.engine.backends.tiny_weights import register_tiny_weights  # noqa: E402
from reflade.engine.config import EngineConfig  # noqa: E402
from reflade.engine.layout import add_layer_stages, completion_map_args  # noqa: E402
from reflade.engine.ray_stages import (  # noqa: E402
    CompletionStage,
    MarkDuplicates,
    MattingStage,
    PostFilterStage,
    PreFilterStage,
    PromptStage,
    SceneStage,
)
from reflade.engine.record_stage import Work, load_work, to_batch  # noqa: E402
from reflade.engine.synth import make_scene, scene_to_png_bytes  # noqa: E402


def _load() -> float:
    """The 1-minute load average (runnable processes, all sessions of the machine)."""
    return round(os.getloadavg()[0], 2)


def _per_image_chain(ds, cfg: EngineConfig):
    """The staged layout as it was before one entity per call: the matting pool takes whole images."""
    from ray.data import ActorPoolStrategy

    args = ("classical", cfg, None, None)
    actor = {"num_cpus": cfg.num_cpus_per_actor, "batch_format": "pandas", "batch_size": cfg.batch_size}
    task = {"num_cpus": cfg.num_cpus_per_task, "batch_format": "pandas", "batch_size": cfg.batch_size}
    pool = ActorPoolStrategy(size=cfg.cpu_actors)
    ds = ds.map_batches(SceneStage, fn_constructor_args=args, compute=pool, **actor)
    ds = ds.map_batches(CompletionStage, **completion_map_args(cfg, "classical", args))
    ds = ds.map_batches(MattingStage, fn_constructor_args=args, compute=pool, **actor)
    ds = ds.map_batches(PromptStage(cfg), **task)
    return ds.map_batches(PostFilterStage(cfg), **task)


def _layers(rows) -> dict[tuple, bytes]:
    out = {}
    for r in rows:
        for lay in load_work(r["work"]).layers:
            if lay.ok and r["ok"]:
                out[(r["source_id"], lay.entity_id, lay.kind)] = lay.rgba.tobytes()
    return out


def matting_arms(n: int, side: int, repeat: int) -> dict:
    import ray

    cfg = EngineConfig(batch_size=2, layout="staged", cpu_actors=2, num_cpus_per_actor=0.25)
    rows = []
    for i in range(n):
        data = scene_to_png_bytes(make_scene(seed=900 + i, size=(side, side), n_objects=(3, 5)))
        rows.append(
            {
                "source_id": f"s{i:03d}",
                "sha256": hashlib.sha256(data).hexdigest(),
                "name": f"{i}.png",
                "data": data,
            }
        )
    frame = MarkDuplicates({})(
        PreFilterStage(cfg)(to_batch([dict(r, ok=True, stage="", reason="") for r in rows]))
    )
    blocks = [frame.iloc[i : i + cfg.batch_size] for i in range(0, len(frame), cfg.batch_size)]
    arms = {
        "per_image": lambda ds: _per_image_chain(ds, cfg),
        "per_entity": lambda ds: add_layer_stages(ds, cfg, "classical"),
    }
    out = {name: {"wall_s": [], "load": []} for name in arms}
    for build in arms.values():  # untimed: Ray's worker processes and imports are warm for every timed arm
        build(ray.data.from_pandas(blocks[:1])).take_all()
    layers = {}
    for _ in range(repeat):
        for name, build in arms.items():
            before = _load()
            t0 = time.perf_counter()
            got = build(ray.data.from_pandas(blocks)).take_all()
            out[name]["wall_s"].append(round(time.perf_counter() - t0, 2))
            out[name]["load"].append([before, _load()])
            layers[name] = _layers(got)
    entities = sum(len(load_work(r["work"]).entities) for r in got)
    assert layers["per_image"] == layers["per_entity"], "the two matting arms made different layers"
    return {"images": n, "side_px": side, "entities": entities, "layers": len(layers["per_entity"]), **out}


class _CountingCompletion(CompletionStage):
    """The product's completion stage, its backend's ``sample`` wrapped to count sampler calls and holes; each
    output batch reports the counts since the last in a ``sampler`` column."""

    def make_backend(self):
        backend = super().make_backend()
        self.counts = [0, 0]
        inner = backend.sample

        def sample(images, holes, side):
            self.counts[0] += 1
            self.counts[1] += len(holes)
            return inner(images, holes, side)

        backend.sample = sample
        return backend

    def __call__(self, batch):
        out = super().__call__(batch)
        counts, self.counts = self.counts, [0, 0]
        out["sampler"] = [json.dumps(counts)] + [json.dumps([0, 0])] * (len(out) - 1)
        return out


def completion_arms(world: ProductWorld, n: int, side: int, batch_size: int, calls: int, repeat: int) -> dict:
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import bench/
    register_tiny_weights(world.registry, ["tiny-repaint"])
    scene = make_scene_backend("classical", EngineConfig())
    frames = []
    for i in range(n):
        image = make_scene(seed=950 + i, size=(side, side), n_objects=(3, 5)).image
        work = Work(image=image, entities=scene.detect(image))
        frames.append(
            {"source_id": f"c{i:03d}", "ok": True, "stage": "", "reason": "", "work": pickle.dumps(work)}
        )
    blocks = [pd.DataFrame(frames[i : i + batch_size]) for i in range(0, n, batch_size)]
    fields = {"endpoint": world.server.endpoint, "bucket": "reflade-bench", "region": "us-east-1"}
    out, comps = {}, {}
    for k in (1, calls):  # untimed warm-up, as in matting_arms (the weights reach the worker's cache here)
        cfg = EngineConfig(batch_size=batch_size, completion_calls_in_flight=k)
        args = ("neural", cfg, fields, world.registry.prefix.rstrip("/"))
        ray.data.from_pandas(blocks[:1]).map_batches(
            _CountingCompletion, **completion_map_args(cfg, "neural", args)
        ).take_all()
    for _ in range(repeat):
        for name, k in (("one_call", 1), ("calls_in_flight", calls)):
            cfg = EngineConfig(batch_size=batch_size, completion_calls_in_flight=k)
            args = ("neural", cfg, fields, world.registry.prefix.rstrip("/"))
            arm = out.setdefault(name, {"calls_in_flight": k, "wall_s": [], "load": []})
            before = _load()
            t0 = time.perf_counter()
            got = ray.data.from_pandas(blocks).map_batches(
                _CountingCompletion, **completion_map_args(cfg, "neural", args)
            )
            got = got.take_all()
            arm["wall_s"].append(round(time.perf_counter() - t0, 2))
            arm["load"].append([before, _load()])
            counts = np.sum([json.loads(r["sampler"]) for r in got], axis=0)
            arm["sampler_calls"], arm["holes"] = int(counts[0]), int(counts[1])
            comps[name] = {r["source_id"]: load_work(r["work"]).completions for r in got}
    diff = 0
    for sid, cs in comps["one_call"].items():
        for a, b in zip(cs, comps["calls_in_flight"][sid], strict=True):
            diff = max(diff, int(np.abs(a.rgba.astype(int) - b.rgba.astype(int)).max()))
            diff = max(diff, int(np.abs(a.background.astype(int) - b.background.astype(int)).max()))
    return {"images": n, "side_px": side, "batch_size": batch_size, "max_abs_diff_uint8": diff, **out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--side", type=int, default=384, help="scene side, pixels")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--calls", type=int, default=2, help="completion calls in flight in the second arm")
    p.add_argument("--batch-size", type=int, default=2, help="images per completion call")
    p.add_argument("--out", default=str(HERE / "results" / "cpu-2core" / "engine_levers.json"))
    a = p.parse_args(argv)
    world = ProductWorld()  # before Ray starts: its workers inherit the store's location and credentials
    import ray

    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        result = {
            "machine": {"cpus": os.cpu_count(), "ray_cpus": 2},
            "matting": matting_arms(a.images, a.side, a.repeat),
            "completion": completion_arms(world, a.images, a.side, a.batch_size, a.calls, a.repeat),
        }
    finally:
        ray.shutdown()
        world.close()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
