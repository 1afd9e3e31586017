"""The ``train`` configuration section: registered with the platform's loader, validated with the key's name, and
``reflade train``'s flags on top of it: defaults < YAML file < ``REFLADE_TRAIN_*`` variables < flags."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from reflade.platform.cli import main as cli_main
from reflade.platform.config import ConfigError, load_config, plugin_sections
from reflade.train.cli import train_config
from reflade.train.config import TrainConfig, TrainSettings


@pytest.fixture
def yaml_file(tmp_path):
    path = tmp_path / "reflade.yaml"
    path.write_text(
        "train:\n"
        "  dataset: dataset/from-yaml\n"
        "  steps: 7\n"
        "  lr: 0.01\n"
        "  workers: 2\n"
        "  cache_latents: true\n"
        "  bf16: false\n"
    )
    return path


def test_section_is_registered_and_defaults_are_the_settings_defaults():
    assert plugin_sections()["train"] is TrainConfig
    tc = load_config(env={}).section("train")
    assert tc == TrainConfig()
    assert tc.settings() == TrainSettings()
    assert (tc.dataset, tc.cache_latents, tc.torch_threads) == (None, False, None)


def test_precedence_defaults_yaml_env_flags(yaml_file):
    # defaults < YAML
    tc = train_config(load_config(yaml_file, env={}))
    assert (tc.dataset, tc.steps, tc.lr, tc.workers, tc.cache_latents, tc.bf16) == (
        "dataset/from-yaml",
        7,
        0.01,
        2,
        True,
        False,
    )
    assert tc.batch_size == TrainSettings().batch_size  # not in the file: the default
    # YAML < REFLADE_TRAIN_*
    env = {"REFLADE_TRAIN_STEPS": "9", "REFLADE_TRAIN_BATCH_SIZE": "2", "REFLADE_TRAIN_CACHE_LATENTS": "no"}
    tc = train_config(load_config(yaml_file, env=env))
    assert (tc.steps, tc.batch_size, tc.cache_latents, tc.lr) == (9, 2, False, 0.01)
    # REFLADE_TRAIN_* < flags
    tc = train_config(load_config(yaml_file, env=env), {"steps": 11, "lr": 0.5})
    assert (tc.steps, tc.lr, tc.batch_size, tc.workers) == (11, 0.5, 2, 2)
    assert tc.settings().steps == 11 and not hasattr(tc.settings(), "dataset")


def test_errors_name_the_key(tmp_path, yaml_file):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key train\.stepz .*steps"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match=r"train\.steps must be at least 1, got 0"):
        load_config(yaml_file, env={"REFLADE_TRAIN_STEPS": "0"})
    with pytest.raises(ConfigError, match=r"REFLADE_TRAIN_LR.*cannot read 'fast' as float"):
        load_config(env={"REFLADE_TRAIN_LR": "fast"})
    with pytest.raises(ConfigError, match=r"train\.phase must be one of"):
        train_config(load_config(env={}), {"phase": "nope"})
    with pytest.raises(ConfigError, match="unknown train settings"):
        train_config(load_config(env={}), {"stepz": 3})


def test_the_command_applies_flags_over_the_section(yaml_file, monkeypatch, capsys):
    """`reflade --config FILE train --steps N` with REFLADE_TRAIN_* set: run_training gets the merged settings."""
    import reflade.platform.cluster
    import reflade.train.trainer

    calls = []

    def fake_run_training(cfg, dataset, settings, **kw):
        calls.append((dataset, settings, kw))
        return SimpleNamespace(ref="model/reflayer@1", metrics={}, run_name="r", parents=[dataset])

    monkeypatch.setattr(reflade.train.trainer, "run_training", fake_run_training)
    monkeypatch.setattr(reflade.platform.cluster, "connect", lambda cfg: None)
    monkeypatch.delenv("REFLADE_CONFIG", raising=False)
    monkeypatch.setenv("REFLADE_TRAIN_STEPS", "9")
    monkeypatch.setenv("REFLADE_TRAIN_TORCH_THREADS", "3")
    assert cli_main(["--config", str(yaml_file), "train", "--steps", "11", "--no-cache-latents"]) == 0
    (dataset, settings, kw) = calls[-1]
    assert dataset == "dataset/from-yaml"  # the section's; no --dataset given
    assert isinstance(settings, TrainSettings) and not isinstance(settings, TrainConfig)
    assert (settings.steps, settings.lr, settings.workers, settings.bf16) == (11, 0.01, 2, False)
    assert kw["cache_latents"] is False and kw["torch_threads"] == 3
    assert cli_main(["--config", str(yaml_file), "train", "--dataset", "dataset/flag", "--gpu"]) == 0
    dataset, settings, _ = calls[-1]
    assert dataset == "dataset/flag" and settings.use_gpu and settings.steps == 9
    capsys.readouterr()
    monkeypatch.setenv("REFLADE_TRAIN_WORKERS", "0")
    assert cli_main(["--config", str(yaml_file), "train", "--steps", "3"]) != 0
    assert "train.workers must be at least 1" in capsys.readouterr().err
    monkeypatch.delenv("REFLADE_TRAIN_WORKERS")
    assert cli_main(["--config", str(yaml_file), "train", "--ema-decay", "1.5"]) != 0
    assert "train.ema_decay must be in [0, 1)" in capsys.readouterr().err
