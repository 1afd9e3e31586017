"""Synthetic scenes as dataset rows with exact ground truth (no stage runs on them), and how a run stages them
beside the rows its stages made."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from reflade.engine.config import EngineConfig
from reflade.engine.schema import build_row, make_sample_id
from reflade.engine.staging import done_markers, done_source_ids, marker, shard_name, split_for, stage_shard

SCENES_PER_SHARD = 16
SCENE_SEED0 = 100_000  # scene i of a run is make_scene(seed=SCENE_SEED0 + i)


def synthetic_rows(
    scene, scene_id: str, config_hash: str, split: str, cfg: EngineConfig
) -> list[dict[str, Any]]:
    """Rows with exact ground truth from one synthetic scene (foreground and background per object).

    Args:
        scene: a ``reflade.engine.synth.Scene``.
        scene_id: recorded in the provenance (``backends.synthetic``).
        config_hash: the engine configuration's fingerprint (part of each sample id).
        split: the rows' split.
        cfg: the engine configuration (its prompt settings).
    """
    from reflade.engine.stages.prompts import make_prompts
    from reflade.engine.synth import scene_to_png_bytes
    from reflade.engine.types import Entity

    png = scene_to_png_bytes(scene)
    sha = hashlib.sha256(png).hexdigest()
    h, w = scene.image.shape[:2]
    rows = []
    for obj in scene.objects:
        cy, cx = np.argwhere(obj.visible_mask).mean(axis=0)
        horiz = "left" if cx < w / 3 else "right" if cx > 2 * w / 3 else "center"
        area = obj.amodal_mask.mean()
        size = "small" if area < 0.05 else "large" if area > 0.2 else "medium"
        ent = Entity(
            obj.entity_id,
            obj.box,
            obj.visible_mask,
            obj.category,
            1.0,
            "synthetic",
            {"color": obj.color_name, "position": horiz, "size": size},
        )
        for kind in ("foreground", "background"):
            rng = np.random.default_rng(int(sha[:12], 16) + 7919 * obj.entity_id + (kind == "background"))
            if kind == "foreground":
                layer, visible = obj.layer, obj.visible_mask
            else:
                bg = scene.without(obj.entity_id)
                layer = np.dstack([bg, np.full((h, w), 255, np.uint8)])
                visible = ~obj.visible_mask
            rows.append(
                build_row(
                    sample_id=make_sample_id(sha, obj.entity_id, kind, config_hash),
                    source_id=sha[:16],
                    source_sha256=sha,
                    image_png=png,
                    width=w,
                    height=h,
                    layer=layer,
                    visible_mask=visible,
                    kind=kind,
                    category=obj.category,
                    prompts=make_prompts(ent, obj.visible_mask, (h, w), rng, cfg, kind=kind),
                    split=split,
                    scores={"occluded_fraction": float(obj.occluded_fraction)},
                    config_hash=config_hash,
                    backends={"synthetic": f"exact:{scene_id}"},
                    weights=[],
                )
            )
    return rows


def stage_synthetic(
    storage, run_prefix: str, n: int, size: int, config_hash: str, ecfg: EngineConfig, log
) -> None:
    """Stage ``n`` synthetic scenes of ``size`` pixels as ground-truth shards under ``run_prefix``, like any
    other shard (resumable too: scenes a marker holds are not made again)."""
    from reflade.engine.synth import make_scene

    done_ids = done_source_ids(done_markers(storage, run_prefix))
    made = 0
    for start in range(0, n, SCENES_PER_SHARD):
        # Texture backgrounds: the bundled photos are real-photo inputs, and test rows must not share them.
        scenes = [
            (i, make_scene(seed=SCENE_SEED0 + i, size=(size, size), background="texture"))
            for i in range(start, min(n, start + SCENES_PER_SHARD))
        ]
        ids = [f"synthetic-{i:06d}" for i, _ in scenes]
        if all(i in done_ids for i in ids):
            continue
        rows = []
        for (_, scene), sid in zip(scenes, ids, strict=True):
            split = ecfg.synthetic_split
            if (
                split == "hash"
            ):  # whole scenes per split, by id: the same scene lands in the same split every run
                split = split_for(hashlib.sha256(sid.encode()).hexdigest(), ecfg.synthetic_test_fraction)
            for row in synthetic_rows(scene, sid, config_hash, split, ecfg):
                row["source_id"] = sid
                rows.append(row)
        done = marker(ids, images_kept=len(ids), layers_kept=len(rows), layers_rejected=0, synthetic=True)
        stage_shard(storage, run_prefix, shard_name(ids), rows, [], done)
        made += len(rows)
    log(f"synthetic: {n} scenes staged ({made} new rows)")
