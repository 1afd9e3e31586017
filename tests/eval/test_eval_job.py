"""The eval job end to end on a real SeaweedFS and a local Ray cluster: a synthetic test split, the tiny model
(random init: the path is under test, not the quality), both baselines, stand-in feature networks; the report
registered with lineage, history, the gate both ways, promotion by compare-and-swap."""

from __future__ import annotations

import dataclasses
import json
import uuid

import pytest

from reflade.engine.config import EngineConfig
from reflade.engine.pipeline import synthetic_rows
from reflade.engine.schema import write_shard
from reflade.engine.synth import make_scene
from reflade.eval.config import STAND_IN_NETWORKS, EvalConfig
from reflade.eval.gate import GateFailed, NotComparable
from reflade.eval.job import EvalRequest, run_eval
from reflade.eval.report import STAND_IN_TITLE
from reflade.platform.config import load_config
from reflade.platform.registry import Registry

pytestmark = pytest.mark.usefixtures("ray_cluster", "one_torch_thread")


@pytest.fixture(scope="module")
def world(storage, storage_config, tiny_vae, tmp_path_factory):
    """One registry for the module: a dataset (3 synthetic scenes in test), two tiny models, the stand-ins."""
    from reflade.eval.network_convert import register_stand_ins
    from reflade.train.model import build_reflayer
    from reflade.train.text import MiniLMTextEncoder, minilm_folder

    tmp = tmp_path_factory.mktemp("eval-world")
    registry = Registry(storage, prefix=f"registry-{uuid.uuid4().hex[:10]}")
    rows = []
    for seed in (21, 22, 23):
        rows += synthetic_rows(
            make_scene(seed, size=(64, 64), n_objects=(2, 2)), f"e{seed}", "cfg", "test", EngineConfig()
        )
    (tmp / "ds" / "shards").mkdir(parents=True)
    write_shard(rows, str(tmp / "ds" / "shards" / "part-0.parquet"))
    dataset = registry.create("dataset", "evalset", tmp / "ds", progress=False)
    models = []
    for seed in (0, 1):
        bundle = build_reflayer("tiny", vae=tiny_vae(), text=MiniLMTextEncoder(minilm_folder()), seed=seed)
        models.append(registry.create("model", "reflayer", bundle.save(tmp / f"m{seed}"), progress=False).ref)
    assert models[0] != models[1]
    nets = register_stand_ins(registry)
    cfg = load_config(None, env={})
    for f in ("endpoint", "bucket", "region", "access_key_id", "secret_access_key"):
        setattr(cfg.storage, f, getattr(storage_config, f))
    cfg.registry.prefix = registry.prefix.rstrip("/")
    settings = EvalConfig(
        dataset=f"{dataset.ref}:test",
        metric_size=48,
        steps=2,
        batch_size=4,
        threads=1,
        report_samples=2,
        weights_cache=str(tmp / "cache"),
        **{f"{k}_net": v for k, v in STAND_IN_NETWORKS.items()},
    )
    return {
        "registry": registry,
        "cfg": cfg,
        "settings": settings,
        "models": models,
        "dataset": dataset,
        "nets": nets,
        "rows": rows,
    }


def _run(world, model, **kw):
    settings = kw.pop("settings", world["settings"])
    return run_eval(world["cfg"], EvalRequest(model=model, settings=settings, **kw), log=lambda m: None)


def test_eval_run_registers_a_report_with_lineage(world, tmp_path):
    reg, m1 = world["registry"], world["models"][0]
    out = _run(world, m1, output=tmp_path / "report")
    r = out.report
    assert STAND_IN_TITLE in r["title"] and r["setup"]["stand_in"] is True
    assert r["models"] == [m1, "copy-visible", "classical"]
    # every model has a pooled row per kind over every item: 3 scenes x 2 objects x 1 prompt type per kind
    pooled = {(t["model"], t["kind"]): t for t in r["tables"] if t["prompt_type"] == "all"}
    assert set(pooled) == {(m, k) for m in r["models"] for k in ("foreground", "background")}
    assert all(t["n"] == 6 for t in pooled.values())
    # the paper's prompt only (text+box:fine) by default; classical reads no text but uses the box
    assert {t["prompt_type"] for t in r["tables"]} == {"text+box:fine", "all"}
    assert pooled[("classical", "foreground")]["refused"] == 0
    # copy-visible invents nothing: its hidden foreground alpha IoU is 0, its visible part is the truth's (up to
    # the resampling to the metric frame along the occlusion boundary), the hidden error is large
    cv = pooled[("copy-visible", "foreground")]
    assert cv["hidden_alpha_iou"] == 0.0 and cv["psnr_visible"] > 25 and cv["hidden_rgb_mae"] > 20
    for t in pooled.values():
        assert t["fid_samples"] == 6 and t["fid"] is not None and t["hpa"] is not None
    assert {(c["kind"], c["metric"]) for c in r["comparisons"]} >= {
        ("foreground", "hidden_rgb_mae"),
        ("background", "hpa"),
    }
    assert (
        set(r["fid_caveat"]) == {"foreground", "background"} and "6 samples" in r["fid_caveat"]["foreground"]
    )
    # registered with lineage to the exact model, dataset and feature networks
    v = out.version
    assert v.kind == "eval-report" and v.name == "reflayer"
    assert set(v.parents) == {m1, world["dataset"].ref, *world["nets"].values()}
    assert out.version.ref in reg.children(m1)
    assert json.loads(reg.read_bytes(v.ref, "report.json"))["headline"] == r["headline"]
    files = {f["path"] for f in v.files}
    assert {"report.html", "report.json"} <= files
    html = (tmp_path / "report" / "report.html").read_text()
    for g in r["grid"]:
        for rel in g["cells"].values():
            assert rel in files and rel in html
    assert r["grid"] and any(f["path"] in html for f in r["figures"])

    from reflade.eval.history import reports_of

    hist = reports_of(reg, "model/reflayer")
    assert [h["report"] for h in hist if h["model"] == m1] == [v.ref]


