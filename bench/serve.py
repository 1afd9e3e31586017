"""Benchmark: the decomposition service's throughput and latency over real HTTP on loopback, against the same model
called in process, its answers under overload, and its autoscaling.

One run starts its own SeaweedFS (a registry with the tiny RefLayer, random init, and one API token) and its own
local Ray cluster of ``--cores`` CPUs with Serve's proxy on a free port, deploys the PRODUCT's application
(``reflade.serve.app.build_app`` with a ``ServeConfig``; auth on, JSON answers so that the service's own timings
come back) and sends real ``POST /v1/decompose`` requests (a 64 px synthetic scene, a box, the service's default
model and steps). Arms, each bounded by a duration and a request count, every request with a timeout:

(c) in process, before Ray starts (first round): the model the replica loads (``RefLayerPipeline.from_registry``)
    through the deployment's batched code path ``reflade.serve.batching.decompose_group``, one item at a time and
    ``--batch-size`` items per call (the batching ceiling; also 2 and 2x ``--batch-size``);
(a) Serve with batching (``max_batch_size=--batch-size``), ``--replicas`` fixed replicas: one client (low load),
    ``--clients`` clients, then (first round) an open-loop overload at 2x the throughput just measured (200s and
    503s expected, no 500s, no hangs); ``GET /healthz`` gives the floor of an HTTP round trip through Serve;
(b) Serve without batching (``max_batch_size=1``): one client, then ``--clients`` clients;
autoscaling: ``min_replicas=1``, ``max_replicas=--scale-max``, ``--scale-num-cpus`` each, short upscale and
    downscale delays; ``--clients`` clients for ``--scale-load`` s, then idle until the replicas are back to one
    (at most ``--scale-idle`` s), the replica counts polled from ``serve.status()`` every second; a plot (PNG) is
    written beside the JSON.

``--rounds`` (default 2) runs (c), (a) and (b) again (redeployed; (c) then with Serve deployed and idle); the least
disturbed run of each arm is compared (highest throughput, lowest p50 at one client), every run is kept in ``runs``.

Threads (design.md, Pitfalls): every thread variable is T (``RLBENCH_THREADS``, default 1) in this process and so
in Ray's workers, which inherit it; (c) runs with T torch threads, as a replica does (probed and stored). The machine
may be shared: before each arm the run waits up to ``--wait-quiet`` s for it to go quiet, and each arm records the
CPU share other processes took. Targets are reported as met or not with the measured ratio; nothing is asserted.

    .venv/bin/python bench/serve.py [--clients 8] [--duration 30] [--batch-size 4] [--steps 20] [--smoke]
                                    [--out bench/results/serve.json]
"""

from __future__ import annotations

import os
import sys

import _bench_machine as bm  # bench/ is this script's folder: first on sys.path

THREADS = int(os.environ.get("RLBENCH_THREADS", "1"))
bm.set_thread_env(THREADS)  # before numpy, OpenCV or torch load; Ray's workers inherit it
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import _serve_load as load  # noqa: E402
import _serve_report as rp  # noqa: E402
import _serve_world as sw  # noqa: E402

