"""Benchmark: the data engine's whole product run (classical backends) on Ray against the same stage code in one
loop.

Inputs: ``--scenes`` synthetic scenes (``engine/synth.py``: 256x256, seeds 0..N-1, background ``auto``) plus
scikit-image's bundled colour photos (astronaut, coffee, chelsea, rocket), PNG-encoded in memory. Compared in ONE
run, on the same inputs, after an untimed warm-up of both arms (imports, pymatting's numba kernels, Ray workers):

(b) plain: ``run_stages_plain(records, ecfg, "classical")``: every stage, one process, one thread, the images in
    memory (first in each round of ``--repeat``);
(a) the product: ``run_engine`` (what ``reflade engine run`` calls) on a local Ray cluster this script starts
    (``num_cpus = --cores``, its own short temp dir) and a SeaweedFS of its own (``_engine_world.py``), with the
    images registered beforehand as a ``raw-images`` version (raw inputs sit in the bucket before a run). Timed:
    the whole call: ingest (the registry input's manifest), plan, the engine's dataset as ``build_dataset`` builds
    it (read from the bucket, pre-filter, the ``materialize`` barrier and near-duplicates, stages 2-6, the shard
    writer) run to the end, and the commit (a registered dataset version). Each run is a fresh dataset (nothing
    staged before). Its parts are reported (``RunResult.phases``; the writer's own seconds from the markers).
    Run once per setting:
      - ``defaults`` (the run compared with (b)): ``EngineConfig()`` on stock Ray: layout ``auto``, which on a
        CPU cluster is ``fused`` (stages 2-6 in one actor class ``LayerStages``, one actor per CPU);
      - ``--staged``: the staged layout once per ``--cpu-actors`` x ``--batch-size``, with idle Ray workers kept
        alive (``--keep-workers``), for comparison.
    Not timed: starting Ray (``ray_start_s``, reported: ``reflade engine run`` pays it unless a cluster is up)
    and reading the committed version back to compare it image by image with (b).
(c) ``--ceiling``: ``--cores`` plain processes (spawned, no Ray) run 1/cores of the images each at the same time:
    the speed-up this machine allows any parallel layout that added nothing.
(f) ``--floor`` (on by default): after each run of the defaults, Ray Data's own floor: ``from_items`` of the same
    records in the engine's order and blocks, one actor pool of the fused pool's size, with stage code that only
    sleeps each image's share of its batch's stage time in that run (from the markers): what Ray Data alone costs
    on this node for that schedule.

Thread counts are pinned to 1 in both arms (design.md, Pitfalls): ``OMP/MKL/OPENBLAS/NUMEXPR/NUMBA/OPENCV_FOR``
variables are set before anything imports numpy, ``cv2.setNumThreads(1)`` and ``torch.set_num_threads(1)`` in the
driver; every Ray worker inherits the variables from the raylet this script starts (``--thread-pinning
runtime-env``: as a job runtime_env + a ``worker_process_setup_hook`` instead); the counts seen in the driver, a Ray
task and a Ray actor are printed and stored.

The machine may be shared: each timed run records the CPU seconds of this process tree ("own": the driver, Ray's
daemons and workers, the object store), of other processes ("others") and idle, and waits first (``--wait-quiet``)
for the others to go quiet. Definitions are written into the JSON ("definitions").

    .venv/bin/python bench/engine.py [--scenes 256] [--no-photos] [--cpu-actors 1,2] [--batch-size 4] [--no-staged]
                                     [--quick]

This file runs the rounds; its parts: ``_engine_arms.py`` (inputs, the plain loop, the ceiling, the floor, the product
settings), ``_engine_world.py`` (the product's object store and registry), ``_engine_threads.py`` (thread pinning, the
local Ray cluster), ``_engine_cpu.py`` (CPU accounting), ``_engine_report.py`` (definitions, figures, tables),
``_engine_cli.py`` (the options).
"""

from __future__ import annotations

import os
import sys

