"""`reflade eval ...` refuses bad input with one clear line (no traceback), before any Ray work."""

from __future__ import annotations

import json

import pytest

from reflade.eval.cli import app
from reflade.platform.cli import run_typer


@pytest.fixture
def env(registry_env):
    return registry_env


def _err(capsys) -> str:
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())
    assert "Traceback" not in text
    return text


def test_unknown_prompt_type_is_a_usage_error(env, capsys):
    assert run_typer(app, ["run", "--model", "classical", "--prompt-types", "text+bx"], "reflade eval") == 2
    err = _err(capsys)
    assert "unknown prompt type 'text+bx'" in err and "text+box:fine" in err


def test_missing_feature_networks_say_how_to_get_them(env, capsys):
    args = ["run", "--model", "copy-visible", "--dataset", "dataset/none:test"]
    assert run_typer(app, args, "reflade eval") == 1
    assert "dataset/none" in _err(capsys)  # the dataset is resolved first: its own registry error
    env.create("dataset", "some", files={"x.txt": __file__}, progress=False)
    assert (
        run_typer(app, ["run", "--model", "copy-visible", "--dataset", "dataset/some:test"], "reflade eval")
        == 1
    )
    err = _err(capsys)
    assert "EvalError" in err and "weights/lpips-alexnet" in err and "--stand-in" in err


def test_unknown_model_and_a_wrong_kind(env, capsys):
    assert run_typer(app, ["run", "--model", "model/nope@1"], "reflade eval") == 1
    assert "model/nope" in _err(capsys)
    v = env.create("weights", "w", files={"x.txt": __file__}, progress=False)
    assert run_typer(app, ["run", "--model", v.ref], "reflade eval") == 1
    assert "is a weights; --model takes a model reference" in _err(capsys)
    m = env.create("model", "notamodel", files={"x.txt": __file__}, progress=False)
    assert run_typer(app, ["run", "--model", m.ref], "reflade eval") == 1
    assert f"{m.ref} is not a RefLayer model (no bundle.json among its files)" in _err(capsys)


def test_config_section_is_checked(env, capsys, monkeypatch):
    monkeypatch.setenv("REFLADE_EVAL_METRIC_SIZE", "4")
    assert run_typer(app, ["run", "--model", "classical"], "reflade eval") == 1
    assert "eval.metric_size must be at least 16 pixels, got 4" in _err(capsys)


def test_bad_votes_name_the_line(env, capsys, tmp_path):
    good = {"item": "i", "prompt": "box:fine", "model_a": "a", "model_b": "b", "winner": "a"}
    (tmp_path / "v.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good | {"winner": "c"}) + "\n")
    assert run_typer(app, ["elo", str(tmp_path / "v.jsonl")], "reflade eval") == 1
    err = _err(capsys)
    assert "VoteError" in err and "line 2" in err


def test_convert_weights_refuses_an_unknown_network(env, capsys, tmp_path):
    args = ["convert-weights", "resnet", str(tmp_path / "x.pth"), str(tmp_path / "out")]
    assert run_typer(app, args, "reflade eval") == 2
    assert "unknown network 'resnet' (known: alexnet, inception, clip)" in _err(capsys)


def test_history_of_a_model_without_reports(env, capsys, tmp_path):
    env.create("model", "lonely", files={"x.txt": __file__}, progress=False)
    assert run_typer(app, ["history", "model/lonely"], "reflade eval") == 0
    assert "no eval reports of model/lonely yet" in _err(capsys)
