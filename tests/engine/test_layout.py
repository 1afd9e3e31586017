"""How stages 2-6 are laid out on Ray: the layout choice, the fused pool's size, and clear errors."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from reflade.engine.config import EngineConfig
from reflade.engine.pipeline import (
    MAX_INPUT_BLOCKS,
    EngineError,
    LayerStages,
    fused_pool_size,
    input_blocks,
    largest_first,
    resolve_layout,
    run_stages_plain,
)
from reflade.engine.synth import make_scene, scene_to_png_bytes


def test_auto_fuses_the_classical_stages_only():
    cfg = EngineConfig()
    assert resolve_layout(cfg, "classical") == "fused"
    assert resolve_layout(cfg, "neural") == "staged"  # one copy of each model per pool, not one per CPU
    gpu = dataclasses.replace(cfg, num_gpus=1.0)
    assert resolve_layout(gpu, "neural") == "staged"
    assert resolve_layout(gpu, "classical") == "fused"  # classical stages never take the GPU
    assert resolve_layout(dataclasses.replace(gpu, layout="fused"), "neural") == "fused"
    assert resolve_layout(dataclasses.replace(cfg, layout="staged"), "classical") == "staged"


def test_bad_layout_and_pool_size_are_named():
    with pytest.raises(
        EngineError, match=r"engine.layout must be one of auto, staged, fused, not 'pipelined'"
    ):
        resolve_layout(EngineConfig(layout="pipelined"), "classical")
    with pytest.raises(EngineError, match="engine.fused_actors must be 0"):
        fused_pool_size(EngineConfig(fused_actors=-1), 2.0)


def test_fused_pool_size():
    assert fused_pool_size(EngineConfig(), 2.0) == 2
    assert fused_pool_size(EngineConfig(), 16.0) == 16
    assert fused_pool_size(EngineConfig(), 0.5) == 1  # at least one actor
    assert fused_pool_size(EngineConfig(fused_actors=3), 64.0) == 3
    assert fused_pool_size(EngineConfig(gpu_actors=2), 64.0, gpu=True) == 2  # one per GPU actor, not per CPU


def test_input_blocks_hold_one_batch_each():
    """Blocks of one batch (an actor takes a whole block per task, so the run's straggler tail is one batch),
    capped for very large inputs, never zero."""
    assert input_blocks(1028, 4) == 257  # was 64 blocks of 16 images under the old cap
    assert input_blocks(9, 4) == 3 and input_blocks(8, 4) == 2
    assert input_blocks(3, 4) == 1 and input_blocks(0, 4) == 1
    assert input_blocks(5, 1) == 5
    assert input_blocks(10**7, 4) == MAX_INPUT_BLOCKS


def test_largest_first_orders_work_by_size_ties_in_input_order():
    """The run feeds its stages the largest files first, so that it ends on small ones (a short tail)."""
    items = [("a", 10), ("b", 300), ("c", 10), ("d", 50), ("e", 300)]
    before = list(items)
    assert largest_first(items, lambda it: it[1]) == [("b", 300), ("e", 300), ("d", 50), ("a", 10), ("c", 10)]
    assert items == before  # a new list; the caller's order (near-duplicates are resolved in it) is untouched
    assert largest_first([], lambda it: it[1]) == []


def test_layout_is_not_part_of_the_config_hash():
    base = EngineConfig()
    assert dataclasses.replace(base, layout="staged", fused_actors=4).fingerprint() == base.fingerprint()


def _independent_rows(data: bytes, sha: str, cfg: EngineConfig, config_hash: str) -> dict[str, tuple]:
    """The kept layers of one image by a plain loop that shares no engine plumbing with the pipeline: the image
    decoded with PIL, the backends and stage functions called directly. {sample_id: (layer PNG, mask PNG,
    prompts)}."""
    import io

    import numpy as np
    from PIL import Image

    from reflade.engine.backends import make_completion_backend, make_matting_backend, make_scene_backend
    from reflade.engine.schema import encode_png, make_sample_id
    from reflade.engine.stages.postfilter import check_layer
    from reflade.engine.stages.prompts import make_prompts

    image = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    entities = make_scene_backend("classical", cfg).detect(image)
    completions = make_completion_backend("classical", cfg).complete(image, entities)
    matting = make_matting_backend("classical", cfg)
    out = {}
    for ent, comp in zip(entities, completions, strict=True):
        background = np.dstack([comp.background, np.full(image.shape[:2], 255, np.uint8)])
        layers = [("foreground", matting.refine(image, comp, ent.mask), ent.mask)]
        layers.append(("background", background, ~ent.mask))
        for kind, rgba, visible in layers:
            rng = np.random.default_rng(int(sha[:12], 16) + 7919 * ent.entity_id + (kind == "background"))
            prompts = make_prompts(ent, ent.mask, image.shape[:2], rng, cfg, kind=kind)
            if prompts and check_layer(rgba, image, visible, kind, cfg).ok:
                sid = make_sample_id(sha, ent.entity_id, kind, config_hash)
                out[sid] = (encode_png(rgba), encode_png(visible), prompts)
    return out


def _pipeline_rows(records_out: list[dict], cfg: EngineConfig) -> dict[str, tuple]:
    """The kept layers of image records that left stage 6, as the shard writer's row builder makes them:
    {sample_id: (layer PNG, mask PNG, prompts)}."""
    import pickle

    from reflade.engine.schema import make_sample_id
    from reflade.engine.staging import ShardWriter, split_for

    config_hash = cfg.fingerprint()
    writer = ShardWriter({}, "runs/x/", config_hash, {"scene": "classical"}, [], cfg.test_fraction)
    out = {}
    for r in records_out:
        work = pickle.loads(r["work"])
        for lay in work.layers:
            if r["ok"] and lay.ok:
                sid = make_sample_id(r["sha256"], lay.entity_id, lay.kind, config_hash)
                row = writer._row(r, work, lay, sid, split_for(r["sha256"], cfg.test_fraction))
                out[row["sample_id"]] = (row["layer"], row["visible_mask"], row["prompts"])
    return out


def test_pipeline_rows_match_a_plain_loop_over_independently_decoded_inputs():
    """The rows the pipeline's stage code makes (record stages, the fused actor's LayerStages, the shard writer's
    row builder) are the rows of a plain loop over the same inputs: identical sample ids, layer and mask bytes and
    prompts."""
    import hashlib

    cfg = EngineConfig(batch_size=2)
    config_hash = cfg.fingerprint()
    datas = [scene_to_png_bytes(make_scene(seed=700 + i)) for i in range(3)]
    records = [
        {"source_id": f"s{i}", "sha256": hashlib.sha256(d).hexdigest(), "name": f"scene{i}.png", "data": d}
        for i, d in enumerate(datas)
    ]
    pipeline = _pipeline_rows(run_stages_plain(records, cfg, "classical"), cfg)
    plain = {}
    for rec in records:
        plain.update(_independent_rows(rec["data"], rec["sha256"], cfg, config_hash))
    assert len(plain) >= 6, "the scenes should give layers"
    assert sorted(pipeline) == sorted(plain)
    for sid, (layer, mask, prompts) in plain.items():
        assert pipeline[sid][0] == layer, sid
        assert pipeline[sid][1] == mask, sid
        assert pipeline[sid][2] == prompts, sid


def test_layer_stages_hand_on_objects_and_return_pickles():
    """Inside LayerStages each stage hands the next the Work object; what leaves is pickled bytes for every
    image, also those that left the run early (quarantined by the scene stage, say)."""
    import pickle

    from reflade.engine.pipeline import MarkDuplicates, PreFilterStage, Work, _frame, _rows

    cfg = EngineConfig()
    stages = LayerStages("classical", cfg)
    assert [s.pickle_out for s in stages.stages] == [False, False, False, False, True]
    records = [
        {
            "source_id": "scene",
            "sha256": "a" * 64,
            "name": "scene.png",
            "data": scene_to_png_bytes(make_scene(seed=701)),
        }
    ]
    rows = [dict(r, ok=True, stage="", reason="") for r in records]
    frame = MarkDuplicates({})(PreFilterStage(cfg)(_frame(rows)))
    # One image that the scene stage will drop: its work has no pixels (the stage quarantines it with the error).
    flat = frame.iloc[[0]].copy()
    flat["source_id"] = "flat"
    w = pickle.loads(flat["work"].iloc[0])
    w.image_png = b"not a png"
    flat["work"] = [pickle.dumps(w)]
    out = _rows(stages(pd.concat([frame, flat], ignore_index=True)))
    assert all(isinstance(r["work"], bytes) for r in out)
    assert isinstance(pickle.loads(out[0]["work"]), Work)
    by_id = {r["source_id"]: r for r in out}
    assert by_id["scene"]["ok"] and not by_id["flat"]["ok"]
    assert by_id["flat"]["stage"] == "scene" and by_id["flat"]["reason"].startswith("error:"), by_id["flat"]


def test_stage_hooks_are_abstract():
    """A record stage without ``process``, or a model stage without ``make_backend``, cannot be built (the Ray
    pools build the concrete ones: tests/engine/test_layer_units.py runs the staged layout on Ray)."""
    from reflade.engine.ray_stages import ModelStage
    from reflade.engine.record_stage import RecordStage

    class NoProcess(RecordStage):
        stage = "x"

    class NoBackend(ModelStage):
        stage = "y"

        def process(self, r, work):
            pass

    with pytest.raises(TypeError, match="abstract method.*process"):
        NoProcess()
    with pytest.raises(TypeError, match="abstract method.*make_backend"):
        NoBackend("classical", EngineConfig())