from _engine_threads import (
    KEEP_WORKERS_CONFIG,
    THREAD_ENV,
    check_threads,
    fmt_threads,
    pin_threads,
    start_ray,
    thread_report,
)

# Pinned before numpy, OpenCV, numba or torch load (they read these once, at import); _engine_threads loads none.
os.environ.update(THREAD_ENV)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Any  # noqa: E402

import _engine_arms as arms  # noqa: E402
from _engine_cli import parse_args  # noqa: E402
from _engine_cpu import CpuMeter, machine_info  # noqa: E402
from _engine_report import (  # noqa: E402
    DEFINITIONS,
    TARGET_OVERHEAD_PCT,
    TARGET_SPEEDUP,
    _arm,
    _public,
    _setting_label,
    arm_figures,
    compare,
    floor_figures,
    print_tables,
    product_figures,
    report,
    summarize,
    summarize_result,
    write,
)
from _engine_world import ProductWorld, read_back  # noqa: E402

from reflade.engine.config import EngineConfig  # noqa: E402
from reflade.engine.pipeline import fused_pool_size  # noqa: E402

PHASES = ("ingest", "plan", "connect", "barrier", "stages", "commit")
IDLE_PROBE_S = 5.0  # before each timed Ray run: how long the idle cluster's own CPU use is measured


