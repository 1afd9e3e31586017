"""bench/engine.py's report: what its figures mean (``DEFINITIONS``, written into the JSON), the comparison it
draws (``summarize_result``), and the tables and lines it prints."""

from __future__ import annotations

import json
import pickle
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

TIMED_STAGES = ("prefilter", "scene", "completion", "matting", "prompts", "postfilter")
TARGET_SPEEDUP = 1.6
TARGET_OVERHEAD_PCT = 5.0
DEFINITIONS = {
    "stage_time_s": "sum over images of Work.timings (stage code only, wall clock: "
    + ", ".join(TIMED_STAGES)
    + "); for the product, summed from the run's done markers",
    "write_s": "product: seconds of the shard writer (rows built, both shards encoded and uploaded), summed over "
    "batches from the markers; not part of stage_time_s",
    "phases_s": "product: wall seconds of each part of run_engine (RunResult.phases): ingest (the registry "
    "input's manifest), plan (run id, markers listed), connect (Ray already up: a no-op), barrier (from_items, "
    "read from the bucket, pre-filter, materialize, near-duplicates), stages (stages 2-6 and the writer, to the "
    "last shard staged), commit (balance checked, version registered with its shards copied server-side)",
    "phase_share": "product: phases_s / wall_s",
    "ray_start_s": "product: ray.init of the local cluster, before the timed runs (not in wall_s)",
    "overhead_pct": "100 * (wall_s * cores - stage_time_s) / stage_time_s; cores = 1 for plain, --cores for ray. "
    "Reads low (even negative) when processes outnumber cores: stage times then include waiting",
    "overhead_per_image_ms": "1000 * (wall_s * cores - stage_time_s) / images",
    "own_cpu_per_image_ms": "1000 * CPU seconds of this process tree (driver, Ray's daemons and workers, the object "
    "store, reaped ones included) during the run / images",
    "cpu_overhead_pct": "100 * (own_cpu_per_image_ms(ray) - mean own_cpu_per_image_ms(plain)) / the latter",
    "idle_pct": "100 * idle CPU seconds of the machine / (machine CPUs * wall_s): cores nobody used",
    "foreign_pct": "100 * CPU seconds of other processes / (machine CPUs * wall_s): the machine may be shared",
    "contention": "stage_time_s(ray) / stage_time_s(plain)",
    "speedup": "images_per_s(ray) / images_per_s(plain)",
    "parallel_efficiency": "speedup / cores",
    "wall_s": "ray: the whole run_engine call (ingest to the registered version); plain: the whole call",
    "cpu_by_process": "ray: CPU seconds per process title (sampled every 1 s)",
    "cpu_bound_speedup": "cores * mean own_cpu_per_image_ms(plain) / own_cpu_per_image_ms(ray): the speed-up on "
    "a quiet machine if no core idled (an upper bound)",
    "cluster_idle_cores": "ray: CPU seconds per second used by this process tree (the driver, Ray's daemons, its "
    "service actors, the object store) while no dataset runs, measured for IDLE_PROBE_S just before the timed run",
    "floor": "ray, defaults runs with --floor: from_items of the same records in the engine's order and blocks, one "
    "actor pool of the fused pool's size, CPUs and batch size, with stage code that only sleeps each image's share "
    "of its batch's stage time in the run just measured: what Ray Data costs on this node whatever the stages do "
    "(no barrier, writer, bucket or commit)",
    "actor_constructed_s": "floor: per actor of the pool, when its constructor ran (seconds after from_items())",
    "floor_idle_pct": "floor: 100 * (wall_s * cores - slept_s) / slept_s: the core time the floor run left unused; "
    "the same formula as overhead_pct, so comparable with it",
    "floor_cpu_pct": "floor: 100 * CPU seconds of every process of the tree but the pool's actors / slept_s",
    "above_floor_pct": "overhead_pct - floor_idle_pct: the part of the whole-run overhead that the product adds above "
    "Ray Data's own (the bucket, the barrier, the writer, the commit, moving records, pickling)",
    "best": "the run compared: the engine defaults (EngineConfig(), stock Ray), else the fastest Ray run; "
    "plain: the fastest plain run",
}


