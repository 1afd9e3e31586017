"""Staging: how a run's results wait in the bucket until the run commits, and how they are found again.

Under the run's prefix (``runs/engine/<dataset>/<run-id>/``) each batch of images becomes:

- ``staged/<shard>.parquet``: its kept layers (dataset rows);
- ``quarantine/<shard>.parquet``: its quarantined images and rejected layers, with reasons;
- ``done/<shard>.json``, written LAST: the marker. Its presence means both shards are whole; it holds the batch's
  source ids, counts and timings, and what the commit needs to register the layer shard without reading it: its
  sha256 and size, its sample ids and the sources it holds layers of.

``<shard>`` hashes the source ids of the batch, so a batch redone after a crash lands on the same names. A re-run
skips the source ids that have a marker; a shard without a marker is ignored and redone.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from collections import defaultdict
from typing import Any

from reflade.engine.record_stage import LayerOut, Work, to_batch, to_records
from reflade.engine.schema import QUARANTINE_SCHEMA, build_row, make_sample_id, rows_to_table
from reflade.platform.worker import worker_storage

STAGED = "staged/"
QUARANTINE = "quarantine/"
DONE = "done/"


def split_for(sha256: str, test_fraction: float) -> str:
    """Deterministic split of a source image: its layers all go to the same split."""
    return "test" if int(sha256[:8], 16) / 0xFFFFFFFF < test_fraction else "train"


def shard_name(source_ids: list[str]) -> str:
    """The name of the shards and marker of a batch: a hash of its source ids (order does not matter)."""
    return hashlib.sha256("\n".join(sorted(source_ids)).encode()).hexdigest()[:24]


def staged_key(run_prefix: str, name: str) -> str:
    return f"{run_prefix}{STAGED}{name}.parquet"


def quarantine_key(run_prefix: str, name: str) -> str:
    return f"{run_prefix}{QUARANTINE}{name}.parquet"


def done_markers(storage, run_prefix: str) -> dict[str, dict[str, Any]]:
    """The markers of a run's complete shards: {shard name: marker}."""
    out = {}
    for obj in storage.list(f"{run_prefix}{DONE}"):
        doc, _ = storage.get_json(obj["Key"])
        out[doc["shard"]] = doc
    return out


def done_source_ids(markers: dict[str, dict[str, Any]]) -> set[str]:
    """Every source id some marker holds (the sources a re-run skips)."""
    return {sid for m in markers.values() for sid in m["source_ids"]}