def run(args) -> int:
    pin_threads()
    import torch

    torch.set_num_threads(1)
    meter = CpuMeter()
    records = arms.make_records(args.scenes, args.photos)
    warm = arms.make_records(0, False, seeds=range(arms.WARMUP_SEED0, arms.WARMUP_SEED0 + args.warmup))
    settings = arms.make_settings(args)
    result: dict[str, Any] = {
        "benchmark": "engine",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
        "params": {
            "scenes": args.scenes,
            "scene_size": [256, 256],
            "scene_background": "auto",
            "scene_seeds": f"0..{args.scenes - 1}",
            "photos": list(arms.PHOTOS) if args.photos else [],
            "images": len(records),
            "cores": args.cores,
            "backends": "classical",
            "repeat": args.repeat,
            "warmup_images": len(warm),
            "product": "run_engine (ingest, plan, build_dataset run to the end, commit) against a SeaweedFS of its "
            "own, the images registered as a raw-images version beforehand",
            "wait_quiet_s": args.wait_quiet,
            "quiet_below": args.quiet_below,
            "keep_workers_system_config": KEEP_WORKERS_CONFIG,
            "thread_pinning": args.thread_pinning,
        },
        "definitions": DEFINITIONS,
        "targets": {"speedup": TARGET_SPEEDUP, "ray_overhead_pct": TARGET_OVERHEAD_PCT},
        "machine": machine_info(),
        "threads": {"driver": thread_report()},
        "plain": None,
        "plain_runs": [],
        "ceiling": None,
        "ceiling_runs": [],
        "ray": [],
        "best": None,
        "summary": None,
        "mismatches": [],
    }
    m = result["machine"]
    print(
        f"data engine, classical backends | {m['cpu_count']} CPUs ({m['cpu_model']}) | Python {m['python']} | "
        f"ray {m['ray']}"
    )
    print(
        f"{len(records)} images ({args.scenes} scenes 256x256"
        + (f" + {len(arms.PHOTOS)} photos" if args.photos else "")
        + f"), warm-up on {len(warm)} other scenes, {args.repeat} run(s) per arm and setting"
    )
    print(f"threads, driver (plain arm):  {fmt_threads(result['threads']['driver'])}")

    def timed(fn):
        quiet = meter.wait_quiet(args.wait_quiet, args.quiet_below) if args.wait_quiet > 0 else None
        out, cpu, by_title = meter.measure(fn)
        return out, cpu, by_title, quiet

    base = EngineConfig(batch_size=args.batch_size[0])
    state: dict[str, Any] = {"per_image": None, "plain_cpu": None, "ray_start_s": None}

    def plain_round(rep: int) -> None:
        """(b): one timed plain run (no product run is going on)."""
        (rows, wall), cpu, _, quiet = timed(lambda: arms.run_plain(records, base))
        fig = summarize(rows)
        if state["per_image"] is None:
            state["per_image"] = fig["per_image"]
        elif fig["per_image"] != state["per_image"]:
            raise SystemExit("the plain arm is not deterministic: two runs disagree")
        del rows
        fig.update(arm_figures(fig, wall, 1, cpu), batch_size=base.batch_size, repeat=rep, quiet=quiet)
        result["plain_runs"].append(_public(fig))
        result["plain"] = max(result["plain_runs"], key=lambda r: r["images_per_s"])
        state["plain_cpu"] = sum(r["own_cpu_per_image_ms"] for r in result["plain_runs"]) / len(
            result["plain_runs"]
        )
        write(result, args.out)
        print(
            f"(b) plain: {fig['images_per_s']:.2f} images/s ({wall:.1f} s, {fig['own_cpu_per_image_ms']:.0f} CPU "
            f"ms/image, others used {fig['foreign_pct']:.0f} % of the machine); wrote {args.out}"
        )

    def ray_round(ray, world: ProductWorld, s: dict[str, Any], rep: int) -> bool:
        """(a): one timed product run after an untimed one on the warm-up images; False on a mismatch."""
        plain = result["plain"]
        ecfg = EngineConfig(
            batch_size=s["batch_size"],
            layout=s["layout"],
            fused_actors=s["fused_actors"],
            cpu_actors=s["cpu_actors"],
            num_cpus_per_actor=s["num_cpus_per_actor"],
            num_cpus_per_task=s["num_cpus_per_task"],
        )
        if s["layout"] == "fused":
            s["actors"] = fused_pool_size(ecfg)  # the engine's choice on this cluster
        with warnings.catch_warnings():  # the warm-up's few blocks cannot feed every actor: Ray Data says so
            warnings.filterwarnings("ignore", message=".*only received.*input", category=UserWarning)
            world.run(state["warm_ref"], ecfg)
        time.sleep(1.0)  # the warm-up's actors exit
        _, idle_cpu, _ = meter.measure(lambda: time.sleep(IDLE_PROBE_S))
        (res, lines, wall), cpu, by_title, quiet = timed(lambda: world.run(state["input_ref"], ecfg))
        fig = product_figures(res, read_back(world, res, state["ids"]))
        fig.update(
            arm_figures(fig, wall, args.cores, cpu),
            setting=s,
            repeat=rep,
            quiet=quiet,
            phases_s={k: res.phases[k] for k in PHASES if k in res.phases},
            phase_share={k: res.phases[k] / wall for k in PHASES if k in res.phases},
            ray_start_s=state["ray_start_s"],
            speedup=fig["images"] / wall / plain["images_per_s"],
            contention=fig["stage_time_s"] / plain["stage_time_s"],
            cpu_by_process=by_title,
            cluster_idle_cores=idle_cpu["own_cpu_s"] / idle_cpu["wall_s"],
            log=lines,
        )
        fig["parallel_efficiency"] = fig["speedup"] / args.cores
        fig["cpu_overhead_pct"] = (
            100 * (fig["own_cpu_per_image_ms"] - state["plain_cpu"]) / state["plain_cpu"]
        )
        fig["cpu_bound_speedup"] = args.cores * state["plain_cpu"] / fig["own_cpu_per_image_ms"]
        diffs = compare({"per_image": state["per_image"]}, fig)
        fig["matches_plain"] = not diffs
        if diffs:
            result["mismatches"].append({"setting": s, "differences": diffs[:50], "count": len(diffs)})
        if args.floor and s.get("defaults") and s["layout"] == "fused":
            time.sleep(1.0)  # the measured run's actors exit
            seconds = dict(fig["image_stage_s"])
            frun, fcpu, ftitles, fquiet = timed(
                lambda: arms.run_floor(ray, records, seconds, ecfg, s["actors"])
            )
            floor = floor_figures(frun, sum(seconds.values()), args.cores, ftitles)
            floor.update(quiet=fquiet, own_cpu_s=fcpu["own_cpu_s"], foreign_pct=100 * fcpu["foreign_load"])
            fig["floor"] = floor
            fig["above_floor_pct"] = fig["overhead_pct"] - floor["floor_idle_pct"]
            print(
                f"    floor (Ray Data alone: stage code that only sleeps): {floor['wall_s']:.1f} s, actors "
                f"constructed at {'/'.join(f'{t:.2f}' for t in floor['actor_constructed_s'])} s, first "
                f"batch {floor['first_batch_s']:.1f} s; core time unused {floor['floor_idle_pct']:.1f} % of stage "
                f"time (this run's overhead {fig['overhead_pct']:.1f} %: {fig['above_floor_pct']:.1f} % above it); "
                f"CPU of Ray's processes {floor['floor_cpu_pct']:.1f} % of stage time"
            )
        result["ray"].append(_public(fig))
        summarize_result(result)
        write(result, args.out)
        print(
            f"{_arm(s)} {_setting_label(s)}: {fig['images_per_s']:.2f} images/s ({wall:.1f} s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in fig["phases_s"].items())
            + f"; {fig['own_cpu_per_image_ms']:.0f} CPU ms/image, others used {fig['foreign_pct']:.0f} % of the "
            f"machine), {fig['speedup']:.2f}x plain, {res.dataset}"
            + ("" if not diffs else f", {len(diffs)} MISMATCHES")
        )
        time.sleep(1.0)  # let the finished run's actors exit before the next one starts
        return not diffs

    # Warm-up of the plain arm (imports, numba kernels, first-call caches); Ray's is per run (its workers).
    arms.run_plain(warm, base)
    import ray

    status = 0
    groups = [
        [s for s in settings if s["keep_workers"] == keep]
        for keep in sorted({s["keep_workers"] for s in settings})
    ]

    def ceiling_round(rep: int) -> None:
        quiet = meter.wait_quiet(args.wait_quiet, args.quiet_below) if args.wait_quiet > 0 else None
        c = arms.run_ceiling(records, warm, base, args.cores)
        plain = result["plain"]
        c.update(
            repeat=rep,
            quiet=quiet,
            speedup=c["images_per_s"] / plain["images_per_s"],
            contention=c["stage_time_s"] / plain["stage_time_s"],
        )
        result["ceiling_runs"].append(c)
        result["ceiling"] = max(result["ceiling_runs"], key=lambda r: r["images_per_s"])
        write(result, args.out)
        print(
            f"(c) ceiling: {args.cores} plain processes at once: {c['images_per_s']:.2f} images/s "
            f"({c['wall_s']:.1f} s, {c['cpu_per_image_ms']:.0f} CPU ms/image, stage time x{c['contention']:.2f} "
            f"of one process alone), {c['speedup']:.2f}x plain"
        )

    world = ProductWorld()  # before Ray starts: its workers inherit the object store's location
    try:
        state["input_ref"], state["ids"] = world.register_input(records, "bench-input")
        state["warm_ref"], _ = world.register_input(warm, "bench-warmup")
        for rep in range(args.repeat):  # rounds: plain, then every setting (one cluster per configuration)
            plain_round(rep)
            if args.ceiling:
                ceiling_round(rep)
            for group in groups:
                t0 = time.perf_counter()
                tmp = start_ray(
                    ray, args.cores, group[0]["keep_workers"], args.thread_pinning, by_value=(arms,)
                )
                state["ray_start_s"] = time.perf_counter() - t0
                try:
                    check_threads(ray, group[0], result, rep)
                    for s in group:
                        if not ray_round(ray, world, s, rep):
                            status = 1
                finally:
                    ray.shutdown()
                    shutil.rmtree(tmp, ignore_errors=True)
    finally:
        world.close()

    print()
    print_tables(result)
    report(result, args)
    return status


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