def _setting_label(s: dict[str, Any]) -> str:
    if s["layout"] == "fused":
        actors = s.get("actors") or s["fused_actors"] or "1/CPU"
        label = f"fused, {actors} actors x {s['num_cpus_per_actor']:g} CPU bs={s['batch_size']}"
    else:
        label = (
            f"staged, {s['cpu_actors']}/pool cpu/actor={s['num_cpus_per_actor']:g} "
            f"cpu/task={s['num_cpus_per_task']:g} bs={s['batch_size']}"
        )
    label = ("defaults: " if s.get("defaults") else "") + label
    return label + ("" if s["keep_workers"] else " stock")


def _arm(s: dict[str, Any]) -> str:
    return "(a) product"


def print_tables(result: dict[str, Any]) -> None:
    plain_runs = result.get("plain_runs", [])
    runs = result.get("ray", [])
    best, plain = result.get("best"), result.get("plain")
    head = (
        f"{'arm':<11} {'setting':<46} {'imgs':>4} {'wall s':>6} {'img/s':>5} {'speedup':>7} {'stage s':>7} "
        f"{'ovh ms/img':>10} {'ovh %':>6} {'cpu ms/img':>10} {'cpu x':>5} {'idle %':>6} {'others %':>8} "
        f"{'kept':>4} {'quar':>4} {'layers':>6}"
    )
    print(head)
    print("-" * len(head))
    rows = [
        ("(b) plain", f"1 process, bs={r['batch_size']}" + (" *" if r is plain else ""), r)
        for r in plain_runs
    ]
    rows += [
        (_arm(r["setting"]), _setting_label(r["setting"]) + (" *" if r is best else ""), r) for r in runs
    ]
    for arm, label, r in rows:
        speed = f"{r['speedup']:.2f}x" if r.get("speedup") is not None else ""
        cpu_x = f"{r['cpu_bound_speedup']:.2f}" if r.get("cpu_bound_speedup") is not None else ""
        print(
            f"{arm:<11} {label:<46} {r['images']:>4} {r['wall_s']:>6.1f} {r['images_per_s']:>5.2f} {speed:>7} "
            f"{r['stage_time_s']:>7.1f} {r['overhead_per_image_ms']:>10.1f} {r['overhead_pct']:>6.1f} "
            f"{r['own_cpu_per_image_ms']:>10.1f} {cpu_x:>5} {r['idle_pct']:>6.1f} {r['foreign_pct']:>8.1f} "
            f"{r['images_kept']:>4} {r['images_quarantined']:>4} {r['layers_kept']:>6}"
        )
    print("* the runs compared: the fastest plain run and the engine defaults (else the fastest product run)")
    if plain and best:
        print(
            f"\nper-stage time (sum over images), plain vs the product run ({_setting_label(best['setting'])})"
        )
        h2 = f"{'stage':<11} {'plain s':>8} {'share':>6} {'product s':>9} {'share':>6} {'prod/plain':>10}"
        print(h2)
        print("-" * len(h2))
        for st in TIMED_STAGES:
            p, a = plain["stage_s"][st], best["stage_s"][st]
            print(
                f"{st:<11} {p:>8.2f} {plain['stage_share'][st]:>6.1%} {a:>9.2f} {best['stage_share'][st]:>6.1%} "
                f"{(a / p if p else 0):>10.2f}"
            )
        print(
            f"{'total':<11} {plain['stage_time_s']:>8.2f} {1:>6.0%} {best['stage_time_s']:>9.2f} {1:>6.0%} "
            f"{best['contention']:>10.2f}"
        )
        print(f"{'(writer)':<11} {'':>8} {'':>6} {best['write_s']:>9.2f}")
        print(
            f"\nwhere the product run's {best['wall_s']:.1f} s went: "
            + ", ".join(f"{k} {v:.1f} s ({best['phase_share'][k]:.0%})" for k, v in best["phases_s"].items())
            + f"; Ray's start before it {best['ray_start_s']:.1f} s (not timed)"
        )
        print(
            "CPU seconds per process, product run: "
            + ", ".join(f"{k} {v:.1f}" for k, v in list(best.get("cpu_by_process", {}).items())[:8])
        )


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)


