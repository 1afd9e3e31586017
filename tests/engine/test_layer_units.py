"""The staged layout mattes an image's entities one per call (engine/layer_units.py): split into units, matted by
the pool, gathered back. What leaves must be what the sequential matting stage hands on, and on Ray the layers of
one image must have gone through different matting calls."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import re

import numpy as np
import pandas as pd
import pytest
from test_layout import _independent_rows, _pipeline_rows

from reflade.engine.config import EngineConfig
from reflade.engine.layer_units import GatherLayers, LayerMattingStage, split_layers
from reflade.engine.layout import LayerStages, add_layer_stages
from reflade.engine.ray_stages import MarkDuplicates, MattingStage, PreFilterStage
from reflade.engine.record_stage import load_work, to_batch, to_records
from reflade.engine.synth import make_scene, scene_to_png_bytes

pytestmark = pytest.mark.timeout(600)


def _records(seeds: list[int]) -> list[dict]:
    datas = [scene_to_png_bytes(make_scene(seed=s)) for s in seeds]
    return [
        {"source_id": f"s{i}", "sha256": hashlib.sha256(d).hexdigest(), "name": f"scene{i}.png", "data": d}
        for i, d in enumerate(datas)
    ]


def _prefiltered(records: list[dict], cfg: EngineConfig) -> pd.DataFrame:
    rows = [dict(r, ok=True, stage="", reason="") for r in records]
    return MarkDuplicates({})(PreFilterStage(cfg)(to_batch(rows)))


def _completed(records: list[dict], cfg: EngineConfig) -> pd.DataFrame:
    """The records as the matting stage receives them (scene and completion done, Work pickled)."""
    stages = LayerStages("classical", cfg).stages
    batch = _prefiltered(records, cfg)
    for stage in stages[:2]:
        stage.pickle_out = True
        batch = stage(batch)
    return batch


def _by_source(batch: pd.DataFrame) -> dict[str, dict]:
    return {r["source_id"]: r for r in to_records(batch)}


def _layers(work) -> list[tuple]:
    return [
        (lay.entity_id, lay.kind, lay.ok, lay.reason, None if lay.rgba is None else lay.rgba.tobytes())
        for lay in work.layers
    ]


def test_units_gather_into_what_the_sequential_stage_hands_on():
    """Split, matted one unit per call in any order (one unit delivered twice), gathered: the same records as
    MattingStage over whole images: layers in entity order, counts, timings, quarantine; records already out of
    the run pass through."""
    cfg = EngineConfig()
    batch = _completed(_records([701, 702]), cfg)
    out = to_records(batch)
    # A third image out of the run (quarantined earlier) and a fourth whose second completion is broken.
    gone = dict(out[0], source_id="gone", ok=False, stage="scene", reason="no_entities: none")
    broken_work = load_work(out[1]["work"])
    assert len(broken_work.entities) >= 2, "scene 702 should have several entities"
    broken_work.completions[1] = dataclasses.replace(broken_work.completions[1], background=None)
    broken = dict(out[1], source_id="broken", work=pickle.dumps(broken_work))
    batch = to_batch([*out, gone, broken])

    sequential = _by_source(MattingStage("classical", cfg)(batch))

    units = split_layers(batch)
    n_entities = {r["source_id"]: len(load_work(r["work"]).entities) for r in out}
    assert sorted(units["source_id"]) == sorted(
        ["s0"] * n_entities["s0"] + ["s1"] * n_entities["s1"] + ["gone"] + ["broken"] * n_entities["s1"]
    )
    matter = LayerMattingStage("classical", cfg)
    matted = [to_records(matter(units.iloc[[i]]))[0] for i in range(len(units))]  # one unit per call
    matted = matted[::-1] + [matted[0]]  # arrival order is the pool's; a retried unit may come twice
    gather = GatherLayers()
    gathered = {}
    for r in matted:
        for g in to_records(gather(to_batch([r]))):
            assert g["source_id"] not in gathered, "an image left twice"
            gathered[g["source_id"]] = g
    assert gather.pending == {}, "nothing is held once every unit arrived"

    assert sorted(gathered) == sorted(sequential) == ["broken", "gone", "s0", "s1"]
    for sid, want in sequential.items():
        got = gathered[sid]
        assert "unit" not in got and "units" not in got
        assert (got["ok"], got["stage"], got["reason"]) == (want["ok"], want["stage"], want["reason"]), sid
        if sid == "gone":
            assert got["work"] == want["work"]
            continue
        gw, ww = load_work(got["work"]), load_work(want["work"])
        assert _layers(gw) == _layers(ww), sid
        assert gw.counts == ww.counts, sid
        assert gw.completions == [] and gw.image is not None
        assert gw.timings["matting"] > 0
    assert not gathered["broken"]["ok"] and gathered["broken"]["stage"] == "matting"
    assert gathered["broken"]["reason"].startswith("error:"), gathered["broken"]["reason"]
    assert len(load_work(gathered["s1"]["work"]).layers) == 2 * n_entities["s1"]


def _tasks(stats: str, operator: str) -> int:
    """Tasks Ray Data ran for the operator whose name holds ``operator``, from ``Dataset.stats()``."""
    found = re.findall(rf"Operator \d+ [^\n]*{operator}[^\n]*: (\d+) tasks executed", stats)
    assert found, f"no {operator} operator in the stats:\n{stats}"
    return sum(int(n) for n in found)


def test_staged_layout_on_ray_mattes_one_entity_per_call(ray_cluster):
    """Through Ray Data (the staged layout of add_layer_stages): the rows equal a plain loop over independently
    decoded inputs, and the matting operator ran one task per entity (so the layers of one image were matted in
    different actor calls, by a pool of two), every image gathered once."""
    import ray

    cfg = EngineConfig(batch_size=2, layout="staged", cpu_actors=2, num_cpus_per_actor=0.25)
    records = _records([700, 701, 702])
    ds = ray.data.from_pandas(_prefiltered(records, cfg))
    done = add_layer_stages(ds, cfg, "classical").materialize()
    out = done.take_all()
    assert sorted(r["source_id"] for r in out) == ["s0", "s1", "s2"]
    entities = sum(len(load_work(r["work"]).entities) for r in out)
    assert entities >= 6
    plain = {}
    for rec in records:
        plain.update(_independent_rows(rec["data"], rec["sha256"], cfg, cfg.fingerprint()))
    pipeline = _pipeline_rows(out, cfg)
    assert sorted(pipeline) == sorted(plain)
    for sid, want in plain.items():
        assert pipeline[sid] == want, sid
    stats = done.stats()
    assert _tasks(stats, "LayerMattingStage") == entities, stats
    counts = [load_work(r["work"]).counts["matting"] for r in out]
    assert sum(c[0] for c in counts) == 2 * entities


def test_one_image_is_matted_in_several_calls(ray_cluster):
    """One image with several entities alone: its layers go through as many matting calls as it has entities."""
    import ray

    cfg = EngineConfig(batch_size=4, layout="staged", cpu_actors=2, num_cpus_per_actor=0.25)
    ds = ray.data.from_pandas(_prefiltered(_records([702]), cfg))
    done = add_layer_stages(ds, cfg, "classical").materialize()
    (r,) = done.take_all()
    work = load_work(r["work"])
    assert r["ok"] and len(work.entities) >= 2
    assert _tasks(done.stats(), "LayerMattingStage") == len(work.entities)
    assert [lay.entity_id for lay in work.layers] == [e.entity_id for e in work.entities for _ in (0, 1)]
    assert np.isfinite(work.timings["matting"])
