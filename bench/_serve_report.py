"""bench/serve.py's figures: the targets, the ratios between the arms, the verdicts and the printed tables."""

from __future__ import annotations

from typing import Any

TARGETS: dict[str, float] = {
    "a_over_b": 2.0,
    "a_over_c": 0.8,
    "added_p50_ms": 20.0,
    "overload_factor": 2.0,
}
"""(a)/(b) throughput at ``--clients`` clients, (a) over the in-process ceiling (c) at the same batch size, Serve's
added p50 over (c) one at a time at low load (ms, less than), and the overload test's offered rate as a multiple of
(a)'s throughput."""

ARMS: dict[str, str] = {
    "a": "(a) Serve, batching",
    "b": "(b) Serve, no batching",
    "low_a": "(a) Serve, batching, 1 client",
    "low_b": "(b) Serve, no batching, 1 client",
    "floor": "GET /healthz, 1 client",
    "overload": "(a) at 2x its throughput",
}

DEFINITIONS: dict[str, str] = {
    "throughput_rps": "answers with status 200 / wall seconds from the first send to the last answer",
    "p50_ms/p95_ms/p99_ms": "latency percentiles of the 200s, as the client saw them (send to last byte)",
    "breakdown": "medians over the 200s: outside_ingress_ms = latency - the ingress's timings.total_s (client, "
    "HTTP on loopback, Serve's proxy); ingress_ms = total_s - model_s (parse, auth, the handle call, the replica's "
    "queue and batch wait, PNG encoding); model_ms = timings.model_s, the batched model call (shared by its batch)",
    "in_process": "(c): RefLayerPipeline.from_registry (the replica's own load) called through "
    "reflade.serve.batching.decompose_group with `batch_size` items per call; p50_ms etc. are per call (each "
    "item of a call waits for the whole call)",
    "batching_ceiling": "(c) at --batch-size over (c) one at a time: the most batching can give this model on this "
    "CPU, hence about the most (a)/(b) can reach",
    "added_p50_ms": "p50 of one client's requests through Serve minus (c)'s p50 one at a time (the lowest of the "
    "rounds each); with batching on, a lone request also waits batch_wait_timeout_s for company (Ray Serve's "
    "@serve.batch)",
    "added_same_requests_ms": "median over the same requests of latency - the model call's seconds in the replica: "
    "Serve's added time without the drift of a shared machine between (c) and the Serve arm",
    "rounds": "runs[key] holds every round's figures; arms[key] the least disturbed (highest throughput, lowest "
    "p50 at one client), in_process.sizes the highest throughput per batch size",
    "overload": "requests sent at a fixed rate (open loop) of 2x (a)'s throughput; met when every answer is a 200 "
    "or a 503, some are 503s (the excess was shed, not queued) and none timed out",
    "cpu.others_pct": "share of the machine's CPUs taken by processes outside this benchmark's tree during the arm",
}


def pick_best(result: dict[str, Any]) -> None:
    """``result["arms"]`` and ``result["in_process"]``: the least disturbed run of each arm over the rounds (the
    machine may be shared): the highest throughput for ``--clients`` clients and for (c) per batch size, the lowest
    p50 for one client and the floor; each keeps its ``round`` (1-based)."""
    runs = result["runs"]
    for key, arm_runs in runs.items():
        if key == "c" or not arm_runs:
            continue
        tagged = [{**a, "round": i + 1} for i, a in enumerate(arm_runs)]
        if key in ("low_a", "low_b", "floor"):
            result["arms"][key] = min(tagged, key=lambda a: a["p50_ms"] if a["p50_ms"] is not None else 1e18)
        else:
            result["arms"][key] = max(tagged, key=lambda a: a["throughput_rps"])
    c_runs = runs.get("c") or []
    if c_runs:
        sizes: dict[str, Any] = {}
        for i, run in enumerate(c_runs):
            for size, e in run["sizes"].items():
                if size not in sizes or e["throughput_rps"] > sizes[size]["throughput_rps"]:
                    sizes[size] = {**e, "round": i + 1}
        work = [run["request_work_ms"] for run in c_runs if run.get("request_work_ms")]
        result["in_process"] = {
            "sizes": sizes,
            "threads": c_runs[0]["threads"],
            "request_work_ms": {k: min(w[k] for w in work) for k in work[0]} if work else None,
        }


def _rate(arm: dict[str, Any] | None) -> float | None:
    return arm.get("throughput_rps") if arm else None


