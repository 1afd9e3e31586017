"""Benchmark: the evaluation's samples/s (items scored per second, every model) through the Ray job and in one process.

An item is one dataset row x one prompt type (``text+box:fine``: one item per row), scored by every model of the run:
the tiny RefLayer (random init, with the product's tiny VAE, registered as ``model/reflayer``) and the two baselines
the job always adds (``copy-visible``, ``classical``), with the stand-in feature networks. Three arms on the same
items (one registered dataset of synthetic scenes, ``test`` split), models, settings and stage code:

(a) ``reflade.eval.job.run_eval`` on a local Ray cluster of ``--cores`` CPUs, timed from its call to its return (Ray
    Data reads the shard, items in blocks of ``eval.batch_size``, a PredictStage pool of ``--predict-actors``, a
    ScoreStage pool of ``--score-actors``, ``--num-cpus`` each; the accumulator, the report, its registration). The
    actors start inside the job, so their start-up is part of (a). ``--ray-runs`` runs: ``cold`` (fresh cluster,
    empty weights cache), then ``warm`` reruns on the same cluster;
(b) ``score_local(records, PredictStage(...), ScoreStage(...), batch_size=1)`` in one fresh process;
(c) the same with ``batch_size=--batch-size``: the batching ceiling of one process.
(b) and (c) run first, before any Ray cluster is up, ``--repeat`` times each (the fastest is compared); reading the
rows, building the stages (with the arguments the job gives its actors) and one warm-up call are untimed, reported.

Settings go through the product's own EvalConfig (``--batch-size``, ``--predict-actors``, ``--score-actors``,
``--num-cpus``): the bench changes no scheduling. Threads (design.md, Pitfalls): each arm has ``--threads`` T in all;
(a)'s actors get ``EvalConfig.threads`` = max(1, T // actors), the thread variables are 1 in this driver and in
every Ray worker (inherited from the raylet); the (b)/(c) process has every variable = T and T torch/OpenCV threads.
The counts seen in the driver, an actor-sized Ray worker and the local process are printed and stored.

The floor of (a): a pass-through timer around ``reflade.eval.job._score`` in this process (the product's code runs
unchanged) and Ray Data's block stats of the scored dataset give, on one clock: resolving (call -> _score), start-up
(_score -> the first PredictStage block: plan, read, actors started and models loaded), the window (first
PredictStage block -> last ScoreStage block end), the tail (materialise, accumulator) and the report (_score's return
-> run_eval's: write_report, registration). floor_s = seconds - window_s; items / window_s is (a)'s rate without it,
and ``break_even_items`` the item count from which a target would be met with that floor and that rate.
Every arm's per-(item, model) metrics are compared with (c)'s. The machine may be shared: each arm waits up to
``--wait-quiet`` s for it to go quiet, and records the CPU share other processes took ("others %").

    .venv/bin/python bench/eval.py [--items 40] [--steps 20] [--batch-size 8] [--predict-actors 1] [--score-actors 1]
                                   [--num-cpus 0.5] [--threads T] [--ray-runs 2] [--repeat 2] [--quick] [--out F]
"""

from __future__ import annotations

import os
import sys

import _bench_machine as bm  # bench/ is this script's folder: first on sys.path

bm.set_thread_env(os.environ.get("RLBENCH_THREADS", "1"))  # before numpy, OpenCV or torch load
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import _eval_report as rp  # noqa: E402
from _eval_report import ARMS, METRICS, _f  # noqa: E402
from _eval_world import start_world  # noqa: E402

bt = bm.sibling("train")  # CpuMeter (with wait_quiet), write, machine_info, start_ray, _isolate_environment

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "eval.json"
SETTINGS = ("batch_size", "predict_actors", "score_actors", "num_cpus", "threads")
"""The EvalConfig fields the bench takes from its flags (beside the items' and the model's)."""


def _metric_rows(rows) -> list[dict[str, Any]]:
    return [{k: r.get(k) for k in ("item_id", "model", *METRICS)} for r in rows]


# ---------------------------------------------------------------------------------------------- (b), (c)
class _Timed:
    """A pass-through timer around a stage's ``__call__``."""

    def __init__(self, stage):
        self.stage, self.seconds = stage, 0.0

    def __call__(self, df):
        t = time.perf_counter()
        try:
            return self.stage(df)
        finally:
            self.seconds += time.perf_counter() - t