bt = bm.sibling("train")  # CpuMeter (with wait_quiet), write, machine_info, start_ray, _isolate_environment

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "serve.json"
SMOKE = {
    "duration": 3.0,
    "max_requests": 40,
    "low_duration": 2.0,
    "low_requests": 10,
    "in_process_items": 8,
    "floor_requests": 10,
    "overload_duration": 1.5,
    "scale_load": 4.0,
    "scale_idle": 2.0,
    "steps": 2,
    "wait_quiet": 0.0,
    "rounds": 1,
}
"""--smoke: every arm runs, a few seconds each (the autoscaler has no time to act)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _arm(meter, args, fn, **extra) -> dict[str, Any]:
    """Run one arm (``fn() -> (answers, wall_s)``) after waiting for quiet; its summary with the CPU figures."""
    quiet = meter.wait_quiet(args.wait_quiet, args.quiet_below) if args.wait_quiet else None
    (answers, wall), cpu = meter.measure(fn)
    return {**extra, **load.summarize(answers, wall), "cpu": cpu, "quiet": quiet}


def _show(label: str, a: dict[str, Any]) -> None:
    print(
        f"  {label}: {a['ok']}/{a['requests']} ok, {a['throughput_rps']:.2f} req/s, p50 {a['p50_ms'] or 0:.1f} ms, "
        f"p99 {a['p99_ms'] or 0:.1f} ms, codes {a['codes']}",
        flush=True,
    )


def _warm_up(target, clients: int) -> None:
    """Two requests per client, not timed: the replica loads the model on its first request."""
    load.closed_loop(target, clients, 120.0, 2 * clients)


def in_process_arm(args, world, settings, meter, result, note: str) -> None:
    """(c) once more: every batch size, appended to ``result["runs"]["c"]``."""
    print(f"\n(c) in process, batch sizes {args.in_process_sizes}, {note}", flush=True)
    if args.wait_quiet:
        meter.wait_quiet(args.wait_quiet, args.quiet_below)
    c, cpu = meter.measure(
        lambda: sw.in_process(world, settings, args.in_process_sizes, args.in_process_items, THREADS)
    )
    result["runs"]["c"].append({**c, "cpu": cpu, "note": note})
    for size, e in c["sizes"].items():
        print(
            f"  batch {size}: {e['throughput_rps']:.2f} items/s, {e['ms_per_item']:.1f} ms per item",
            flush=True,
        )


def serve_round(args, world, port: int, settings_a, meter, result, first: bool) -> None:
    """One round of (a) then (b) on fixed replicas, each redeployed: one client, then ``--clients`` clients; the
    first round also measures the floor (after (a)'s deploy) and the overload test (after (a))."""
    url = f"http://127.0.0.1:{port}"
    target = load.json_target(url + "/v1/decompose", sw.request_body(), world["token"], args.timeout)
    runs = result["runs"]

    def arm(key: str, fn, **extra) -> dict[str, Any]:
        a = _arm(meter, args, fn, **extra)
        runs.setdefault(key, []).append(a)
        _show(rp.ARMS[key], a)
        return a

    for key, settings in (("a", settings_a), ("b", dataclasses.replace(settings_a, max_batch_size=1))):
        print(f"\n{rp.ARMS[key]}: deploying (max_batch_size={settings.max_batch_size})", flush=True)
        result["deploy_s"].setdefault(key, []).append(sw.deploy(world, settings, port))
        _warm_up(target, args.clients)
        if key == "a" and first:
            floor = load.Target(url + "/healthz", None, {}, args.timeout)
            arm(
                "floor",
                lambda floor=floor: load.closed_loop(floor, 1, args.low_duration, args.floor_requests),
                clients=1,
            )
        arm(
            f"low_{key}", lambda: load.closed_loop(target, 1, args.low_duration, args.low_requests), clients=1
        )
        busy = arm(
            key,
            lambda: load.closed_loop(target, args.clients, args.duration, args.max_requests),
            clients=args.clients,
        )
        bt.write(result, args.out)
        if key == "a" and first and busy["throughput_rps"] > 0:
            rate = rp.TARGETS["overload_factor"] * busy["throughput_rps"]
            over = arm(
                "overload",
                lambda rate=rate: load.open_loop(target, rate, args.overload_duration, args.max_outstanding),
                clients=f"open {rate:.1f}/s",
                offered_rps=rate,
            )
            after, _ = load.closed_loop(target, 1, args.timeout, 1)  # does it answer once the burst is over?
            over["answers_after"] = [a.status for a in after]
            bt.write(result, args.out)


def autoscaling_arm(args, world, port: int, settings_a, result) -> None:
    """Replicas rising under ``--clients`` clients and falling after, polled every second; a plot beside the JSON."""
    s = dataclasses.replace(
        settings_a,
        min_replicas=1,
        max_replicas=args.scale_max,
        num_cpus=args.scale_num_cpus,
        upscale_delay_s=args.upscale_delay,
        downscale_delay_s=args.downscale_delay,
    )
    print(f"\nautoscaling: deploying (replicas 1-{s.max_replicas} x {s.num_cpus:g} CPU)", flush=True)
    result["deploy_s"]["autoscaling"] = sw.deploy(world, s, port)
    target = load.json_target(
        f"http://127.0.0.1:{port}/v1/decompose", sw.request_body(), world["token"], args.timeout
    )
    _warm_up(target, 1)
    t0 = time.perf_counter()
    with sw.ReplicaPoller(t0) as poller:
        time.sleep(2.0)  # a baseline of readings before the load
        start = time.perf_counter() - t0
        answers, wall = load.closed_loop(target, args.clients, args.scale_load, 10**6)
        end = time.perf_counter() - t0
        print(f"  load {end - start:.0f} s: replicas now {poller.latest().get('running')}", flush=True)
        risen = any(x.get("running", 0) > s.min_replicas for x in poller.samples)
        while time.perf_counter() - t0 - end < args.scale_idle:
            time.sleep(1.0)
            last = poller.samples[-3:]
            if risen and len(last) == 3 and all(x.get("total") == s.min_replicas for x in last):
                break
    samples = poller.samples
    up = [x["t_s"] for x in samples if x.get("running", 0) > s.min_replicas]
    fell = [x["t_s"] for x in samples if x["t_s"] > end and x.get("total") == s.min_replicas]
    scale = {
        "settings": {
            k: getattr(s, k)
            for k in (
                "min_replicas",
                "max_replicas",
                "num_cpus",
                "target_ongoing_requests",
                "upscale_delay_s",
                "downscale_delay_s",
                "max_batch_size",
            )
        },  # fmt: skip
        "clients": args.clients,
        "load_start_s": start,
        "load_end_s": end,
        "load": load.summarize(answers, wall),
        "per_second": load.per_second(answers, start),
        "samples": samples,
        "max_running": max((x.get("running", 0) for x in samples), default=0),
        "first_up_s": up[0] - start if up else None,
        "back_to_min_s": fell[0] - end if up and fell else None,
    }
    plot = args.out.with_name(args.out.stem + "_autoscaling.png")
    sw.plot_autoscaling(scale, plot)
    scale["plot"] = plot.name
    result["autoscaling"] = scale
    print(
        f"  max replicas {scale['max_running']}, first added {scale['first_up_s']} s after the load began, back to "
        f"{s.min_replicas} {scale['back_to_min_s']} s after it ended; plot {plot}",
        flush=True,
    )


def replica_threads(num_cpus: float) -> dict[str, Any]:
    """Thread counts in a Ray worker with a replica's CPUs (what the decomposer's replica starts with), and where it
    imports ``reflade.serve`` from."""
    import ray

    ray.cloudpickle.register_pickle_by_value(bm)  # the workers cannot import bench/'s modules

    @ray.remote(num_cpus=num_cpus)
    def probe() -> dict[str, Any]:
        import reflade.serve.batching as batching

        return {**bm.thread_report(), "reflade_serve": os.path.dirname(batching.__file__)}

    return ray.get(probe.remote())


def run(args) -> int:
    import cv2
    import torch

    torch.set_num_threads(THREADS)
    cv2.setNumThreads(THREADS)
    from reflade.serve.config import ServeConfig

    bt._isolate_environment()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `timeout` still stops SeaweedFS and Ray
    params = {k: v for k, v in vars(args).items() if k != "out"}
    result: dict[str, Any] = {
        "benchmark": "serve",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    result.update(command=" ".join(["python", *sys.argv]), params=params, definitions=rp.DEFINITIONS)
    result.update(targets=rp.TARGETS, machine=bt.machine_info(), source=source_info())
    result.update(runs={"c": []}, arms={}, deploy_s={}, status="failed")
    m = result["machine"]
    print(f"serve benchmark | {m['cpus_usable']} usable CPUs ({m['cpu_model']}) | ray {m['ray']} | torch "
          f"{m['torch']} | load average {os.getloadavg()}", flush=True)  # fmt: skip
    meter, root = bt.CpuMeter(), Path(tempfile.mkdtemp(prefix="rls-bench-", dir="/tmp"))
    world, ray_tmp = None, None
    try:
        t = time.perf_counter()
        world = sw.start_world(root)
        print(f"setup {time.perf_counter() - t:.1f} s: {world['model']}", flush=True)
        settings = ServeConfig(
            model=world["model"],
            steps=args.steps,
            min_replicas=args.replicas,
            max_replicas=args.replicas,
            num_cpus=args.num_cpus,
            max_batch_size=args.batch_size,
        )
        params["serve_config"] = dataclasses.asdict(settings)
        params["batch_wait_timeout_s"] = settings.batch_wait_timeout_s

        in_process_arm(args, world, settings, meter, result, "no Ray cluster up")
        bt.write(result, args.out)

        ray_tmp = bt.start_ray(args.cores)
        result["threads"] = {
            "driver": bm.thread_report(),
            "replica": replica_threads(settings.num_cpus),
            "in_process": result["runs"]["c"][0]["threads"],
        }
        print(f"threads: replica {bm.fmt_threads(result['threads']['replica'])}; in process "
              f"torch={result['threads']['in_process']}", flush=True)  # fmt: skip
        port = _free_port()
        for r in range(args.rounds):
            if r:
                in_process_arm(
                    args, world, settings, meter, result, f"round {r + 1}, Serve deployed and idle"
                )
            serve_round(args, world, port, settings, meter, result, first=r == 0)
        rp.pick_best(result)
        if args.scale_max > 1:
            autoscaling_arm(args, world, port, settings, result)
        rp.summarize(result)
        result["status"] = "ok"
    finally:
        if ray_tmp is not None:
            import ray
            from ray import serve

            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                shutil.rmtree(ray_tmp, ignore_errors=True)
        if world is not None:
            world["server"].stop()
        shutil.rmtree(root, ignore_errors=True)
        result["loadavg_end"] = list(os.getloadavg())
        bt.write(result, args.out)
    rp.print_tables(result)
    print(f"\nwrote {args.out}")
    return 0


FLAGS: tuple[tuple[str, type, Any, str], ...] = (
    ("clients", int, 8, "concurrent clients of (a), (b) and the autoscaling load"),
    ("duration", float, 30.0, "seconds of (a) and (b) at --clients clients"),
    ("max-requests", int, 600, "most requests of (a) and (b) at --clients clients"),
    ("low-duration", float, 15.0, "seconds of each one-client arm (and the /healthz floor)"),
    ("low-requests", int, 100, "most requests of each one-client arm"),
    ("floor-requests", int, 200, "most GET /healthz requests (the floor)"),
    ("overload-duration", float, 15.0, "seconds of the open-loop overload at 2x (a)'s throughput"),
    ("max-outstanding", int, 64, "client threads of the overload test (requests in flight at most)"),
    ("timeout", float, 60.0, "seconds a request may take before it counts as a hang"),
    ("batch-size", int, 4, "ServeConfig.max_batch_size of (a), and (c)'s batch"),
    ("steps", int, 20, "ServeConfig.steps, the service's default steps (the requests name none)"),
    ("replicas", int, 1, "fixed decomposer replicas of (a) and (b)"),
    ("num-cpus", float, 1.0, "ServeConfig.num_cpus of (a) and (b)"),
    ("in-process-items", int, 48, "items of (c) per batch size"),
    ("rounds", int, 2, "rounds of (c), (a) and (b) (one client and --clients), the best of each compared"),
    ("scale-max", int, 3, "max_replicas of the autoscaling run (1: no autoscaling run)"),
    ("scale-num-cpus", float, 0.5, "num_cpus per replica of the autoscaling run"),
    ("upscale-delay", float, 2.0, "upscale_delay_s of the autoscaling run"),
    ("downscale-delay", float, 5.0, "downscale_delay_s of the autoscaling run"),
    ("scale-load", float, 45.0, "seconds of load in the autoscaling run"),
    ("scale-idle", float, 90.0, "most seconds of watching the replicas fall after the load"),
    ("cores", int, None, "CPUs of the local Ray cluster (default: the usable CPUs)"),
    (
        "wait-quiet",
        float,
        10.0,
        "before each arm, wait up to this many s for the machine to go quiet (0: no)",
    ),
    ("quiet-below", float, 0.25, "the busy share of the machine's CPUs under which it counts as quiet"),
)
"""(flag, type, default, help); --smoke takes :data:`SMOKE`'s value where it has one."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, kind, default, text in FLAGS:
        ap.add_argument(f"--{flag}", type=kind, default=None, help=f"{text} (default {default})")
    ap.add_argument(
        "--smoke", action="store_true", help="tests: every arm for a few seconds, 2 steps, no wait"
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the JSON result (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    for flag, _, default, _ in FLAGS:
        name = flag.replace("-", "_")
        if getattr(args, name) is None:
            setattr(args, name, SMOKE.get(name, default) if args.smoke else default)
    args.cores = args.cores or len(os.sched_getaffinity(0))
    for flag, *_ in FLAGS:
        value = getattr(args, flag.replace("-", "_"))
        if value <= 0 and flag not in ("wait-quiet", "quiet-below"):
            ap.error(f"--{flag} must be > 0")
    sizes = {1, args.batch_size} if args.smoke else {1, 2, args.batch_size, 2 * args.batch_size}
    args.in_process_sizes = sorted(sizes)
    return args


def source_info() -> dict[str, Any]:
    """Where ``reflade.serve`` was imported from, and the repository's commit and uncommitted product files (a
    shared checkout may hold someone's work in progress)."""
    import subprocess

    import reflade.serve.app as app

    root = Path(__file__).resolve().parents[1]
    info: dict[str, Any] = {"reflade_serve_app": app.__file__}
    try:
        git = ["git", "-C", str(root)]
        info["git_head"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", "platform", "engine", "train", "serve", "eval"],
            capture_output=True,
            text=True,
        ).stdout
        info["uncommitted"] = [line[3:] for line in status.splitlines()]
    except OSError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
