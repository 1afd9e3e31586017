"""bench/eval.py's results: the ratios of its arms against the targets, the floor of the Ray job and the item count
from which a target would be met, the same-results check, and the printed tables. Pure arithmetic on the figures the
arms wrote (no torch, no Ray): tests/eval/test_bench_eval.py checks it on figures of its own."""

from __future__ import annotations

import math
from typing import Any

import _bench_machine as bm

TARGETS = {"ray_over_loop": 2.0, "ray_over_batched": 0.8}
NAMES = {"ray_over_loop": "(a)/(b)", "ray_over_batched": "(a)/(c)"}
ARMS = {"ray": "(a) Ray job run_eval", "loop": "(b) per-sample loop", "batched": "(c) batched, 1 process"}
METRICS = ("s_vis", "s_gen", "alpha_iou", "psnr_visible", "hidden_rgb_mae")
DEFINITIONS = {
    "samples_per_s": "items / seconds of the arm (every model scored)",
    "ray.seconds": "run_eval from call to return = resolve_s + startup_s + window_s + tail_s + report_s",
    "ray.startup_s": "_score's call -> the first PredictStage block's start (Ray Data's stats, time.perf_counter)",
    "ray.window_s": "the first PredictStage block's start -> the last ScoreStage block's end",
    "ray.report_s": "_score's return -> run_eval's return (write_report, the registration)",
    "ray.floor_s": "seconds - window_s: the job's fixed cost per run",
    "ray.*_stage.block_wall_s": "the sum of a pool's block times (stage code plus Ray Data's conversions)",
    "loop/batched": "score_local over every item, records in memory; predict_s/score_s: each stage's __call__",
    "ray_over_loop": "samples_per_s (a) / (b), target >= 2; ray_over_batched: (a) / (c), target >= 0.8",
    "break_even_items": "floor_s / (1 / (target x other rate) - 1 / window rate); null: the window rate itself is "
    "not above target x the other rate (no item count reaches the target)",
    "cpu.others_pct": "100 x (machine busy - this process tree) / (CPUs x wall): what other processes took",
    "max_abs_diff": "per metric, the largest |arm - (c)| over every (item, model); NaN on both sides is equal",
}


def compare_metrics(rows: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, Any]:
    """The same (item, model) pairs as ``ref``, and per metric the largest absolute difference."""

    def key(rs):
        return {(str(r["item_id"]), str(r["model"])): r for r in rs}

    a, b = key(rows), key(ref)
    diff = dict.fromkeys(METRICS, 0.0)
    for k in set(a) & set(b):
        for c in METRICS:
            x, y = (float("nan") if r[c] is None else float(r[c]) for r in (a[k], b[k]))
            if not (math.isnan(x) and math.isnan(y)):
                diff[c] = max(diff[c], abs(x - y) if not (math.isnan(x) or math.isnan(y)) else float("inf"))
    return {"same_pairs": set(a) == set(b), "pairs": len(a), "max_abs_diff": diff}


def break_even(floor_s: float | None, window_rate: float | None, need_rate: float) -> int | None:
    """Items from which a run with this fixed floor and window rate reaches ``need_rate`` (None: never)."""
    if floor_s is None or not window_rate or window_rate <= need_rate:
        return None
    return max(1, math.ceil(floor_s / (1 / need_rate - 1 / window_rate)))


