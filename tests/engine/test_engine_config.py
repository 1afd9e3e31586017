"""The engine's configuration: one dataclass per stage plus resources, every field classified as output or not,
the fingerprint of the defaults unchanged by the split, and the flat YAML/environment keys still working."""

from __future__ import annotations

import dataclasses

import pytest

from reflade.engine.config import (
    OUTPUT,
    STAGE_CONFIGS,
    EngineConfig,
    ResourceConfig,
    changes_output,
    output,
)
from reflade.platform.config import ConfigError, load_config

# EngineConfig().fingerprint() before the configuration was split into parts (commit 436d869): the sample ids of
# every dataset made with the defaults depend on it.
DEFAULT_FINGERPRINT = "90dff6be479a63da"
RESOURCES = {
    "batch_size",
    "cpu_actors",
    "gpu_actors",
    "num_gpus",
    "num_cpus_per_actor",
    "num_cpus_per_task",
    "weights_cache",
    "weights_dir",
    "layout",
    "fused_actors",
}
COMPLETION_RESOURCES = {"completion_calls_in_flight", "completion_batch_wait_s"}
"""Resources that belong to one stage's part: how its actors run (engine/completion_batcher.py)."""
RESOURCES |= COMPLETION_RESOURCES


def test_every_field_is_classified():
    unclassified = [f.name for f in dataclasses.fields(EngineConfig) if OUTPUT not in f.metadata]
    assert not unclassified, f"declare these with output(...) or resource(...): {unclassified}"
    assert {f.name for f in dataclasses.fields(EngineConfig) if not changes_output(f)} == RESOURCES


def test_default_fingerprint_is_unchanged():
    assert EngineConfig().fingerprint() == DEFAULT_FINGERPRINT


def test_resources_do_not_change_the_fingerprint_and_outputs_do():
    base = EngineConfig()
    for f in dataclasses.fields(EngineConfig):
        value = getattr(base, f.name)
        if isinstance(value, bool):
            other = not value
        elif isinstance(value, (int, float)):
            other = value + 1
        elif isinstance(value, str):
            other = value + "x"
        else:
            other = [*value, "x"]
        changed = dataclasses.replace(base, **{f.name: other}).fingerprint() != base.fingerprint()
        assert changed == (f.name not in RESOURCES), f.name


def test_a_new_field_counts_unless_declared_a_resource():
    @dataclasses.dataclass(kw_only=True)
    class Extended(EngineConfig):
        plain: int = 1
        declared: int = output(1)
        cached: int = dataclasses.field(default=1, metadata={OUTPUT: False})

    base = Extended()
    assert dataclasses.replace(base, plain=2).fingerprint() != base.fingerprint()
    assert dataclasses.replace(base, declared=2).fingerprint() != base.fingerprint()
    assert dataclasses.replace(base, cached=2).fingerprint() == base.fingerprint()


def test_parts_cover_the_section_once():
    names = [f.name for cls in STAGE_CONFIGS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
    assert set(names) == {f.name for f in dataclasses.fields(EngineConfig)}
    assert {f.name for f in dataclasses.fields(ResourceConfig)} == RESOURCES - COMPLETION_RESOURCES
    completion = STAGE_CONFIGS["completion"]
    assert {f.name for f in dataclasses.fields(completion) if not changes_output(f)} == COMPLETION_RESOURCES
    cfg = EngineConfig(max_side=512, batch_size=8)
    assert cfg.part("prefilter").max_side == 512 and cfg.part("resources").batch_size == 8
    assert isinstance(cfg, STAGE_CONFIGS["scene"])  # a stage's code may take just its part


def test_flat_keys_from_yaml_and_environment(tmp_path):
    path = tmp_path / "reflade.yaml"
    path.write_text("engine:\n  max_side: 512\n  batch_size: 8\n  vocabulary: [cat, dog]\n  layout: fused\n")
    eng = load_config(path, env={"REFLADE_ENGINE_MIN_SHARPNESS": "20"}).section("engine")
    assert (eng.max_side, eng.batch_size, eng.vocabulary, eng.layout) == (512, 8, ["cat", "dog"], "fused")
    assert eng.min_sharpness == 20.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  prefilter: {max_side: 512}\n")
    with pytest.raises(ConfigError, match=r"unknown key engine.prefilter \(known keys of engine: max_side"):
        load_config(bad, env={})