def marker(
    source_ids: list[str],
    *,
    images_kept: int,
    layers_kept: int,
    layers_rejected: int,
    counts: dict[str, list[int]] | None = None,
    timings: dict[str, float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """What a batch's marker says about it (``stage_shard`` adds what describes the layer shard): its sources, how
    many images and layers it kept and rejected, per-stage counts ([in, out]) and seconds, and ``extra`` keys."""
    return {
        "images": len(source_ids),
        "images_kept": images_kept,
        "layers_kept": layers_kept,
        "layers_rejected": layers_rejected,
        "source_ids": list(source_ids),
        "counts": dict(counts or {}),
        "timings": dict(timings or {}),
        **extra,
    }


def parquet_bytes(table, compression: str | None = None) -> bytes:
    """``table`` as the bytes of one Parquet file (what ``pq.write_table`` would write to a path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    if compression:
        pq.write_table(table, sink, compression=compression)
    else:
        pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def stage_shard(
    storage,
    run_prefix: str,
    name: str,
    layer_rows: list[dict[str, Any]],
    quarantine_rows: list[dict[str, Any]],
    marker: dict[str, Any],
    started: float | None = None,
) -> dict[str, Any]:
    """Write one batch's layer shard, quarantine shard and, last, its marker (``marker`` plus the layer shard's
    ``sha256``, ``size``, ``sample_ids`` and ``layer_sources``); returns the marker as written.

    ``started``: the ``time.perf_counter()`` at which the writer took the batch; the seconds from then to the
    marker (rows built, both shards encoded and uploaded) go into the marker's ``timings["write"]``.

    Raises:
        SchemaError: a row does not validate (nothing is written).
    """
    import pyarrow as pa

    data = parquet_bytes(rows_to_table(layer_rows, validate=True), "zstd")
    qdata = parquet_bytes(pa.Table.from_pylist(quarantine_rows, schema=QUARANTINE_SCHEMA))
    storage.put_bytes(staged_key(run_prefix, name), data)
    storage.put_bytes(quarantine_key(run_prefix, name), qdata)
    marker = dict(
        marker,
        shard=name,
        staged={"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)},
        sample_ids=[r["sample_id"] for r in layer_rows],
        layer_sources=sorted({r["source_id"] for r in layer_rows}),
    )
    if started is not None:
        marker["timings"] = {**marker.get("timings", {}), "write": time.perf_counter() - started}
    # The marker goes last: its presence means both shards are complete.
    storage.put_json(f"{run_prefix}{DONE}{name}.json", marker)
    return marker


def quarantine_row(r: dict[str, Any], stage, reason, entity_id, kind, sample_id) -> dict[str, Any]:
    """A row of the quarantine table for image record ``r`` (an image when ``entity_id`` is None, else a layer)."""
    reason = reason or ""
    return {
        "source_id": r["source_id"],
        "source_sha256": r["sha256"],
        "name": r["name"],
        "stage": stage or "",
        "reason_code": reason.split(":", 1)[0],
        "reason": reason,
        "entity_id": entity_id,
        "kind": kind,
        "sample_id": sample_id,
    }


class ShardWriter:
    """The run's last Ray stage: write one batch of image records as a staged shard pair and its marker."""

    def __init__(
        self,
        storage_fields: dict[str, Any],
        run_prefix: str,
        config_hash: str,
        backends: dict[str, str],
        weights: list[str],
        test_fraction: float,
    ):
        self.fields = storage_fields
        self.run_prefix = run_prefix
        self.config_hash = config_hash
        self.backends = backends
        self.weights = weights
        self.test_fraction = test_fraction

    @property
    def storage(self):
        return worker_storage(self.fields)

    def __call__(self, batch):
        t0 = time.perf_counter()
        rows = to_records(batch)
        if not rows:
            return to_batch([])
        layer_rows, quarantine, counts, timings = [], [], defaultdict(lambda: [0, 0]), defaultdict(float)
        for r in rows:
            work = pickle.loads(r["work"]) if isinstance(r.get("work"), bytes) and r["work"] else Work()
            for stage, (a, b) in work.counts.items():
                counts[stage][0] += a
                counts[stage][1] += b
            for stage, secs in work.timings.items():
                timings[stage] += secs
            split = split_for(r["sha256"], self.test_fraction)
            for lay in work.layers:
                sid = make_sample_id(r["sha256"], lay.entity_id, lay.kind, self.config_hash)
                if lay.ok and r["ok"]:
                    layer_rows.append(self._row(r, work, lay, sid, split))
                elif not lay.ok:
                    quarantine.append(quarantine_row(r, lay.stage, lay.reason, lay.entity_id, lay.kind, sid))
            if not r["ok"]:
                quarantine.append(quarantine_row(r, r["stage"], r["reason"], None, None, None))
        name = shard_name([r["source_id"] for r in rows])
        summary = marker(
            [r["source_id"] for r in rows],
            images_kept=sum(bool(r["ok"]) for r in rows),
            layers_kept=len(layer_rows),
            layers_rejected=sum(1 for q in quarantine if q["entity_id"] is not None),
            counts=counts,
            timings=timings,
        )
        summary = stage_shard(
            self.storage, self.run_prefix, name, layer_rows, quarantine, summary, started=t0
        )
        return to_batch([{"shard": name, "summary": json.dumps(summary)}])

    def _row(self, r, work: Work, lay: LayerOut, sid: str, split: str) -> dict[str, Any]:
        h, w = work.image.shape[:2]
        return build_row(
            sample_id=sid,
            source_id=r["source_id"],
            source_sha256=r["sha256"],
            image_png=work.image_png,
            width=w,
            height=h,
            layer=lay.rgba,
            visible_mask=lay.visible_mask,
            kind=lay.kind,
            category=lay.category,
            prompts=lay.prompts,
            split=split,
            scores={**work.scores, **lay.scores},
            config_hash=self.config_hash,
            backends=self.backends,
            weights=self.weights,
        )