def summarize(result: dict[str, Any]) -> None:
    """Per run of (a): its ratios to the fastest (b) and (c), met or not, the same at its window rate, and the
    break-even item counts; the cold run's ratios at the top level; the verdict lines."""
    runs = result["runs"]
    if not (runs["ray"] and runs["loop"] and runs["batched"]):
        return
    rate = {
        "ray_over_loop": max(r["samples_per_s"] for r in runs["loop"]),
        "ray_over_batched": max(r["samples_per_s"] for r in runs["batched"]),
    }
    s: dict[str, Any] = {
        "targets": TARGETS,
        "rates": {"loop": rate["ray_over_loop"]},
        "floor": [],
        "verdict": [],
    }
    s["rates"]["batched"] = rate["ray_over_batched"]
    s["batched_over_loop"] = rate["ray_over_batched"] / rate["ray_over_loop"]
    for fig in runs["ray"]:
        f = {k: fig[k] for k in ("tag", "samples_per_s", "floor_s", "startup_s", "report_s")}
        f["window_samples_per_s"] = w = fig["window_samples_per_s"]
        for key, target in TARGETS.items():
            f[key] = fig["samples_per_s"] / rate[key]
            f[f"{key}_met"] = f[key] >= target
            f[f"{key}_window"] = w / rate[key] if w else None
            f[f"{key}_break_even_items"] = break_even(fig["floor_s"], w, target * rate[key])
        s["floor"].append(f)
    for key, target in TARGETS.items():
        s[key], s[f"{key}_met"] = s["floor"][0][key], s["floor"][0][f"{key}_met"]
        f = max(s["floor"], key=lambda f, key=key: f[key])
        text = f"{NAMES[key]} = {f[key]:.2f} ({f['tag']}): target >= {target} {_met(f[f'{key}_met'])}"
        text += f" on {result['params']['items']} items"
        if f["floor_s"] is not None and f["window_samples_per_s"]:
            n = f[f"{key}_break_even_items"]
            text += (
                f"; floor {f['floor_s']:.1f} s per run (start-up {f['startup_s']:.1f} s, report "
                f"{f['report_s']:.1f} s); without it {f['window_samples_per_s']:.2f} items/s = "
                f"{f[f'{key}_window']:.2f} x: "
                + (
                    f"met from about {n} items"
                    if n
                    else "NOT reachable at any item count with these settings"
                )
            )
        s["verdict"].append(text)
    result["summary"] = s


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _f(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def print_tables(result: dict[str, Any]) -> None:
    p, runs = result["params"], result["runs"]
    print(f"\nitems: {p['items']} ({p['size']} px synthetic scenes, {', '.join(p['prompt_types'])}) x models "
          f"{', '.join(p['models'])}; metric size {p['metric_size']}, {p['steps']} steps")  # fmt: skip
    cols = "procs x thr|batch|items|seconds|items/s|predict s|score s|floor s|others %".split("|")
    head = f"{'arm':<26}" + "".join(f"{c:>12}" for c in cols)
    print(head + "\n" + "-" * len(head))
    rows = []
    for r in runs["ray"]:
        st, ps, ss = r["settings"], r["predict_stage"], r["score_stage"]
        procs = f"{st['predict_actors']}+{st['score_actors']}x{st['threads']}"
        times = (ps.get("block_wall_s"), ss.get("block_wall_s"), r["floor_s"])
        rows.append((f"{ARMS['ray']} {r['tag']}", procs, st["batch_size"], r, times))
    for arm in ("loop", "batched"):
        for r in runs[arm]:
            rows.append(
                (ARMS[arm], f"1x{r['threads']}", r["batch_size"], r, (r["predict_s"], r["score_s"], None))
            )
    for label, procs, batch, r, times in rows:
        figs = (r["seconds"], r["samples_per_s"], *times)
        line = f"{label:<26}{procs:>12}{batch:>12}{r['items']:>12}" + "".join(f"{_f(x):>12}" for x in figs)
        print(line + f"{r['cpu']['others_pct']:>12.0f}")
    print(
        "(a): procs = PredictStage + ScoreStage actors x torch threads each; predict s / score s = Ray Data's summed "
        "block time of each pool; floor s = seconds outside the window of blocks. (b)/(c): predict s / score s = "
        "time in each stage's __call__. others % = the CPU share other processes took during the arm"
    )
    for r in runs["ray"]:
        print(
            f"(a) {r['tag']}: {r['seconds']:.2f} s = resolve {r['resolve_s']:.2f} + start-up {_f(r['startup_s'])} "
            f"+ window {_f(r['window_s'])} ({_f(r['window_samples_per_s'])} items/s; blocks: PredictStage "
            f"{r['predict_stage'].get('blocks')}, ScoreStage {r['score_stage'].get('blocks')}) + tail "
            f"{_f(r['tail_s'])} + report {r['report_s']:.2f}"
        )
    if loc := result.get("local"):
        print(
            f"(b)/(c) process, untimed: read {loc['read_s']:.2f} s, build the stages {loc['build_s']:.2f} s, a "
            f"warm-up call {loc['warmup_s']:.2f} s ((a)'s window includes its actors' first calls)"
        )
    for name, t in result.get("threads", {}).items():
        print(f"threads: {name:<7} {bm.fmt_threads(t)}")
    for arm, c in result.get("consistency", {}).items():
        d = ", ".join(f"{k} {v:.2g}" for k, v in c["max_abs_diff"].items())
        print(f"{arm}: same (item, model) pairs as (c): {c['same_pairs']} ({c['pairs']}); max |diff|: {d}")
    if s := result.get("summary"):
        print()
        for f in s["floor"]:
            for key, target in TARGETS.items():
                print(
                    f"{NAMES[key]} {f['tag']:<5} = {f[key]:.2f} (target >= {target}: {_met(f[f'{key}_met'])}); "
                    f"at the window rate {_f(f[f'{key}_window'])}; the target "
                    + (f"from {n} items" if (n := f[f"{key}_break_even_items"]) else "at no item count")
                )
        print(f"(c)/(b) = {s['batched_over_loop']:.2f}")
        print("\n".join(s["verdict"]))
