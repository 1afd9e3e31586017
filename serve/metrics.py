"""The ingress's Prometheus metrics (``GET /metrics``, text format 0.0.4): requests by endpoint, model version and
status; a latency histogram and batch sizes by model version. Kept in the ingress replica's memory (a scrape of each
ingress replica adds up)."""

from __future__ import annotations

__all__ = ["LATENCY_BUCKETS", "Metrics"]

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds of the latency histogram's buckets, seconds."""


class Metrics:
    """Prometheus text counters kept by the ingress: requests, latencies and batch sizes per model version."""

    def __init__(self):
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency: dict[str, list[float]] = {}
        self.batches: dict[tuple[str, int], int] = {}

    def observe(
        self, endpoint: str, model: str, status: int, seconds: float, batch: int | None = None
    ) -> None:
        key = (endpoint, model, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.latency.setdefault(model, [0.0] * (len(LATENCY_BUCKETS) + 2))
        for b, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                hist[b] += 1
        hist[-2] += 1  # count (+Inf)
        hist[-1] += seconds  # sum
        if batch:
            self.batches[(model, batch)] = self.batches.get((model, batch), 0) + 1

    def text(self) -> str:
        lines = [
            "# HELP reflade_requests_total Requests answered, by endpoint, model version and status.",
            "# TYPE reflade_requests_total counter",
        ]
        for (endpoint, model, status), n in sorted(self.requests.items()):
            lines.append(
                f'reflade_requests_total{{endpoint="{endpoint}",model="{model}",status="{status}"}} {n}'
            )
        lines += [
            "# HELP reflade_request_seconds Latency of decompositions, by model version.",
            "# TYPE reflade_request_seconds histogram",
        ]
        for model, h in sorted(self.latency.items()):
            for b, bound in enumerate(LATENCY_BUCKETS):
                lines.append(f'reflade_request_seconds_bucket{{model="{model}",le="{bound}"}} {h[b]:g}')
            lines.append(f'reflade_request_seconds_bucket{{model="{model}",le="+Inf"}} {h[-2]:g}')
            lines.append(f'reflade_request_seconds_count{{model="{model}"}} {h[-2]:g}')
            lines.append(f'reflade_request_seconds_sum{{model="{model}"}} {h[-1]:.6f}')
        lines += [
            "# HELP reflade_batch_size_total Model calls by batch size and model version.",
            "# TYPE reflade_batch_size_total counter",
        ]
        for (model, size), n in sorted(self.batches.items()):
            lines.append(f'reflade_batch_size_total{{model="{model}",size="{size}"}} {n}')
        return "\n".join(lines) + "\n"
