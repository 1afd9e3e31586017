"""The training recipe's parts: the default phase trains the alpha decoder (the mismatch the overfit test found), the
learning-rate schedules, the timestep samplings, the alpha loss's sub-batch, train_plain's evaluation callback (EMA
weights in, trained weights back), and the demo's recipe reaching `reflade train` as flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import typer

from reflade.engine.config import EngineConfig
from reflade.engine.pipeline import synthetic_rows
from reflade.engine.synth import make_scene
from reflade.train.config import TrainSettings
from reflade.train.demo import DEMO_RECIPE, recipe_flags
from reflade.train.latents import LATENT_COLUMNS, encode_latents
from reflade.train.losses import sample_sigmas
from reflade.train.model import build_reflayer
from reflade.train.plain_loop import train_plain
from reflade.train.preprocess import preprocess_row
from reflade.train.step import PhaseLoss, _alpha_subset, lr_at, step_generator
from reflade.train.text import MiniLMTextEncoder, minilm_folder

R = 64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle_and_batch(tiny_vae):
    rows = synthetic_rows(make_scene(5, size=(R, R), n_objects=(2, 2)), "s5", "test", "train", EngineConfig())
    bundle = build_reflayer("tiny", vae=tiny_vae(), text=MiniLMTextEncoder(minilm_folder()), seed=3)
    samples = [preprocess_row(r, R) for r in rows[:4]]
    batch = {k: np.stack([s[k] for s in samples]) for k in ("image", "layer", "canvas")}
    batch.update(text=np.array([s["text"] for s in samples]), kind=np.array([s["kind"] for s in samples]))
    return bundle, encode_latents(bundle, batch)


def _alpha_state(bundle) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bundle.model.alpha_decoder.state_dict().items()}


def test_default_settings_train_the_alpha_decoder(bundle_and_batch):
    """Regression: the default phase was ``transformer``, so `reflade train` (and the demo) registered a model whose
    alpha decoder was never trained, and every decomposition's alpha was the untrained decoder's."""
    bundle, cached = bundle_and_batch
    assert TrainSettings().phase == "both"
    before = _alpha_state(bundle)
    train_plain(bundle, [cached], TrainSettings(steps=1, batch_size=4, lr=1e-3, warmup_steps=0))
    after = _alpha_state(bundle)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the alpha decoder did not train"


def test_lr_schedules():
    const = TrainSettings(steps=100, lr=1.0, warmup_steps=10)
    cos = TrainSettings(steps=100, lr=1.0, warmup_steps=10, lr_schedule="cosine")
    assert [lr_at(s, const) for s in (0, 9, 10, 99)] == [0.1, 1.0, 1.0, 1.0]
    lrs = [lr_at(s, cos) for s in range(100)]
    assert lrs[:10] == [lr_at(s, const) for s in range(10)] and lrs[10] == pytest.approx(1.0)
    assert lrs[99] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[10 + 89 // 2] == pytest.approx(0.55, abs=0.01)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainSettings(lr_schedule="linear")


def test_timestep_samplings(bundle_and_batch):
    bundle, _ = bundle_and_batch
    g = torch.Generator().manual_seed(0)
    uniform = sample_sigmas(bundle, 20000, g, "uniform")
    logit = sample_sigmas(bundle, 20000, g, "logit-normal")
    assert 0.0 <= float(uniform.min()) and float(uniform.max()) < 1.0
    # uniform: 10% of the draws below 0.1; logit-normal (sigmoid of N(0, 1)): 1.4%
    assert float((uniform < 0.1).float().mean()) == pytest.approx(0.1, abs=0.01)
    assert float((logit < 0.1).float().mean()) == pytest.approx(0.014, abs=0.005)
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        sample_sigmas(bundle, 2, g, "beta")
    with pytest.raises(ValueError, match="timestep_sampling"):
        TrainSettings(timestep_sampling="beta")


def test_alpha_loss_reads_a_random_sub_batch(bundle_and_batch):
    bundle, cached = bundle_and_batch
    latents = {key: torch.as_tensor(cached[col]) for col, key in LATENT_COLUMNS.items()}
    assert _alpha_subset(latents, 0, None) is latents and _alpha_subset(latents, 4, None) is latents
    picks = set()
    for seed in range(8):
        sub = _alpha_subset(latents, 2, torch.Generator().manual_seed(seed))
        assert set(sub) == {"target", "alpha"} and sub["target"].shape[0] == 2
        rows = [int(torch.nonzero((latents["target"] == t).flatten(1).all(1))[0]) for t in sub["target"]]
        assert len(set(rows)) == 2 and torch.equal(sub["alpha"], latents["alpha"][rows])
        picks.update(rows)
    assert len(picks) == 4, "the sub-batch is not drawn at random"
    # the same step's flow-matching draws do not move: the sub-batch is drawn after them
    full = TrainSettings(steps=1, batch_size=4, phase="transformer")
    both = TrainSettings(steps=1, batch_size=4, phase="both", alpha_samples=2)
    with torch.no_grad():
        a = PhaseLoss(bundle, full)(latents, step_generator(full, 0, 0))
        b = PhaseLoss(bundle, both)(latents, step_generator(both, 0, 0))
    assert float(b) > float(a)
    with pytest.raises(ValueError, match="alpha_samples"):
        TrainSettings(alpha_samples=-1)


def test_train_plain_evaluates_with_the_ema_weights(bundle_and_batch, monkeypatch):
    from reflade.train import plain_loop

    bundle, cached = bundle_and_batch
    settings = TrainSettings(steps=5, batch_size=4, lr=1e-2, warmup_steps=0, ema_decay=0.5)
    seen = []

    def evaluate(step: int, seconds: float):
        seen.append((step, seconds, bundle.model.compress.weight.detach().clone(), bundle.model.training))
        return step * 10

    trained: dict[int, torch.Tensor] = {}
    original = plain_loop.train_step

    def spy(*args, **kw):  # the trained (not EMA) weights right after each step
        loss = original(*args, **kw)
        trained[args[4]] = bundle.model.compress.weight.detach().clone()
        return loss

    monkeypatch.setattr(plain_loop, "train_step", spy)
    out = train_plain(bundle, [cached], settings, evaluate=evaluate, evaluate_every=2)
    assert [s for s, *_ in seen] == [0, 2, 4, 5] and out["evaluations"] == [0, 20, 40, 50]
    assert all(not training for *_, training in seen) and bundle.model.training
    assert all(b >= a for (_, a, *_), (_, b, *_) in zip(seen, seen[1:], strict=False))
    assert out["evaluate_s"] > 0 and out["wall_s"] > 0
    # after 2 steps the evaluation saw the EMA weights, not the trained ones, and training went on from the trained
    # ones (step 3 started from them: its weights differ from an EMA restart)
    assert not torch.equal(seen[1][2], trained[1])
    # the weights left at the end (the ones registered) are the EMA ones, as evaluated after the last step
    assert torch.equal(bundle.model.compress.weight, seen[-1][2]) and not torch.equal(seen[-1][2], trained[4])


def test_demo_recipe_reaches_reflade_train():
    from reflade.train.cli import app

    settings = TrainSettings(**DEMO_RECIPE)  # every key is a setting, and valid
    command = typer.main.get_command(app)
    ctx = command.make_context("train", ["--dataset", "dataset/x", *recipe_flags(DEMO_RECIPE)])
    for key, value in DEMO_RECIPE.items():
        assert ctx.params[key] == value == getattr(settings, key), key