def _public(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if k not in ("per_image", "image_stage_s")}


def _pick(runs: list[dict[str, Any]], **match) -> dict[str, Any] | None:
    same = [r for r in runs if all(r["setting"].get(k) == v for k, v in match.items())]
    if not same:
        return None
    r = max(same, key=lambda r: r["images_per_s"])
    keys = ("setting", "images_per_s", "speedup", "overhead_pct", "cpu_overhead_pct", "cpu_bound_speedup")
    return {k: r.get(k) for k in (*keys, "foreign_pct", "phases_s")}


def paired_speedups(result: dict[str, Any]) -> list[float]:
    """Per round of ``--repeat``: the compared setting's images/s over the same round's plain run (minutes apart,
    so a slow drift of the machine's speed hits both); the headline speed-up compares the fastest of each arm."""
    key = result["best"]["setting"]
    plain_by_round = {p["repeat"]: p for p in result.get("plain_runs", [])}
    return [
        r["images_per_s"] / plain_by_round[r["repeat"]]["images_per_s"]
        for r in result["ray"]
        if r["setting"] == key and r["repeat"] in plain_by_round
    ]


def summarize_result(result: dict[str, Any]) -> None:
    """The comparison: the fastest plain run against the engine's defaults (else the fastest product run)."""
    plain = result["plain"]
    runs = result["ray"]
    if not runs:
        return
    defaults = [r for r in runs if r["setting"].get("defaults")]
    best = max(defaults or runs, key=lambda r: r["images_per_s"])
    # Speed-ups of every product run against the fastest plain run so far (a later plain round may be faster).
    for r in result["ray"]:
        r["speedup"] = r["images_per_s"] / plain["images_per_s"]
        r["parallel_efficiency"] = r["speedup"] / r["cores"]
        r["contention"] = r["stage_time_s"] / plain["stage_time_s"]
    result["best"] = best
    result["summary"] = {
        "plain_images_per_s": plain["images_per_s"],
        "ray_images_per_s": best["images_per_s"],
        "speedup": best["speedup"],
        "ray_overhead_pct": best["overhead_pct"],
        "ray_cpu_overhead_pct": best["cpu_overhead_pct"],
        "phases_s": best["phases_s"],
        "phase_share": best["phase_share"],
        "write_s": best["write_s"],
        "ray_start_s": best["ray_start_s"],
        "stage_share": best["stage_share"],
        "plain_stage_share": plain["stage_share"],
        "cluster_idle_cores": best.get("cluster_idle_cores"),
        "cpu_bound_speedup": best["cpu_bound_speedup"],
        "ray_floor_idle_pct": (best.get("floor") or {}).get("floor_idle_pct"),
        "ray_floor_cpu_pct": (best.get("floor") or {}).get("floor_cpu_pct"),
        "ray_overhead_above_floor_pct": best.get("above_floor_pct"),
        "best_setting": best["setting"],
        "compared_is_engine_defaults": bool(best["setting"].get("defaults")),
        "fastest_staged": _pick(result["ray"], layout="staged"),
        "paired_speedups": paired_speedups(result),
        "speedup_target_met": best["speedup"] >= TARGET_SPEEDUP,
        "overhead_target_met": best["overhead_pct"] < TARGET_OVERHEAD_PCT,
        "cpu_bound_speedup_reaches_target": best["cpu_bound_speedup"] >= TARGET_SPEEDUP,
        "kept_counts_match": not result["mismatches"],
        "others_load_pct": {"plain": plain["foreign_pct"], "ray": best["foreign_pct"]},
    }
    ceiling = result.get("ceiling")
    if ceiling:
        ceiling["speedup"] = ceiling["images_per_s"] / plain["images_per_s"]
        result["summary"]["ceiling_speedup"] = ceiling["speedup"]
        result["summary"]["share_of_ceiling"] = best["speedup"] / ceiling["speedup"]


