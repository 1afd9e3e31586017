"""The commit: a run's staged shards become one registered dataset version, once the counts balance.

In place: the version's layer shards ARE the staged objects. The markers say what each shard holds (sample ids,
sources, sha256, size), so the commit checks the balance and the uniqueness of sample ids from the markers and
the small quarantine shards alone, and the registry copies each staged shard into the version's prefix
server-side (``Registry.create(objects=...)``): no shard byte passes through the driver. Only the quarantine table,
``stats.json`` and the manifests (kilobytes) are written by the driver.

Two exceptions read shard bytes, both rare: a source staged by two shards (a worker of a killed attempt finished
its batch after the restart listed the markers) is taken from the first shard only, so the second is filtered into
a new staged object, by a Ray task when Ray is up; and a marker written before markers held the shard's sha256 is
completed by reading its shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reflade.engine.errors import EngineError
from reflade.engine.plan import RunPlan
from reflade.engine.run_result import IMAGE_STAGES, STAGES, RunResult, StageRow
from reflade.engine.schema import ENGINE_VERSION, QUARANTINE_SCHEMA, SCHEMA_VERSION
from reflade.engine.staging import done_markers, parquet_bytes, quarantine_key, staged_key


@dataclass
class StagedShard:
    """A staged layer shard as the commit registers it: where it is and what it holds."""

    key: str
    sha256: str
    size: int
    sample_ids: list[str]
    layer_sources: list[str]

    def obj(self) -> dict[str, Any]:
        return {"key": self.key, "sha256": self.sha256, "size": self.size}


def _read_table(storage, key: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data, _ = storage.get_bytes(key)
    return pq.read_table(pa.BufferReader(data))


def _described(table, key: str, data: bytes) -> StagedShard:
    return StagedShard(
        key=key,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        sample_ids=table.column("sample_id").to_pylist(),
        layer_sources=sorted(set(table.column("source_id").to_pylist())),
    )


def filter_shard(storage, src_key: str, dst_key: str, keep: list[str]) -> StagedShard:
    """Write the rows of staged shard ``src_key`` whose source is in ``keep`` to ``dst_key``; describe it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = _read_table(storage, src_key)
    table = table.filter(pc.is_in(table.column("source_id"), value_set=pa.array(sorted(keep))))
    data = parquet_bytes(table, "zstd")
    storage.put_bytes(dst_key, data)
    return _described(table, dst_key, data)


def _filter_shard_task(fields: dict[str, Any], src_key: str, dst_key: str, keep: list[str]) -> StagedShard:
    from reflade.platform.worker import worker_storage

    return filter_shard(worker_storage(fields), src_key, dst_key, keep)


def _filtered(plan: RunPlan, storage, name: str, keep: list[str]) -> StagedShard:
    """Shard ``name`` reduced to the sources in ``keep``, as a new staged object (on a Ray worker if Ray is up)."""
    src = staged_key(plan.run_prefix, name)
    dst = staged_key(plan.run_prefix, f"{name}-{hashlib.sha256(json.dumps(keep).encode()).hexdigest()[:12]}")
    import ray

    if ray.is_initialized():
        task = ray.remote(num_cpus=plan.ecfg.num_cpus_per_task)(_filter_shard_task)
        return ray.get(task.remote(plan.storage_fields, src, dst, keep))
    return filter_shard(storage, src, dst, keep)


def _whole(plan: RunPlan, storage, name: str, marker: dict[str, Any]) -> StagedShard:
    key = staged_key(plan.run_prefix, name)
    staged = marker.get("staged")
    if staged is None:  # a marker from before markers described their shard
        data, _ = storage.get_bytes(key)
        import pyarrow as pa
        import pyarrow.parquet as pq

        return _described(pq.read_table(pa.BufferReader(data)), key, data)
    return StagedShard(
        key, staged["sha256"], int(staged["size"]), marker["sample_ids"], marker["layer_sources"]
    )