def test_gate_both_ways_and_promotion(world):
    reg = world["registry"]
    m1, m2 = world["models"]
    strict = dataclasses.replace(world["settings"], gate_margins={"hpa": 0.0})
    # no production yet: the run says so and promotes only with --allow-first
    with pytest.raises(GateFailed, match="no production model yet.*--allow-first"):
        _run(world, m1, settings=strict, promote=True)
    assert "production" not in reg.aliases("model", "reflayer")
    out = _run(world, m1, settings=strict, promote=True, allow_first=True)
    assert out.promoted == m1 and reg.resolve("model/reflayer@production").ref == m1
    # the gate with no margin, both ways: exactly one direction passes (their HPAs differ)
    results = {}
    for cand, base in ((m2, m1), (m1, m2)):
        try:
            results[cand] = _run(world, cand, settings=strict, baseline=base).gate
        except GateFailed as e:
            results[cand] = str(e)
    passed = [c for c, g in results.items() if not isinstance(g, str)]
    assert len(passed) == 1, results
    failed = next(g for g in results.values() if isinstance(g, str))
    assert "FAILED" in failed and "hpa" in failed
    # the baseline's earlier report on the same setup was reused, not recomputed
    assert len([c for c in reg.children(m1) if c.startswith("eval-report/")]) >= 2
    # --promote gates against production: the better of the two lands there, the other is refused
    winner = passed[0]
    loser = m2 if winner == m1 else m1
    if winner == m2:
        out = _run(world, m2, settings=strict, promote=True)
        assert out.promoted == m2 and reg.resolve("model/reflayer@production").ref == m2
    else:
        with pytest.raises(GateFailed):
            _run(world, loser, settings=strict, promote=True)
        assert reg.resolve("model/reflayer@production").ref == m1


def test_promotion_loses_a_race(world):
    from reflade.eval.gate import promote

    reg = world["registry"]
    m1, m2 = world["models"]
    if "production" not in reg.aliases("model", "reflayer"):
        reg.set_alias(m1, "production")
    seen = reg.aliases("model", "reflayer")["production"]  # what this run's gate read
    other = m2 if reg.resolve(m2).version != seen else m1
    reg.set_alias(other, "production")  # a concurrent promotion lands first
    with pytest.raises(GateFailed, match="moved meanwhile"):
        promote(reg, m2 if other == m1 else m1, seen, log=lambda m: None)
    assert reg.resolve("model/reflayer@production").ref == other


def test_refuses_to_compare_stand_in_with_real(world):
    from reflade.eval.gate import check, comparable

    reg = world["registry"]
    (h,) = [c for c in reg.children(world["models"][0]) if c.startswith("eval-report/")][:1]
    a = json.loads(reg.read_bytes(h, "report.json"))
    b = json.loads(json.dumps(a))
    b["setup"]["stand_in"] = False
    b["subject"] = "model/reflayer@99"
    with pytest.raises(NotComparable, match="stand-in feature networks"):
        comparable(a, b)
    c = json.loads(json.dumps(a))
    c["setup"]["prompt_types"] = ["box:fine"]
    with pytest.raises(NotComparable, match="prompt_types"):
        check(a, c, {"hpa": 0.01}, baseline=a["subject"])


def test_all_prompt_types_and_a_refusal(world):
    settings = dataclasses.replace(
        world["settings"], prompt_types=["text:fine", "point:coarse"], max_samples=2
    )
    r = _run(world, "classical", settings=settings).report
    assert r["models"] == ["classical", "copy-visible"]
    by = {(t["prompt_type"], t["kind"]): t for t in r["tables"] if t["model"] == "classical"}
    # two rows (max_samples), one of each kind or both of one; text-only prompts are refused by classical
    assert sum(t["n"] for (p, _), t in by.items() if p == "text:fine") == 2
    assert all(t["refused"] == t["n"] for (p, _), t in by.items() if p == "text:fine")
    assert all(t["refused"] == 0 for (p, _), t in by.items() if p == "point:coarse")
    assert r["refused"]["classical"] == 2 and r["refused"]["copy-visible"] == 0


def test_pools_that_leave_the_read_no_core_are_refused(world):
    from reflade.eval.job import EvalError

    greedy = dataclasses.replace(world["settings"], predict_actors=2, score_actors=1, num_cpus=0.5)
    with pytest.raises(EvalError, match="ask for 1.5 CPUs .* cluster has 2: the job would wait forever"):
        _run(world, "copy-visible", settings=greedy)