def report(result: dict[str, Any], args) -> None:
    sm = result.get("summary")
    if sm:
        print(
            f"\nspeed-up of the product run over the plain loop {sm['speedup']:.3f}x (target >= {TARGET_SPEEDUP}: "
            f"{'met' if sm['speedup_target_met'] else 'NOT met'}); overhead {sm['ray_overhead_pct']:.1f} % of "
            f"stage time; CPU overhead {sm['ray_cpu_overhead_pct']:.1f} %, CPU-bound speed-up "
            f"{sm['cpu_bound_speedup']:.3f}x"
        )
        if sm.get("ray_floor_idle_pct") is not None:
            fl = result["best"]["floor"]
            print(
                f"Ray Data's own floor on this node (--floor: this run's schedule, stage code that only sleeps): "
                f"{sm['ray_floor_idle_pct']:.1f} % of stage time left unused (first batch after "
                f"{fl['first_batch_s']:.1f} s), against this run's {sm['ray_overhead_pct']:.1f} %: the product adds "
                f"{sm['ray_overhead_above_floor_pct']:.1f} %; the driver, Ray's daemons and service actors used CPU "
                f"worth {sm['ray_floor_cpu_pct']:.1f} % of stage time"
            )
        if len(sm.get("paired_speedups") or []) > 1:
            print(
                "speed-up per round (the compared setting over the same round's plain run): "
                + ", ".join(f"{x:.3f}x" for x in sm["paired_speedups"])
            )
        if "ceiling_speedup" in sm:
            print(
                f"ceiling (c): {args.cores} plain processes reach {sm['ceiling_speedup']:.3f}x on this machine; "
                f"the product run reaches {sm['share_of_ceiling']:.1%} of it"
            )
        if max(sm["others_load_pct"].values()) > 100 * args.quiet_below:
            print(
                f"WARNING: other processes used {sm['others_load_pct']['plain']:.0f} % (plain) and "
                f"{sm['others_load_pct']['ray']:.0f} % (product) of the machine during the compared runs"
            )
    for mm in result["mismatches"]:
        print(
            f"MISMATCH product vs plain ({_setting_label(mm['setting'])}): {mm['count']} images, e.g. "
            + "; ".join(mm["differences"][:3])
        )
    print(f"\nwrote {args.out}")


