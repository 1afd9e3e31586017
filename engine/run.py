"""The data-engine run: ingest -> plan -> execute (six stages on Ray Data, staged shards) -> commit (a registered
dataset version).

Exactly-once (design.md, "Data"):
- ``sample_id`` = hash(source sha256, entity id, kind, engine config hash): deterministic;
- a run lives under ``runs/engine/<dataset>/<run-id>/`` (``plan.py``): the same command run again finds the same
  run;
- each batch of images is staged as a layer shard, a quarantine shard and, last, a ``done`` marker
  (``staging.py``); a re-run skips the source ids that have a marker, and a shard without a marker is redone;
- the dataset version is registered only at commit, from the marked shards, after the counts balance:
  images in = images kept + images quarantined, layers out = layers kept + layers rejected (``commit.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import time

from reflade.engine.commit import commit
from reflade.engine.config import EngineConfig
from reflade.engine.errors import EngineError
from reflade.engine.ground_truth import stage_synthetic
from reflade.engine.layout import (
    add_layer_stages,
    describe_layout,
    input_blocks,
    largest_first,
    resolve_layout,
)
from reflade.engine.plan import RunPlan, make_plan
from reflade.engine.ray_stages import MarkDuplicates, PreFilterStage, ReadRaw
from reflade.engine.run_result import RunResult
from reflade.engine.staging import ShardWriter
from reflade.platform.worker import storage_fields as _storage_fields


def _engine_config(cfg, synthetic_split: str | None) -> EngineConfig:
    ecfg: EngineConfig = cfg.section("engine") if "engine" in cfg.sections else EngineConfig()
    if synthetic_split is not None:
        ecfg = dataclasses.replace(copy.deepcopy(ecfg), synthetic_split=synthetic_split)
    if ecfg.synthetic_split not in ("train", "test", "quality", "hash"):
        raise EngineError(
            f"synthetic_split must be train, test, quality or hash, not {ecfg.synthetic_split!r}"
        )
    if not 0.0 <= ecfg.synthetic_test_fraction <= 1.0:
        raise EngineError(f"synthetic_test_fraction must be in [0, 1], not {ecfg.synthetic_test_fraction}")
    return ecfg


def run_engine(
    cfg,
    source: str,
    dataset: str,
    *,
    backends: str = "classical",
    limit: int | None = None,
    synthetic: int = 0,
    synthetic_size: int = 256,
    synthetic_split: str | None = None,
    progress: bool | None = None,
    log=print,
) -> RunResult:
    """Run the engine over SOURCE and register ``dataset/<dataset>`` (see the module docstring).

    Args:
        cfg: the platform ``Config`` (its ``engine`` section, storage and registry).
        source: local folder, ``s3://`` prefix, manifest file or registry reference.
        backends: ``classical`` or ``neural``.
        limit: at most this many inputs.
        synthetic: also add this many synthetic scenes as exact ground-truth rows (split ``synthetic_split``).
        synthetic_split: overrides the configuration's ``synthetic_split`` (``hash``: whole scenes to train or
            test by id).

    Raises:
        EngineError: the counts do not balance; IngestError: the input cannot be read.
    """
    from reflade.engine.backends import FAMILIES, weights_refs
    from reflade.engine.ingest import ingest
    from reflade.platform.cluster import connect
    from reflade.platform.registry import Registry, validate_name
    from reflade.platform.storage import Storage

    validate_name(dataset)
    if backends not in FAMILIES:
        raise EngineError(f"unknown backends {backends!r} (known: {', '.join(FAMILIES)})")
    ecfg = _engine_config(cfg, synthetic_split)
    resolve_layout(ecfg, backends)  # a bad layout or pool size fails before anything is uploaded
    t_start = time.monotonic()
    storage = Storage.from_config(cfg)
    registry = Registry(storage, cfg.registry.prefix)

    phases: dict[str, float] = {}  # seconds per part of the run (RunResult.phases)
    t = t_start

    def lap(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        phases[name] = phases.get(name, 0.0) + now - t
        t = now

    # 1. ingest
    inp = ingest(source, storage, registry, limit=limit, progress=progress)
    log(
        f"input: {len(inp.items)} files from {inp.description} ({inp.uploaded} uploaded, "
        f"{inp.already_there} already in the bucket)"
        + (f"; {len(inp.rejected)} manifest records quarantined" if inp.rejected else "")
    )
    lap("ingest")
    # 2. plan
    plan = make_plan(
        dataset=dataset,
        family=backends,
        ecfg=ecfg,
        inp=inp,
        weights=[registry.resolve(w).ref for w in weights_refs(backends, ecfg)],
        storage=storage,
        storage_fields=_storage_fields(cfg),
        registry_prefix=cfg.registry.prefix,
        synthetic=synthetic,
        synthetic_size=synthetic_size,
    )
    log(f"run {plan.run_id} under s3://{storage.bucket}/{plan.run_prefix}")
    if plan.skipped:
        log(f"resuming: {plan.skipped} images already staged by an earlier attempt, {len(plan.todo)} to go")
    lap("plan")
    # 3. execute
    connect(cfg)
    lap("connect")
    if plan.todo:
        execute(plan, progress=progress, log=log, phases=phases)
    t = time.monotonic()
    if synthetic:
        stage_synthetic(storage, plan.run_prefix, synthetic, synthetic_size, plan.config_hash, ecfg, log)
        lap("synthetic")
    # 4. commit
    result = commit(plan, storage, registry, t_start=t_start, log=log)
    lap("commit")
    result.phases = phases
    log("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    return result


def build_dataset(plan: RunPlan, *, log=print, phases: dict[str, float] | None = None):
    """The engine's Ray dataset over ``plan.todo``: the one pipeline that ``run_engine`` (through ``execute``)
    and ``bench/engine.py`` run.

    Read from the bucket and pre-filter as tasks; a barrier (``materialize``, run here) gathers every
    perceptual hash, so that near-duplicates are resolved over the whole input in input order; then stages 2-6
    in the configured layout (``layout.py``) and the shard writer (``staging.py``), lazily: consuming the
    returned dataset (one row per staged shard: ``shard``, ``summary``) stages the run's shards and markers.

    Args:
        plan: the run's plan (``plan.py``).
        phases: if given, ``phases["barrier"]`` is set to the seconds from the start to the barrier's end.
    """
    import ray

    from reflade.engine.stages.prefilter import find_near_duplicates

    t0 = time.monotonic()
    ecfg = plan.ecfg
    items = [
        {
            "source_id": it.source_id,
            "sha256": it.sha256,
            "key": it.key,
            "name": it.name,
            "ok": True,
            "stage": "",
            "reason": "",
        }
        for it in largest_first(plan.todo, lambda it: it.size)
    ]
    bs = ecfg.batch_size
    # Cheap stages run as tasks (callable instances); stages that hold a backend run in actor pools. On a
    # small node every pool's actors must fit beside the read tasks (design.md, Pitfalls).
    task = {"num_cpus": ecfg.num_cpus_per_task, "batch_format": "pandas", "batch_size": bs}
    ds = ray.data.from_items(items, override_num_blocks=input_blocks(len(items), bs))
    ds = ds.map_batches(ReadRaw(plan.storage_fields), **task)
    ds = ds.map_batches(PreFilterStage(ecfg), **task)
    # Near-duplicates need every hash: a barrier on the (small, capped) pre-filtered images.
    ds = ds.materialize()
    hashes = [h for h in ds.select_columns(["source_id", "phash", "ok"]).take_all() if h["ok"]]
    order = {it.source_id: i for i, it in enumerate(plan.todo)}
    pairs = sorted(
        ((h["source_id"], int(h["phash"])) for h in hashes if int(h["phash"])), key=lambda p: order[p[0]]
    )
    ds = ds.map_batches(MarkDuplicates(find_near_duplicates(pairs, ecfg.dup_hamming)), **task)
    if phases is not None:
        phases["barrier"] = time.monotonic() - t0
    log(describe_layout(ecfg, plan.family))
    ds = add_layer_stages(ds, ecfg, plan.family, plan.storage_fields, plan.registry_prefix)
    writer = ShardWriter(
        plan.storage_fields,
        plan.run_prefix,
        plan.config_hash,
        plan.backend_names,
        plan.weights,
        ecfg.test_fraction,
    )
    return ds.map_batches(writer, **task)


def execute(
    plan: RunPlan, *, progress: bool | None = None, log=print, phases: dict[str, float] | None = None
) -> int:
    """Run ``build_dataset(plan)`` to the end (its shards staged in the bucket); returns the shards written.
    ``phases``, if given, gets ``barrier`` (start to the near-duplicate barrier's end) and ``stages`` (from
    there to the last shard staged: stages 2-6 and the writer), in seconds."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(progress) if progress is not None else ctx.enable_progress_bars
    ds = build_dataset(plan, log=log, phases=phases)
    t0 = time.monotonic()
    written = ds.take_all()
    if phases is not None:
        phases["stages"] = time.monotonic() - t0
    log(f"staged {len(written)} shards")
    return len(written)