def local_arms(spec: dict[str, Any]) -> dict[str, Any]:
    """(b) and (c) in this fresh process (``--local-worker``): rows, items, the stages, a warm-up call, the runs."""
    import cv2
    import torch

    n = spec["threads"]
    torch.set_num_threads(n)
    cv2.setNumThreads(n)
    from reflade.engine.schema import load_rows
    from reflade.eval.scoring import PredictStage, ScoreStage, expand_row, score_local
    from reflade.platform.worker import worker_registry

    out: dict[str, Any] = {"threads": bm.thread_report(), "runs": {"loop": [], "batched": []}, "metrics": {}}
    fields, prefix, models, size = spec["storage_fields"], spec["prefix"], spec["models"], spec["metric_size"]
    t = time.perf_counter()
    rows = load_rows(worker_registry(fields, prefix), spec["dataset"], "test")
    records = [rec for row in rows for rec in expand_row(row, spec["prompt_types"])]
    out["read_s"], t = time.perf_counter() - t, time.perf_counter()
    # The arguments the job gives its actors (reflade.eval.job._score), with this process's weights cache.
    common = {"device": "cpu", "threads": n, "cache_dir": spec["cache_dir"]}
    predict = PredictStage(models, size, fields, prefix, steps=spec["steps"], guidance=1.0, seed=0, **common)
    score = ScoreStage(models, size, spec["networks"], fields, prefix, **common)
    out["build_s"], t = time.perf_counter() - t, time.perf_counter()
    score_local(records[:1], predict, score, batch_size=1)
    out["warmup_s"] = time.perf_counter() - t
    meter = bt.CpuMeter()
    for _ in range(spec["repeat"]):
        for arm, batch_size in (("loop", 1), ("batched", spec["batch_size"])):
            quiet = meter.wait_quiet(spec["wait_quiet"], spec["quiet_below"]) if spec["wait_quiet"] else None
            p, s = _Timed(predict), _Timed(score)
            df, cpu = meter.measure(lambda p=p, s=s, b=batch_size: score_local(records, p, s, batch_size=b))
            seconds = cpu["wall_s"]
            fig = {"batch_size": batch_size, "threads": n, "items": len(records), "rows_out": len(df)}
            fig.update(seconds=seconds, samples_per_s=len(records) / seconds, predict_s=p.seconds)
            out["runs"][arm].append({**fig, "score_s": s.seconds, "quiet": quiet, "cpu": cpu})
            out["metrics"][arm] = _metric_rows(df.to_dict("records"))
    return out


def run_local(spec: dict[str, Any], root: Path) -> dict[str, Any]:
    """(b) and (c) in a fresh process with T threads (this script, ``--local-worker``)."""
    spec_file, out_file = root / "local-spec.json", root / "local-out.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "RLBENCH_THREADS": str(spec["threads"])}
    env.update({k: str(spec["threads"]) for k in bm.THREAD_VARS})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--local-worker", str(spec_file), str(out_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"local arms failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return json.loads(out_file.read_text())


# ---------------------------------------------------------------------------------------------- (a)
class _ScoreTimer:
    """A pass-through timer around ``reflade.eval.job._score``, in this process only: when it was called and when
    it returned, and what (the accumulator and the scored dataset)."""

    def __enter__(self):
        import reflade.eval.job as job

        self.saved = job._score

        def timed(*a, **kw):
            self.called = time.perf_counter()
            self.acc, self.scored = self.saved(*a, **kw)
            self.returned = time.perf_counter()
            return self.acc, self.scored

        job._score = timed
        return self

    def __exit__(self, *exc):
        import reflade.eval.job as job

        job._score = self.saved


def stage_stats(scored, origin: float) -> dict[str, dict[str, Any]]:
    """Ray Data's stats of the PredictStage and ScoreStage operators: blocks, their summed time, the first start
    and the last end (seconds after ``origin``, a time.perf_counter)."""
    out: dict[str, dict[str, Any]] = {}
    chain, s = [], scored.get_stats_summary()
    while s is not None:
        chain.append(s)
        s = s.parents[0] if getattr(s, "parents", None) else None
    for summary in reversed(chain):
        for op in summary.operators_stats or []:
            for name in ("PredictStage", "ScoreStage"):
                if name in op.operator_name:
                    wall, start, end = op.wall_time, op.earliest_start_time, op.latest_end_time
                    out[name] = {
                        "operator": op.operator_name,
                        "blocks": getattr(wall, "count", None),
                        "block_wall_s": getattr(wall, "sum", None),
                        "first_block_s": start - origin if start else None,
                        "last_block_end_s": end - origin if end else None,
                    }
    return out