def _ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def summarize(result: dict[str, Any]) -> None:
    """``result["summary"]``: the ratios, each target met or not, and one verdict line per target."""
    arms, c = result.get("arms", {}), (result.get("in_process") or {}).get("sizes", {})
    batch = str(result["params"]["batch_size"])
    c_one, c_batch = (c.get("1") or {}), (c.get(batch) or {})
    s: dict[str, Any] = {"targets": TARGETS}
    s["a_over_b"] = _ratio(_rate(arms.get("a")), _rate(arms.get("b")))
    s["a_over_c"] = _ratio(_rate(arms.get("a")), c_batch.get("throughput_rps"))
    s["b_over_c_one"] = _ratio(_rate(arms.get("b")), c_one.get("throughput_rps"))
    s["batching_ceiling"] = _ratio(c_batch.get("throughput_rps"), c_one.get("throughput_rps"))
    for key in ("a_over_b", "a_over_c"):
        s[f"{key}_met"] = None if s[key] is None else s[key] >= TARGETS[key]
    for arm in ("low_b", "low_a"):
        low = arms.get(arm) or {}
        added = low["p50_ms"] - c_one["p50_ms"] if low.get("p50_ms") is not None and c_one else None
        s[f"added_p50_ms_{arm[-1]}"] = added
        s[f"added_p50_ms_{arm[-1]}_met"] = None if added is None else added < TARGETS["added_p50_ms"]
        same = (low.get("breakdown") or {}).get("serve_ms")
        s[f"added_same_requests_ms_{arm[-1]}"] = same
        s[f"added_same_requests_ms_{arm[-1]}_met"] = None if same is None else same < TARGETS["added_p50_ms"]
    over = arms.get("overload")
    if over:
        codes = set(over["codes"])
        s["overload_shed"] = "503" in codes
        # Met only when the service shed the excess: 200s and 503s alone, no hang, and some 503s (without them the
        # excess waited in a queue, and a longer overload would end in timeouts).
        s["overload_ok"] = codes <= {"200", "503"} and over["hangs"] == 0 and s["overload_shed"]
    scale = result.get("autoscaling")
    if scale:
        s["autoscaled_up"] = scale.get("max_running", 0) > scale["settings"]["min_replicas"]
        s["autoscaled_down"] = scale.get("back_to_min_s") is not None
    s["where_time_goes"] = _where(result)
    s["verdict"] = _verdict(s, result)
    result["summary"] = s


def _where(result: dict[str, Any]) -> dict[str, Any]:
    """One client without batching, against (c) one at a time: the floor of a round trip through Serve (GET
    /healthz), the time outside the ingress, the ingress's own work (parse, answer) measured in one thread, the rest
    of the ingress's time (the handle's hop to the replica and back), and how much slower the model ran in the
    replica than in process."""
    arms, c = result.get("arms", {}), (result.get("in_process") or {})
    low, one = arms.get("low_b") or {}, (c.get("sizes") or {}).get("1") or {}
    br, work = low.get("breakdown") or {}, c.get("request_work_ms") or {}
    out: dict[str, Any] = {"healthz_p50_ms": (arms.get("floor") or {}).get("p50_ms")}
    if br:
        out.update(
            outside_ingress_ms=br["outside_ingress_ms"], ingress_ms=br["ingress_ms"], model_ms=br["model_ms"]
        )
        if work:
            out.update(parse_ms=work["parse_ms"], answer_ms=work["answer_ms"])
            out["hop_ms"] = br["ingress_ms"] - work["parse_ms"] - work["answer_ms"]
        if one:
            out["model_in_process_ms"] = one["p50_ms"]
            out["model_slowdown_ms"] = br["model_ms"] - one["p50_ms"]
    return out


