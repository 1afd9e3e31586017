"""The commit registers a run's staged shards in place: the registry copies them server-side into the version's
prefix, and the driver's S3 client neither reads nor writes a byte of them (counted on the real SeaweedFS)."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

from reflade.engine.commit import commit
from reflade.engine.config import EngineConfig
from reflade.engine.ingest import IngestResult, InputItem
from reflade.engine.plan import RunPlan
from reflade.engine.schema import build_row, load_rows, make_sample_id
from reflade.engine.staging import marker, shard_name, stage_shard, staged_key


def _noise_row(rng, source: str, sha: str, config_hash: str, side: int) -> dict:
    image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    from reflade.engine.schema import encode_png

    return build_row(
        sample_id=make_sample_id(sha, 0, "foreground", config_hash),
        source_id=source,
        source_sha256=sha,
        image_png=encode_png(image),
        width=side,
        height=side,
        layer=rng.integers(0, 256, (side, side, 4), dtype=np.uint8),
        visible_mask=rng.random((side, side)) > 0.5,
        kind="foreground",
        category="object",
        prompts=[
            {
                "type": "box",
                "granularity": "coarse",
                "points": [],
                "box": [0, 0, side, side],
                "mask": None,
                "text": None,
            }
        ],
        split="train",
        scores={},
        config_hash=config_hash,
        backends={"scene": "test"},
        weights=[],
    )


def stage_noise_run(storage, dataset: str, shards: int, per_shard: int, side: int, seed: int = 0) -> RunPlan:
    """A run whose stages have finished: ``shards`` staged shards of ``per_shard`` one-layer sources each (noise
    images of ``side`` pixels, so the shards do not compress), with their markers; returns its plan."""
    rng = np.random.default_rng(seed)
    ecfg = EngineConfig()
    config_hash = ecfg.fingerprint()
    run_prefix = f"runs/engine/{dataset}/{rng.integers(1 << 60):016x}/"
    items = []
    for s in range(shards):
        rows = []
        for i in range(per_shard):
            sha = hashlib.sha256(f"{seed}-{s}-{i}".encode()).hexdigest()
            items.append(InputItem(sha[:16], sha, f"raw/{sha}", f"noise{s}-{i}.png", side * side * 3))
            rows.append(_noise_row(rng, sha[:16], sha, config_hash, side))
        ids = [r["source_id"] for r in rows]
        done = marker(
            ids,
            images_kept=len(ids),
            layers_kept=len(ids),
            layers_rejected=0,
            counts={"prefilter": [len(ids)] * 2},
        )
        stage_shard(storage, run_prefix, shard_name(ids), rows, [], done)
    inp = IngestResult(items=items, uploaded=0, already_there=len(items), description="noise", parents=[])
    return RunPlan(
        dataset=dataset,
        family="classical",
        ecfg=ecfg,
        inp=inp,
        weights=[],
        config_hash=config_hash,
        run_id=run_prefix.rstrip("/").rsplit("/", 1)[1],
        run_prefix=run_prefix,
        backend_names={"scene": "test"},
        storage_fields={
            "endpoint": storage.config.endpoint,
            "bucket": storage.bucket,
            "region": storage.config.region,
        },
        registry_prefix="registry",
        items=list(items),
    )


class _NoPyarrowFs:
    def __getattr__(self, name):
        raise AssertionError("the commit used the pyarrow filesystem (its bytes would not be counted)")


def test_commit_moves_no_shard_bytes_through_the_driver(storage, registry, monkeypatch):
    plan = stage_noise_run(storage, "commit-in-place", shards=4, per_shard=3, side=160)
    staged = {o["Key"]: o["Size"] for o in storage.list(f"{plan.run_prefix}staged/")}
    shard_bytes = sum(staged.values())
    assert shard_bytes > 1_000_000

    monkeypatch.setattr(storage, "_fs", _NoPyarrowFs())
    with storage.traffic() as t:
        res = commit(plan, storage, registry, t_start=time.monotonic(), log=lambda *_: None)
    assert not set(t.keys_received) & set(staged), "a staged shard was read by the driver"
    # What does pass: markers, quarantine shards, the content index, manifests, stats.json (kilobytes).
    assert t.received < 64 * 1024 and t.sent < 64 * 1024, (t.received, t.sent, t.by_op)
    assert t.by_op["CopyObject"][0] == len(staged)
    assert res.images_in == res.images_kept == 12 and res.layers_kept == 12

    v = registry.resolve(res.dataset)
    shards = {f["path"]: f for f in v.files if f["path"].startswith("shards/")}
    assert len(shards) == 4
    for f in shards.values():
        key = staged_key(plan.run_prefix, f["path"].removeprefix("shards/").removesuffix(".parquet"))
        assert f["size"] == staged[key]
        data, _ = storage.get_bytes(v.key(f["path"]))
        assert hashlib.sha256(data).hexdigest() == f["sha256"]  # the writer's hash is the copy's
    monkeypatch.undo()
    rows = load_rows(registry, res.dataset)  # verifies every shard against the manifest
    assert sorted(r["sample_id"] for r in rows) == sorted(
        make_sample_id(it.sha256, 0, "foreground", plan.config_hash) for it in plan.items
    )

    with storage.traffic() as t:
        again = commit(plan, storage, registry, t_start=time.monotonic(), log=lambda *_: None)
    assert again.reused and again.dataset == res.dataset and "CopyObject" not in t.by_op


@pytest.mark.parametrize("where", ["here", "ray"])
def test_a_source_staged_twice_is_committed_once(storage, registry, request, where):
    """A late worker of a killed attempt staged a batch that overlaps another: the commit keeps one copy of each
    source (the overlapping shard filtered into a new staged object, by a Ray task when Ray is up) and the counts
    still balance."""
    import ray

    if where == "ray":
        request.getfixturevalue("ray_cluster")
    elif ray.is_initialized():
        pytest.skip("Ray is up in this session: the commit filters on a Ray worker")
    plan = stage_noise_run(storage, f"commit-twice-{where}", shards=2, per_shard=3, side=32, seed=1)
    rng = np.random.default_rng(5)
    # A batch of the first shard's last source and a new one, as a restarted attempt might have cut it.
    first = sorted(storage.list(f"{plan.run_prefix}done/"), key=lambda o: o["Key"])[0]
    earlier, _ = storage.get_json(first["Key"])
    old = next(it for it in plan.items if it.source_id == earlier["source_ids"][-1])
    sha = hashlib.sha256(b"late").hexdigest()
    new = InputItem(sha[:16], sha, f"raw/{sha}", "late.png", 1)
    rows = [_noise_row(rng, it.source_id, it.sha256, plan.config_hash, 32) for it in (old, new)]
    ids = [old.source_id, new.source_id]
    late = marker(ids, images_kept=2, layers_kept=2, layers_rejected=0)
    stage_shard(storage, plan.run_prefix, shard_name(ids), rows, [], late)
    plan.inp.items.append(new)
    plan.items.append(new)
    res = commit(plan, storage, registry, t_start=time.monotonic(), log=lambda *_: None)
    assert res.images_in == res.images_kept == 7 and res.layers_kept == 7
    rows = load_rows(registry, res.dataset)
    assert len({r["sample_id"] for r in rows}) == len(rows) == 7


def test_registry_refuses_a_copy_of_another_size(storage, registry):
    from reflade.platform.registry import IntegrityError

    storage.put_bytes("scratch/one.bin", b"12345")
    with pytest.raises(IntegrityError, match="holds 5 bytes, not the 4 declared"):
        registry.create(
            "dataset",
            "wrong-size",
            objects={"a.bin": {"key": "scratch/one.bin", "sha256": "0" * 64, "size": 4}},
        )


def test_a_marker_from_before_commit_in_place_is_completed_by_reading_its_shard(storage, registry):
    """A run staged by an older engine (markers without the shard's sha256, size and sample ids) still commits: its
    shards are read once to describe them, and only those."""
    plan = stage_noise_run(storage, "commit-legacy", shards=2, per_shard=2, side=32, seed=2)
    done = sorted(o["Key"] for o in storage.list(f"{plan.run_prefix}done/"))
    legacy, _ = storage.get_json(done[0])
    for key in ("staged", "sample_ids", "layer_sources"):
        legacy.pop(key)
    storage.put_json(done[0], legacy)
    with storage.traffic() as t:
        res = commit(plan, storage, registry, t_start=time.monotonic(), log=lambda *_: None)
    assert set(t.keys_received) & {o["Key"] for o in storage.list(f"{plan.run_prefix}staged/")} == {
        staged_key(plan.run_prefix, legacy["shard"])
    }
    assert res.layers_kept == 4 and len(load_rows(registry, res.dataset)) == 4