def run_ray_arm(cfg, model: str, settings, tag: str, meter) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from reflade.eval.job import EvalRequest, run_eval

    lines: list[str] = []
    clock: dict[str, float] = {}

    def call():
        clock["start"] = time.perf_counter()
        try:
            return run_eval(cfg, EvalRequest(model=model, settings=settings), log=lines.append)
        finally:
            clock["end"] = time.perf_counter()

    with _ScoreTimer() as timer:
        outcome, cpu = meter.measure(call)
    seconds, items = clock["end"] - clock["start"], len({r["item_id"] for r in timer.acc.samples})
    stats = stage_stats(timer.scored, timer.called)
    predict, score = stats.get("PredictStage", {}), stats.get("ScoreStage", {})
    start, end = predict.get("first_block_s"), score.get("last_block_end_s")
    window = end - start if start is not None and end is not None else None
    fig = {
        "tag": tag,
        "settings": {k: getattr(settings, k) for k in SETTINGS},
        "items": items,
        "rows_scored": len(timer.acc.samples),
        "seconds": seconds,
        "samples_per_s": items / seconds,
        "resolve_s": timer.called - clock["start"],
        "startup_s": start,
        "window_s": window,
        "tail_s": timer.returned - timer.called - end if end is not None else None,
        "report_s": clock["end"] - timer.returned,
        "floor_s": seconds - window if window else None,
        "window_samples_per_s": items / window if window else None,
        "predict_stage": predict,
        "score_stage": score,
        "report_ref": outcome.version.ref,
        "models": outcome.report["models"],
        "log": lines,
        "cpu": cpu,
    }
    return fig, _metric_rows(timer.acc.samples)


def ray_threads(num_cpus: float, threads: int) -> dict[str, Any]:
    """Thread counts in a Ray worker with an actor's CPUs, after the stages' own torch.set_num_threads."""
    import ray

    ray.cloudpickle.register_pickle_by_value(bm)  # the workers cannot import bench/'s modules

    @ray.remote(num_cpus=num_cpus)
    def probe(n: int) -> dict[str, Any]:
        import torch

        torch.set_num_threads(n)
        return bm.thread_report()

    return ray.get(probe.remote(threads))


