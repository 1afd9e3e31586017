"""bench/serve.py's load generator: real HTTP requests on loopback, bounded in time and count, every request with a
timeout (a request that gets no answer in time is reported as a hang, never waited on beyond it).

- :func:`closed_loop`: ``clients`` threads, each sending its next request when the last one is answered, until
  ``duration_s`` has passed or ``max_requests`` were sent;
- :func:`open_loop`: requests sent at a fixed rate whatever the answers (the overload test), from a pool of
  ``max_outstanding`` threads; a send later than its schedule is recorded (``lag_s``);
- :func:`summarize`: counts by status, throughput, latency percentiles and where the time of the answered requests
  went (the service's own ``timings`` of a ``response: json`` answer).

Imports only the standard library, numpy and requests.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Answer:
    """One request: when it was sent (seconds after the arm's start), how long it took, what came back."""

    sent_s: float
    seconds: float
    status: int
    """HTTP status; 0 when no answer came (``error`` says why: a timeout is a hang)."""
    error: str | None = None
    timings: dict[str, Any] | None = None
    """The service's ``timings`` (``total_s`` in the ingress, ``model_s`` of the batched call, ``batch_size``)."""
    lag_s: float = 0.0
    """Open loop only: how much later than scheduled the request was sent (the client's own backlog)."""


class Target:
    """Where and what to send: a URL, a body (bytes, encoded once) and headers."""

    def __init__(self, url: str, body: bytes | None, headers: dict[str, str], timeout_s: float):
        self.url, self.body, self.headers, self.timeout_s = url, body, headers, timeout_s

    def send(self, session, t0: float) -> Answer:
        import requests

        start = time.perf_counter()
        try:
            if self.body is None:
                r = session.get(self.url, headers=self.headers, timeout=self.timeout_s)
            else:
                r = session.post(self.url, data=self.body, headers=self.headers, timeout=self.timeout_s)
            seconds = time.perf_counter() - start
        except requests.Timeout:
            return Answer(start - t0, time.perf_counter() - start, 0, "timeout")
        except requests.RequestException as e:
            return Answer(start - t0, time.perf_counter() - start, 0, f"{type(e).__name__}: {str(e)[:200]}")
        timings, error = None, None
        if r.status_code == 200 and r.headers.get("content-type", "").startswith("application/json"):
            try:
                timings = r.json().get("timings")
            except ValueError:
                error = "200 with a body that is not JSON"
        elif r.status_code != 200:
            error = r.text[:200]
        return Answer(start - t0, seconds, r.status_code, error, timings)


def closed_loop(
    target: Target, clients: int, duration_s: float, max_requests: int
) -> tuple[list[Answer], float]:
    """``clients`` concurrent clients, each sending back to back; returns the answers and the wall seconds (from
    the first send to the last answer)."""
    import requests

    answers: list[Answer] = []
    lock = threading.Lock()
    issued = [0]
    t0 = time.perf_counter()
    deadline = t0 + duration_s

    def client() -> None:
        with requests.Session() as session:
            while time.perf_counter() < deadline:
                with lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                a = target.send(session, t0)
                with lock:
                    answers.append(a)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:  # each thread ends by the deadline plus one request's timeout
        t.join(duration_s + target.timeout_s + 5)
    wall = time.perf_counter() - t0
    with lock:
        return list(answers), wall


def open_loop(
    target: Target, rate: float, duration_s: float, max_outstanding: int
) -> tuple[list[Answer], float]:
    """Requests at ``rate`` per second for ``duration_s``, each sent by a pool thread at its scheduled time whatever
    the earlier answers; returns the answers and the wall seconds (first schedule to last answer)."""
    import requests

    local = threading.local()
    n = max(1, int(rate * duration_s))
    t0 = time.perf_counter()

    def one(scheduled: float) -> Answer:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        a = target.send(local.session, t0)
        a.lag_s = max(0.0, a.sent_s - scheduled)
        return a

    futures = []
    with ThreadPoolExecutor(max_workers=max_outstanding) as pool:
        for i in range(n):
            scheduled = i / rate
            delay = t0 + scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(one, scheduled))
        answers = [f.result(timeout=target.timeout_s + duration_s + 30) for f in futures]
    return answers, time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def latency_stats(seconds: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 and mean in milliseconds."""
    ms = [1000 * s for s in seconds]
    return {
        "p50_ms": _pct(ms, 50),
        "p95_ms": _pct(ms, 95),
        "p99_ms": _pct(ms, 99),
        "mean_ms": float(np.mean(ms)) if ms else None,
    }


def summarize(answers: list[Answer], wall_s: float) -> dict[str, Any]:
    """Counts by status (``0``: no answer), throughput of 200s over the wall time, latency percentiles of the 200s
    and of the others, and the medians of where an answered request's time went: ``outside_ingress_ms`` (client,
    HTTP, Serve's proxy: latency - the ingress's total_s), ``ingress_ms`` (parse, auth, the handle call, the
    replica's queue and batch wait, PNG encoding: total_s - model_s), ``model_ms`` (the batched model call,
    shared by its batch) and ``serve_ms`` (latency - model_s: all but the model)."""
    ok = [a for a in answers if a.status == 200]
    codes: dict[str, int] = {}
    for a in answers:
        codes[str(a.status)] = codes.get(str(a.status), 0) + 1
    out: dict[str, Any] = {
        "requests": len(answers),
        "ok": len(ok),
        "codes": dict(sorted(codes.items())),
        "hangs": sum(a.error == "timeout" for a in answers),
        "server_errors": sum(a.status >= 500 and a.status != 503 for a in answers),
        "wall_s": wall_s,
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else 0.0,
        **latency_stats([a.seconds for a in ok]),
    }
    other = [a.seconds for a in answers if a.status not in (200, 0)]
    if other:
        out["other_latency"] = latency_stats(other)
    timed = [a for a in ok if a.timings]
    if timed:
        total = [1000 * a.timings["total_s"] for a in timed]
        model = [1000 * a.timings["model_s"] for a in timed]
        out["breakdown"] = {
            "outside_ingress_ms": float(
                np.median([1000 * a.seconds - t for a, t in zip(timed, total, strict=True)])
            ),
            "ingress_ms": float(np.median([t - m for t, m in zip(total, model, strict=True)])),
            "model_ms": float(np.median(model)),
            "serve_ms": float(np.median([1000 * a.seconds - m for a, m in zip(timed, model, strict=True)])),
        }
        sizes: dict[str, int] = {}
        for a in timed:
            sizes[str(a.timings["batch_size"])] = sizes.get(str(a.timings["batch_size"]), 0) + 1
        out["batch_sizes"] = dict(sorted(sizes.items(), key=lambda kv: int(kv[0])))
        out["mean_batch_size"] = float(np.mean([a.timings["batch_size"] for a in timed]))
    lags = [a.lag_s for a in answers if a.lag_s]
    if lags:
        out["send_lag_ms"] = {"p50": _pct([1000 * x for x in lags], 50), "max": 1000 * max(lags)}
    errors = sorted({a.error for a in answers if a.error and a.status != 503})
    if errors:
        out["errors"] = errors[:5]
    return out


def per_second(answers: list[Answer], offset_s: float = 0.0) -> list[dict[str, Any]]:
    """Answers binned by the second they completed in (``offset_s`` added to every time): 200s per second and the
    p50 latency of the 200s in that second."""
    bins: dict[int, list[float]] = {}
    for a in answers:
        if a.status == 200:
            bins.setdefault(int(offset_s + a.sent_s + a.seconds), []).append(a.seconds)
    return [
        {"t_s": t, "ok_per_s": len(xs), "p50_ms": 1000 * float(np.median(xs))}
        for t, xs in sorted(bins.items())
    ]


def json_target(url: str, body: dict[str, Any], token: str | None, timeout_s: float) -> Target:
    """A ``POST`` of ``body`` as JSON (encoded once), with a bearer token."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return Target(url, json.dumps(body).encode(), headers, timeout_s)
