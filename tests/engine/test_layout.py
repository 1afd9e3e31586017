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


def test_layer_stages_match_the_plain_loop():
    """The fused actor's code path (outside Ray) gives the same kept layers as run_stages_plain."""
    from reflade.engine.pipeline import MarkDuplicates, PreFilterStage, _frame, _rows

    cfg = EngineConfig(batch_size=2)
    records = [
        {
            "source_id": f"s{i}",
            "sha256": f"{i:064x}",
            "name": f"scene{i}.png",
            "data": scene_to_png_bytes(make_scene(seed=700 + i)),
        }
        for i in range(3)
    ]
    plain = run_stages_plain(records, cfg, "classical")
    rows = [dict(r, ok=True, stage="", reason="") for r in records]
    frame = MarkDuplicates({})(PreFilterStage(cfg)(_frame(rows)))
    out = LayerStages("classical", cfg)(frame)
    assert isinstance(out, pd.DataFrame)
    fused = _rows(out)
    assert [r["source_id"] for r in fused] == [r["source_id"] for r in plain]
    for a, b in zip(fused, plain, strict=True):
        assert (a["ok"], a["stage"], a["reason"]) == (b["ok"], b["stage"], b["reason"])
        wa, wb = (pickle_loads(x["work"]) for x in (a, b))
        assert [(lay.entity_id, lay.kind, lay.ok) for lay in wa.layers] == [
            (lay.entity_id, lay.kind, lay.ok) for lay in wb.layers
        ]
        for la, lb in zip(wa.layers, wb.layers, strict=True):
            if la.ok:
                assert (la.rgba == lb.rgba).all() and la.prompts == lb.prompts
    assert any(lay.ok for r in fused for lay in pickle_loads(r["work"]).layers), "no layer kept at all"


def pickle_loads(blob):
    import pickle

    return pickle.loads(blob)


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