def commit(plan: RunPlan, storage, registry, *, t_start: float, log=print) -> RunResult:
    """Register ``dataset/<plan.dataset>`` from the run's marked shards (see the module docstring).

    Raises:
        EngineError: the counts do not balance, two shards hold the same sample, or no layer survived.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    done = done_markers(storage, plan.run_prefix)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    timings: dict[str, float] = defaultdict(float)
    # A source staged by two shards is taken from the first shard only: the stages are deterministic per image.
    covered: set[str] = set()
    seen_samples: set[str] = set()
    layer_sources: set[str] = set()
    objects: dict[str, dict[str, Any]] = {}
    layers_kept = synthetic_rows_n = repeated = layers_out = 0
    q_tables = []
    for name in sorted(done):
        marker = done[name]
        new = set(marker["source_ids"]) - covered
        repeated += len(marker["source_ids"]) - len(new)
        covered |= new
        if not new:
            continue
        qt = _read_table(storage, quarantine_key(plan.run_prefix, name))
        if len(new) == len(marker["source_ids"]):
            for stage, (a, b) in marker["counts"].items():
                counts[stage][0] += a
                counts[stage][1] += b
            for stage, secs in marker["timings"].items():
                timings[stage] += secs
            shard = _whole(plan, storage, name, marker)
            # What the stages reported: checked against what the shards hold below.
            layers_out += marker.get("layers_kept", 0) + marker.get("layers_rejected", 0)
        else:
            keep = sorted(new)
            shard = _filtered(plan, storage, name, keep)
            qt = qt.filter(pc.is_in(qt.column("source_id"), value_set=pa.array(keep)))
            layers_out += len(shard.sample_ids) + sum(
                e is not None for e in qt.column("entity_id").to_pylist()
            )
        ids = shard.sample_ids
        if seen_samples.intersection(ids) or len(set(ids)) != len(ids):
            raise EngineError(f"shard {name} repeats samples of another source: the staged data is corrupt")
        seen_samples.update(ids)
        layer_sources.update(shard.layer_sources)
        layers_kept += len(ids)
        if marker.get("synthetic"):
            synthetic_rows_n += len(ids)
        if ids:
            objects[f"shards/{name}.parquet"] = shard.obj()
        q_tables.append(qt)
    if repeated:
        log(
            f"{repeated} images were staged twice (a killed attempt's worker finished late); kept one copy each"
        )
    extra = [
        {
            "source_id": it.source_id,
            "source_sha256": it.sha256,
            "name": it.name,
            "stage": "ingest",
            "reason_code": "duplicate_of",
            "reason": f"duplicate_of: same bytes as {orig.name}",
            "entity_id": None,
            "kind": None,
            "sample_id": None,
        }
        for it, orig in plan.exact_dups
    ]
    extra += [r.quarantine_row() for r in plan.inp.rejected]  # malformed manifest records, never read
    q = pa.concat_tables([*q_tables, pa.Table.from_pylist(extra, schema=QUARANTINE_SCHEMA)])
    q_rows = q.to_pylist()
    image_q = [r for r in q_rows if r["entity_id"] is None]
    layer_q = [r for r in q_rows if r["entity_id"] is not None]

    images_in = len(plan.inp.items) + len(plan.inp.rejected) + plan.synthetic
    images_q = len(image_q)
    images_kept = len(layer_sources)
    if images_kept + images_q != images_in:
        raise EngineError(
            f"counts do not balance: images in {images_in} != kept {images_kept} + quarantined {images_q}"
        )
    if layers_kept + len(layer_q) != layers_out:
        raise EngineError(
            f"counts do not balance: layers out {layers_out} != kept {layers_kept} + rejected {len(layer_q)}"
        )
    reasons: dict[str, int] = defaultdict(int)
    for r in q_rows:
        reasons[f"{r['stage']}:{r['reason_code']}"] += 1
    stage_rows = [
        StageRow(
            stage, "images" if stage in IMAGE_STAGES else "layers", *counts[stage], timings.get(stage, 0.0)
        )
        for stage in STAGES
        if stage in counts
    ]
    result = RunResult(
        dataset=None,
        run_id=plan.run_id,
        images_in=images_in,
        images_kept=images_kept,
        images_quarantined=images_q,
        layers_out=layers_out,
        layers_kept=layers_kept,
        layers_rejected=len(layer_q),
        synthetic_rows=synthetic_rows_n,
        skipped_done=plan.skipped,
        uploaded=plan.inp.uploaded,
        wall_s=0.0,
        stages=stage_rows,
        quarantine_reasons=dict(reasons),
    )
    # Only what the committed data says: a re-run of a finished run then reproduces the same bytes and the
    # registry returns the existing version.
    stats = {
        k: v
        for k, v in result.as_dict().items()
        if k not in ("dataset", "wall_s", "skipped_done", "uploaded", "reused", "phases")
    }
    with tempfile.TemporaryDirectory(prefix="reflade-commit-") as tmp:
        manifest_path = Path(tmp) / "manifest.json"
        manifest_path.write_text(json.dumps(plan.inp.manifest(), indent=1, sort_keys=True))
        pq.write_table(q, Path(tmp) / "quarantine.parquet")
        (Path(tmp) / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
        input_ref = registry.create(
            "raw-manifest",
            f"{plan.dataset}-input",
            files={"manifest.json": manifest_path},
            parents=plan.inp.parents,
            metadata={"description": plan.inp.description, "count": len(plan.inp.items)},
        )
        if layers_kept == 0:
            raise EngineError(
                "no layer survived the engine: nothing to register (see the quarantine reasons)"
            )
        version = registry.create(
            "dataset",
            plan.dataset,
            files={
                "quarantine.parquet": Path(tmp) / "quarantine.parquet",
                "stats.json": Path(tmp) / "stats.json",
            },
            objects=objects,
            parents=[input_ref.ref, *plan.weights],
            metadata={
                "schema_version": SCHEMA_VERSION,
                "engine_version": ENGINE_VERSION,
                "config_hash": plan.config_hash,
                "backends": plan.family,
                "run_id": plan.run_id,
                "engine_config": dataclasses.asdict(plan.ecfg),
                "rows": layers_kept,
            },
            metrics={
                "images_in": images_in,
                "images_kept": images_kept,
                "layers_kept": layers_kept,
                "layers_rejected": len(layer_q),
                "prefilter_pass": counts["prefilter"][1] / counts["prefilter"][0]
                if counts["prefilter"][0]
                else 0,
                "end_to_end": layers_kept / layers_out if layers_out else 0,
            },
        )
    result.dataset = version.ref
    result.reused = version.reused
    result.wall_s = time.monotonic() - t_start
    log(
        f"{'reused' if version.reused else 'registered'} {version.ref}: {layers_kept} layers "
        f"({synthetic_rows_n} synthetic), {images_q} images quarantined"
    )
    return result