def _fmt_pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} %"


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-image outcome and per-stage time sums from the pickled ``Work`` each output row carries."""
    stage_s: dict[str, float] = defaultdict(float)
    per_image: dict[str, list] = {}
    image_stage_s: dict[str, float] = {}
    quarantined: Counter[str] = Counter()
    layers_kept = 0
    for r in rows:
        work = pickle.loads(r["work"])
        for stage, secs in work.timings.items():
            stage_s[stage] += secs
        image_stage_s[r["source_id"]] = sum(work.timings.values())
        kept_layers = sum(bool(lay.ok) for lay in work.layers) if r["ok"] else 0
        layers_kept += kept_layers
        code = (r["reason"] or "").split(":", 1)[0]
        per_image[r["source_id"]] = [bool(r["ok"]), r["stage"] or "", code, kept_layers]
        if not r["ok"]:
            quarantined[f"{r['stage']}:{code}"] += 1
    total = sum(stage_s.values())
    return {
        "images": len(rows),
        "images_kept": sum(v[0] for v in per_image.values()),
        "images_quarantined": sum(not v[0] for v in per_image.values()),
        "quarantine_reasons": dict(sorted(quarantined.items())),
        "layers_kept": layers_kept,
        "stage_time_s": total,
        "stage_s": {s: stage_s.get(s, 0.0) for s in TIMED_STAGES},
        "stage_share": {s: (stage_s.get(s, 0.0) / total if total else 0.0) for s in TIMED_STAGES},
        "per_image": per_image,
        "image_stage_s": image_stage_s,
    }


def arm_figures(summary: dict[str, Any], wall: float, cores: float, cpu: dict[str, float]) -> dict[str, Any]:
    """Throughput and overheads of one timed run (see DEFINITIONS)."""
    n = summary["images"]
    stage = summary["stage_time_s"]
    capacity = cpu["machine_cpus"] * cpu["wall_s"]
    return {
        "wall_s": wall,
        "cores": cores,
        "images_per_s": n / wall if wall else 0.0,
        "overhead_per_image_ms": 1000 * (wall * cores - stage) / n if n else 0.0,
        "overhead_pct": 100 * (wall * cores - stage) / stage if stage else 0.0,
        "own_cpu_per_image_ms": 1000 * cpu["own_cpu_s"] / n if n else 0.0,
        "idle_pct": 100 * cpu["idle_cpu_s"] / capacity if capacity else 0.0,
        "foreign_pct": 100 * cpu["foreign_load"],
        "cpu": cpu,
    }


def compare(plain: dict[str, Any], ray_run: dict[str, Any]) -> list[str]:
    """Per-image differences between the arms (same code, same inputs: any difference is a bug)."""
    a, b = ray_run["per_image"], plain["per_image"]
    diffs = [f"{sid}: only in {'ray' if sid in a else 'plain'}" for sid in sorted(set(a) ^ set(b))]
    diffs += [
        f"{sid}: ray {a[sid]} != plain {b[sid]} (ok, stage, reason code, layers kept)"
        for sid in sorted(set(a) & set(b))
        if a[sid] != b[sid]
    ]
    return diffs


def floor_figures(
    run: dict[str, Any], slept_s: float, cores: float, by_title: dict[str, float]
) -> dict[str, Any]:
    """The floor's figures (DEFINITIONS: floor_idle_pct, floor_cpu_pct) from one floor run, the
    stage time it slept in all and the CPU seconds per process title; the pool's actors are the ``ray::MapWorker``
    titles (their CPU, start-up and Ray Data's per-batch work, is time the run waits for, inside the idle share)."""
    if slept_s <= 0:
        raise ValueError("the floor run slept no stage time: nothing to compare with")
    actors_cpu = sum(v for k, v in by_title.items() if k.startswith("ray::MapWorker"))
    others_cpu = sum(v for k, v in by_title.items() if not k.startswith("ray::MapWorker"))
    idle_pct = 100 * (run["wall_s"] * cores - slept_s) / slept_s
    cpu_pct = 100 * others_cpu / slept_s
    return {
        **run,
        "slept_s": slept_s,
        "actors_cpu_s": actors_cpu,
        "ray_cpu_s": others_cpu,
        "floor_idle_pct": idle_pct,
        "floor_cpu_pct": cpu_pct,
        "cpu_by_process": by_title,
    }


def product_figures(res, back: dict[str, Any]) -> dict[str, Any]:
    """A product run's outcome in the plain arm's terms (``summarize``), from what it committed (``read_back``)."""
    stage_s = {st: back["stage_s"].get(st, 0.0) for st in TIMED_STAGES}
    total = sum(stage_s.values())
    per_image = back["per_image"]
    quarantined = Counter(f"{v[1]}:{v[2]}" for v in per_image.values() if not v[0])
    return {
        "images": len(per_image),
        "images_kept": sum(v[0] for v in per_image.values()),
        "images_quarantined": sum(not v[0] for v in per_image.values()),
        "quarantine_reasons": dict(sorted(quarantined.items())),
        "layers_kept": res.layers_kept,
        "stage_time_s": total,
        "stage_s": stage_s,
        "stage_share": {s: (stage_s[s] / total if total else 0.0) for s in TIMED_STAGES},
        "write_s": back["stage_s"].get("write", 0.0),
        "shards": back["shards"],
        "dataset": res.dataset,
        "per_image": per_image,
        "image_stage_s": back["image_stage_s"],
    }