def _met(flag: bool | None) -> str:
    return "n/a" if flag is None else "met" if flag else "NOT met"


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _verdict(s: dict[str, Any], result: dict[str, Any]) -> list[str]:
    p = result["params"]
    lines = [
        f"(a)/(b) = {_f(s['a_over_b'])} at {p['clients']} clients: target >= {TARGETS['a_over_b']:g} "
        f"{_met(s['a_over_b_met'])} (batching ceiling of the model in process, (c) batch {p['batch_size']} / "
        f"(c) batch 1: {_f(s['batching_ceiling'])})",
        f"(a)/(c) = {_f(s['a_over_c'])}: target >= {TARGETS['a_over_c']:g} {_met(s['a_over_c_met'])}",
    ]
    for k, what in (("b", "no batching"), ("a", f"batching (waits {1000 * p['batch_wait_timeout_s']:g} ms)")):
        lines.append(
            f"Serve's added p50 at 1 client, {what}: {_f(s[f'added_p50_ms_{k}'], '.1f')} ms over (c)'s p50 "
            f"{_met(s[f'added_p50_ms_{k}_met'])}; on the same requests (latency - model time) "
            f"{_f(s[f'added_same_requests_ms_{k}'], '.1f')} ms {_met(s[f'added_same_requests_ms_{k}_met'])} "
            f"(target < {TARGETS['added_p50_ms']:g} ms)"
        )
    over = (result.get("arms") or {}).get("overload")
    if over:
        lines.append(
            f"at 2x (a)'s rate ({over['offered_rps']:.1f} requests/s): answers {over['codes']}, hangs "
            f"{over['hangs']}: target 503s for the excess, no 500s, no hangs {_met(s['overload_ok'])}"
            + (
                ""
                if s["overload_shed"]
                else f" (no 503: the excess waited in a queue, p99 {_f(over['p99_ms'], '.0f')} ms)"
            )
        )
    scale = result.get("autoscaling")
    if scale:
        lines.append(
            f"autoscaling: replicas {scale['settings']['min_replicas']} -> {scale.get('max_running')} under load "
            f"(first added {_f(scale.get('first_up_s'), '.0f')} s after the load began), back to "
            f"{scale['settings']['min_replicas']} {_f(scale.get('back_to_min_s'), '.0f')} s after it ended: "
            f"{'shown' if s['autoscaled_up'] and s['autoscaled_down'] else 'NOT shown in full'}"
        )
    return lines


def print_tables(result: dict[str, Any]) -> None:
    p, arms = result["params"], result.get("arms", {})
    print(
        f"\nServing benchmark, tiny model ({p['steps']} steps, 64 px), {p['replicas']} decomposer replica x "
        f"{p['num_cpus']:g} CPU, {result.get('threads', {}).get('in_process', '?')} torch thread(s) per model"
    )
    head = f"{'arm':<36}{'clients':>8}{'req':>6}{'ok':>6}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
    print(head + f"{'batch':>7}{'model':>8}{'ingress':>9}{'outside':>9}{'others%':>9}")
    for key, label in ARMS.items():
        a = arms.get(key)
        if not a:
            continue
        br = a.get("breakdown") or {}
        others = (a.get("cpu") or {}).get("others_pct")
        print(
            f"{label:<36}{a.get('clients', '-')!s:>8}{a['requests']:>6}{a['ok']:>6}{a['throughput_rps']:>8.2f}"
            f"{_f(a['p50_ms'], '.1f'):>9}{_f(a['p95_ms'], '.1f'):>9}{_f(a['p99_ms'], '.1f'):>9}"
            f"{_f(a.get('mean_batch_size'), '.2f'):>7}{_f(br.get('model_ms'), '.1f'):>8}"
            f"{_f(br.get('ingress_ms'), '.1f'):>9}{_f(br.get('outside_ingress_ms'), '.1f'):>9}{_f(others, '.0f'):>9}"
        )
    c = (result.get("in_process") or {}).get("sizes", {})
    for size, e in c.items():
        label = f"(c) in process, batch {size}"
        print(
            f"{label:<36}{'-':>8}{e['items']:>6}{e['items']:>6}{e['throughput_rps']:>8.2f}{e['p50_ms']:>9.1f}"
            f"{e['p95_ms']:>9.1f}{e['p99_ms']:>9.1f}{int(size):>7}{e['ms_per_item']:>8.1f}  (model ms per item)"
        )
    print("  model/ingress/outside: medians in ms of the service's own timings (see definitions in the JSON)")
    w = (result.get("summary") or {}).get("where_time_goes") or {}
    if w.get("model_ms") is not None:
        print(
            f"where one request's time goes (1 client, no batching, medians): outside the ingress "
            f"{_f(w['outside_ingress_ms'], '.1f')} ms (GET /healthz round trip {_f(w['healthz_p50_ms'], '.1f')} ms), "
            f"ingress {_f(w['ingress_ms'], '.1f')} ms (parse {_f(w.get('parse_ms'), '.1f')} + answer "
            f"{_f(w.get('answer_ms'), '.1f')} in one thread, the rest {_f(w.get('hop_ms'), '.1f')} ms the hop to the "
            f"replica and back), model {_f(w['model_ms'], '.1f')} ms in the replica against "
            f"{_f(w.get('model_in_process_ms'), '.1f')} ms in process"
        )
    for line in (result.get("summary") or {}).get("verdict", []):
        print(line)