# ---------------------------------------------------------------------------------------------- main
def run(args) -> int:
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    from reflade.eval.config import DEFAULT_PROMPT_TYPES, STAND_IN_NETWORKS, EvalConfig
    from reflade.platform.worker import storage_fields

    bt._isolate_environment()
    signal.signal(
        signal.SIGTERM, lambda *_: sys.exit(143)
    )  # a `timeout` still stops SeaweedFS and Ray (finally)
    params = {k: v for k, v in vars(args).items() if k != "out"}
    params["actor_threads"] = max(1, args.threads // (args.predict_actors + args.score_actors))
    params["prompt_types"] = list(DEFAULT_PROMPT_TYPES)
    result: dict[str, Any] = {"benchmark": "eval", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result.update(command=" ".join(["python", *sys.argv]), params=params, definitions=rp.DEFINITIONS)
    result.update(targets=rp.TARGETS, machine=bt.machine_info(), runs={"ray": [], "loop": [], "batched": []})
    result.update(summary=None, status="failed")
    m = result["machine"]
    print(f"eval benchmark | {m['cpus_usable']} usable CPUs ({m['cpu_model']}) | ray {m['ray']} | torch "
          f"{m['torch']} | load average {os.getloadavg()}", flush=True)  # fmt: skip
    meter, root, world = bt.CpuMeter(), Path(tempfile.mkdtemp(prefix="rle-bench-", dir="/tmp")), None
    try:
        t = time.perf_counter()
        world = start_world(root, args.items, args.size)
        models = [world["model"], "copy-visible", "classical"]  # run_eval's order: the subject, the baselines
        params.update(
            world["data"], dataset=f"{world['dataset']}:test", models=models, networks=world["networks"]
        )
        print(
            f"setup {time.perf_counter() - t:.1f} s: {world['data']} -> {world['dataset']}, {world['model']}"
        )

        print(f"\n{ARMS['loop']} and {ARMS['batched']}: one fresh process, no Ray cluster up", flush=True)
        spec = {
            k: params[k] for k in ("threads", "metric_size", "steps", "batch_size", "repeat", "prompt_types")
        }
        spec.update(wait_quiet=args.wait_quiet, quiet_below=args.quiet_below, models=models)
        spec.update(storage_fields=storage_fields(world["cfg"]), prefix=world["cfg"].registry.prefix)
        spec.update(dataset=world["dataset"], networks=world["networks"], cache_dir=str(root / "cache-local"))
        local = run_local(spec, root)
        metrics = {"(b)": local["metrics"].pop("loop"), "(c)": local["metrics"].pop("batched")}
        result["runs"].update(local.pop("runs"))
        result["local"] = {k: v for k, v in local.items() if k != "metrics"}
        bt.write(result, args.out)

        import ray

        ray_tmp = bt.start_ray(args.cores)
        try:
            settings = EvalConfig(
                dataset=f"{world['dataset']}:test",
                metric_size=args.metric_size,
                steps=args.steps,
                weights_cache=str(root / "cache-ray"),
                **{k: params["actor_threads" if k == "threads" else k] for k in SETTINGS},
                **{f"{k}_net": v for k, v in STAND_IN_NETWORKS.items()},
            )
            params["eval_config"] = dataclasses.asdict(settings)
            actor = ray_threads(args.num_cpus, settings.threads)
            result["threads"] = {"driver": bm.thread_report(), "actor": actor, "local": local["threads"]}
            for i in range(args.ray_runs):
                tag = "cold" if i == 0 else "warm" if i == 1 else f"warm{i}"
                print(f"\n{ARMS['ray']} ({tag})", flush=True)
                quiet = meter.wait_quiet(args.wait_quiet, args.quiet_below) if args.wait_quiet else None
                fig, metrics[f"(a) {tag}"] = run_ray_arm(world["cfg"], world["model"], settings, tag, meter)
                result["runs"]["ray"].append({**fig, "quiet": quiet})
                print(
                    f"  {fig['samples_per_s']:.2f} items/s ({fig['seconds']:.1f} s, floor {_f(fig['floor_s'])} s)"
                )
                rp.summarize(result)
                bt.write(result, args.out)
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
        ref = metrics.pop("(c)")
        result["consistency"] = {arm: rp.compare_metrics(rows, ref) for arm, rows in metrics.items()}
        rp.summarize(result)
        result["status"] = "ok"
    finally:
        if world is not None:
            world["server"].stop()
        shutil.rmtree(root, ignore_errors=True)
        bt.write(result, args.out)
    rp.print_tables(result)
    print(f"\nwrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--local-worker"]:  # the (b)/(c) process run_local starts
        Path(argv[2]).write_text(json.dumps(local_arms(json.loads(Path(argv[1]).read_text()))))
        return 0
    from reflade.eval.config import EvalConfig

    d, cpus = EvalConfig(), len(os.sched_getaffinity(0))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, kind, default, text in (
        ("items", int, 40, "items = dataset rows scored"),
        ("size", int, 64, "synthetic scene side in px"),
        ("metric-size", int, 64, "EvalConfig.metric_size (64: the scenes' own size)"),
        ("steps", int, d.steps, "the model's sampling steps (EvalConfig's)"),
        ("batch-size", int, d.batch_size, "EvalConfig.batch_size, and (c)'s batch"),
        ("predict-actors", int, d.predict_actors, "EvalConfig.predict_actors"),
        ("score-actors", int, d.score_actors, "EvalConfig.score_actors"),
        ("num-cpus", float, d.num_cpus, "EvalConfig.num_cpus, per actor"),
        ("threads", int, cpus, "T, threads per arm in all: (b)/(c) T, each actor of (a) max(1, T // actors)"),
        ("cores", int, cpus, "CPUs of the local Ray cluster"),
        ("repeat", int, 2, "runs of (b) and of (c); the fastest counts"),
        ("ray-runs", int, 2, "runs of (a): cold, then warm reruns on the same cluster"),
        (
            "wait-quiet",
            float,
            30.0,
            "before each arm, wait up to this many s for the machine to go quiet (0: no)",
        ),
        ("quiet-below", float, 0.25, "the busy share of the machine's CPUs under which it counts as quiet"),
    ):
        ap.add_argument(f"--{flag}", type=kind, default=default, help=f"{text} (default {default})")
    ap.add_argument(
        "--quick", action="store_true", help="tests: 6 items, 2 steps, batch 4, each arm once, no wait"
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the JSON result (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.quick:
        args.items, args.steps, args.batch_size, args.ray_runs, args.repeat, args.wait_quiet = (
            6,
            2,
            4,
            1,
            1,
            0.0,
        )
    small = [
        k for k, v in vars(args).items() if isinstance(v, int | float) and not isinstance(v, bool) and v <= 0
    ]
    if [k for k in small if k not in ("wait_quiet", "quiet_below")]:
        ap.error(f"--{small[0].replace('_', '-')} must be > 0")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
