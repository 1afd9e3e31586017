"""bench/engine.py's command line: its options, ``--quick`` (the test's short run) and their checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from _engine_arms import PHOTOS
from _engine_threads import KEEP_WORKERS_CONFIG

from reflade.engine.config import EngineConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "engine.json"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``: the command line without the program, default ``sys.argv[1:]``); exits with a message
    on a bad combination."""
    ap = argparse.ArgumentParser(
        description=(
            "Images per second through the data engine's six stages (classical backends): (a) the whole product "
            "run (run_engine: read from the bucket, pre-filter, barrier, stages 2-6, shard writer, commit) on a "
            "local Ray cluster this script starts (--cores CPUs) and an object store of its own, with the engine's "
            "defaults (layout auto: fused on a CPU cluster) on stock Ray, then the staged layout once per "
            "--cpu-actors x --batch-size with idle workers kept, for comparison; against (b) the same stage code in "
            "one plain process (run_stages_plain). Thread counts are pinned to 1 in both arms and printed. Prints a "
            "table (images/s, speed-up, per-stage shares, Ray overhead, CPU used by this run and by other "
            "processes) and writes JSON with machine info to --out after each run."
        ),
    )
    ap.add_argument(
        "--scenes", type=int, default=256, help="synthetic scenes, seeds 0..N-1, 256x256 (default 256)"
    )
    ap.add_argument(
        "--photos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add scikit-image's colour photos: " + ", ".join(PHOTOS) + " (default on)",
    )
    ap.add_argument(
        "--batch-size",
        type=_int_list,
        default=[EngineConfig().batch_size],
        help="images per Ray Data batch, comma-separated to compare several (default "
        f"{EngineConfig().batch_size}); the plain arm uses the first",
    )
    ap.add_argument(
        "--cpu-actors",
        type=_int_list,
        default=[1],
        help="staged runs: actors per stage pool, comma-separated to compare several (default 1)",
    )
    ap.add_argument(
        "--cpus-per-actor",
        type=float,
        default=None,
        help="CPUs reserved per stage actor (default: 0.5 when the pools fit, else cores/(3*actors+1))",
    )
    ap.add_argument(
        "--cpus-per-task",
        type=float,
        default=None,
        help="CPUs reserved per stage task (default: as --cpus-per-actor)",
    )
    ap.add_argument("--cores", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    ap.add_argument(
        "--stock",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the engine's defaults (EngineConfig(): layout auto, i.e. fused on a CPU cluster, one actor "
        "per CPU) on stock Ray: the run compared with (b) (default on)",
    )
    ap.add_argument(
        "--keep-workers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="for the staged runs, keep idle Ray workers alive ("
        + ", ".join(f"{k}={v}" for k, v in KEEP_WORKERS_CONFIG.items())
        + "; default on)",
    )
    ap.add_argument(
        "--staged",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the staged layout (engine.layout: staged: one actor pool per model stage) once per "
        "--cpu-actors x --batch-size, for comparison (default on)",
    )
    ap.add_argument(
        "--thread-pinning",
        choices=("inherit", "runtime-env"),
        default="inherit",
        help="how the Ray workers get the pinned thread variables: inherited from the raylet this script "
        "starts (default), or a job runtime_env + worker_process_setup_hook (slower actor start-up); the counts "
        "are checked in a task and an actor either way",
    )
    ap.add_argument(
        "--ceiling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run (c): --cores plain processes at once, each on 1/cores of the images, no Ray: the "
        "speed-up this machine allows any parallel layout (default on)",
    )
    ap.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after each run of the defaults, run Ray Data's own floor (from_items, one actor pool) with stage code that only sleeps each "
        "image's stage time: Ray Data's own cost on this node for that schedule, and how much of the run's "
        "overhead the product adds above it (default on)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="timed runs per arm and setting; the fastest of each is compared (default 1)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each timed run, wait up to this many seconds for other processes to use less "
        "than --quiet-below of the machine (0: never wait; default 60)",
    )
    ap.add_argument(
        "--quiet-below",
        type=float,
        default=0.1,
        help="share of the machine's CPUs others may use for it to count as quiet (default 0.1)",
    )
    ap.add_argument(
        "--warmup", type=int, default=6, help="untimed warm-up scenes before each arm's runs (default 6)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a short run for tests: 16 scenes, no photos, one Ray setting (the engine defaults on stock "
        "Ray), no staged runs, 2 warm-up scenes, no waiting",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result file (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.quick:
        args.scenes = min(args.scenes, 16)
        args.photos = False
        args.cpu_actors = args.cpu_actors[:1]
        args.batch_size = args.batch_size[:1]
        args.repeat = 1
        args.wait_quiet = 0.0
        args.stock = True
        args.staged = False
        args.ceiling = False
        args.warmup = min(args.warmup, 2)
    if args.scenes < 0 or (args.scenes == 0 and not args.photos):
        ap.error("need at least one image: --scenes >= 1 or --photos")
    if args.cores < 1 or args.repeat < 1 or args.warmup < 1:
        ap.error("--cores, --repeat and --warmup must be >= 1")
    return args
