"""Training checkpoints load without running code: ``state.pt`` round-trips the model, optimiser (AdamW and SGD),
EMA and settings through ``torch.load(weights_only=True)``, and a planted pickle is refused before it runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from reflade.train.checkpoint import CheckpointError, _load_state, _save_state
from reflade.train.config import TrainSettings
from reflade.train.step import make_optimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_state_round_trips_with_weights_only(tmp_path, optimizer):
    settings = TrainSettings(optimizer=optimizer, ema_decay=0.5, bf16=False, steps=7, seed=3)
    model = _model()
    opt = make_optimizer(list(model.parameters()), settings)
    for _ in range(2):  # optimiser state (moments, step counters, momentum buffers) to carry over
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    ema = {n: p.detach().clone() * 0.5 for n, p in model.named_parameters()}
    _save_state(str(tmp_path), model, opt, 5, ema, settings)

    state = _load_state(tmp_path)
    assert state["step"] == 5
    assert TrainSettings(**state["settings"]) == settings
    fresh = _model()
    fresh.load_state_dict(state["model"])
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    opt2 = make_optimizer(list(fresh.parameters()), settings)
    opt2.load_state_dict(state["optimizer"])
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i, st in s1["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][i][k])), (i, k)
    assert all(torch.equal(ema[k], state["ema"][k]) for k in ema)


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    """A ``state.pt`` whose unpickling would run a command (as anyone able to write to the bucket could plant) is
    refused with a clear error, and the command never runs."""
    touched = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint-00000002-abcdef"
    ckpt.mkdir()
    # Written by another process, as an attacker's file would be: the class is not importable here.
    script = textwrap.dedent(
        f"""
        import os, torch

        class Payload:
            def __reduce__(self):
                return (os.system, ("touch {touched}",))

        torch.save({{"model": {{}}, "optimizer": {{}}, "step": 2, "ema": None, "settings": Payload()}},
                   {str(ckpt / "state.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert not touched.exists()

    with pytest.raises(
        CheckpointError, match=r"refusing to load state\.pt of checkpoint .*checkpoint-00000002"
    ):
        _load_state(ckpt)
    assert not touched.exists(), "the planted pickle ran"

    # and a file that is not a training state at all
    torch.save({"weights": torch.zeros(2)}, ckpt / "state.pt")
    with pytest.raises(CheckpointError, match="not a training state"):
        _load_state(ckpt)
    os.remove(ckpt / "state.pt")
    with pytest.raises(CheckpointError, match="has no state.pt"):
        _load_state(ckpt)
