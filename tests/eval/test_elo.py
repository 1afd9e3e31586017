"""ELO from pairwise votes (synthetic tournaments of known strengths), vote files, and HPA bounds fitted to ELO."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from reflade.eval.bounds_fit import fit_bounds
from reflade.eval.elo import (
    EloError,
    Vote,
    VoteError,
    elo_with_ci,
    fit_elo,
    parse_votes,
    read_votes,
    register_votes,
)
from reflade.eval.hpa import HPABounds, HPANormalization
from reflade.platform.errors import ReportedError

TRUE = {"m800": 800.0, "m900": 900.0, "m1000": 1000.0, "m1100": 1100.0, "m1200": 1200.0}


def tournament(true: dict[str, float], n: int, *, tie_rate: float = 0.2, seed: int = 0) -> list[Vote]:
    """Random pairs, outcomes drawn from Bradley-Terry on the Elo scale.

    Ties are drawn with probability ``tie_rate * 2 * min(p, 1 - p)`` and taken half from each side's win
    probability, so A's expected score stays ``p``: the true ratings are what the fit should recover.
    """
    rng = np.random.default_rng(seed)
    models = list(true)
    votes = []
    for k in range(n):
        ia, ib = rng.choice(len(models), size=2, replace=False)
        a, b = models[ia], models[ib]
        p = 1.0 / (1.0 + 10.0 ** ((true[b] - true[a]) / 400.0))
        tie = tie_rate * 2.0 * min(p, 1.0 - p)
        u = rng.random()
        winner = "tie" if u < tie else "a" if u < p + tie / 2 else "b"
        votes.append(Vote(item=f"img-{k}", prompt="text+box", model_a=a, model_b=b, winner=winner))
    return votes


@pytest.fixture(scope="module")
def votes() -> list[Vote]:
    return tournament(TRUE, 3000)


def test_fit_recovers_known_strengths(votes):
    assert any(v.winner == "tie" for v in votes)
    ratings = fit_elo(votes)
    assert sorted(ratings, key=ratings.get) == list(TRUE)  # true order, weakest first
    assert np.mean(list(ratings.values())) == pytest.approx(1000.0, abs=1e-6)
    for m, r in TRUE.items():
        assert ratings[m] == pytest.approx(r, abs=30), (m, ratings)
    # the Elo scale: rescaling changes distances from the mean in proportion, base moves the mean
    other = fit_elo(votes, base=1500.0, scale=200.0, prior=200.0)
    for m in TRUE:
        assert other[m] - 1500.0 == pytest.approx((ratings[m] - 1000.0) / 2, abs=1e-4)


def test_fit_is_independent_of_vote_order(votes):
    shuffled = list(votes)
    random.Random(1).shuffle(shuffled)
    a, b = fit_elo(votes), fit_elo(shuffled)
    assert a.keys() == b.keys()
    for m in a:
        assert a[m] == pytest.approx(b[m], abs=1e-6)


def test_maximum_likelihood_without_prior_is_close_to_the_weak_prior(votes):
    plain, weak = fit_elo(votes, prior=None), fit_elo(votes)
    for m in TRUE:
        assert plain[m] == pytest.approx(weak[m], abs=2.0)
        # the prior only pulls towards the mean
        assert abs(weak[m] - 1000.0) <= abs(plain[m] - 1000.0) + 1e-6


def test_bootstrap_intervals_cover_the_truth(votes):
    ci = elo_with_ci(votes, n_bootstrap=200, seed=0)
    point = fit_elo(votes)
    assert list(ci) == sorted(TRUE)
    covered = 0
    for m, r in ci.items():
        assert r.model == m
        assert r.rating == pytest.approx(point[m])
        assert r.low < r.rating < r.high
        assert 10 < r.high - r.low < 120  # about +-20 Elo with ~1200 votes per model
        covered += r.low <= TRUE[m] <= r.high
    assert covered >= 4, ci
    assert sum(r.n_votes for r in ci.values()) == 2 * len(votes)
    # reproducible with the seed; a lower confidence gives narrower intervals
    again = elo_with_ci(votes, n_bootstrap=200, seed=0)
    assert all(again[m] == ci[m] for m in ci)
    narrow = elo_with_ci(votes, n_bootstrap=200, confidence=0.5, seed=0)
    assert all(narrow[m].high - narrow[m].low < ci[m].high - ci[m].low for m in ci)


def test_a_model_that_always_wins_stays_finite():
    votes = tournament({"a": 1000.0, "b": 950.0, "c": 900.0}, 300, seed=2)
    champion = [Vote(f"x{k}", "box", "champ", m, "a") for k, m in enumerate(["a", "b", "c"] * 20)]
    ratings = fit_elo(votes + champion)
    assert all(math.isfinite(r) for r in ratings.values())
    assert ratings["champ"] > max(ratings[m] for m in "abc") + 200
    assert ratings["champ"] < 1000.0 + 2000.0
    with pytest.raises(VoteError, match=r"without a prior.*\{champ\}"):
        fit_elo(votes + champion, prior=None)


def test_ties_only_give_equal_ratings():
    votes = [
        Vote(f"i{k}", "box", a, b, "tie") for k, (a, b) in enumerate([("x", "y"), ("y", "z"), ("x", "z")] * 5)
    ]
    ratings = fit_elo(votes, base=1200.0)
    assert ratings == pytest.approx({"x": 1200.0, "y": 1200.0, "z": 1200.0}, abs=1e-6)
    assert fit_elo(votes, prior=None) == pytest.approx({"x": 1000.0, "y": 1000.0, "z": 1000.0}, abs=1e-6)


def test_disconnected_models_are_named():
    votes = [
        Vote("1", "box", "a", "b", "a"),
        Vote("2", "box", "b", "a", "tie"),
        Vote("3", "box", "c", "d", "b"),
    ]
    with pytest.raises(VoteError, match=r"\{a, b\}; \{c, d\}"):
        fit_elo(votes)
    with pytest.raises(VoteError, match="no votes"):
        fit_elo([])


# ---------------------------------------------------------------------------------------------------- parsing
def line(**overrides) -> str:
    vote = {"item": "img-1", "prompt": "text+box", "model_a": "ours", "model_b": "base", "winner": "a"}
    vote.update(overrides)
    return json.dumps({k: v for k, v in vote.items() if v is not None})


def test_parse_votes_accepts_names_and_keywords():
    lines = [
        line(),
        "",
        line(winner="b"),
        line(winner="tie"),
        line(winner="ours"),
        line(winner="base", extra=1),
    ]
    votes = parse_votes(lines, "votes.jsonl")
    assert [v.winner for v in votes] == ["a", "b", "tie", "a", "b"]
    assert votes[0] == Vote(item="img-1", prompt="text+box", model_a="ours", model_b="base", winner="a")
    assert [v.score_a for v in votes] == [1.0, 0.0, 0.5, 1.0, 0.0]
    # a model called "b" does not turn the keyword "b" into a win for A
    assert parse_votes([line(model_a="b", model_b="c", winner="b")], "x")[0].winner == "b"


@pytest.mark.parametrize(
    "bad, what",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (line(winner=None), "missing key.*winner"),
        (line(prompt=None, item=None), "missing key.*item, prompt"),
        (line(model_a=3), "model_a must be"),
        (line(winner="left"), "unknown winner 'left'"),
        (line(model_b="ours"), "model_a and model_b are both 'ours'"),
    ],
)
def test_parse_errors_name_source_and_line(bad, what):
    with pytest.raises(VoteError, match=rf"^votes\.jsonl line 3: .*{what}") as info:
        parse_votes([line(), "  ", bad, line()], "votes.jsonl")
    assert isinstance(info.value, ReportedError)


def test_read_votes_from_a_file_and_a_folder(tmp_path):
    (tmp_path / "one.jsonl").write_text(line() + "\n" + line(winner="tie") + "\n")
    (tmp_path / "two.jsonl").write_text(line(model_a="third") + "\n")
    (tmp_path / "notes.txt").write_text("not votes")
    assert len(read_votes(tmp_path / "one.jsonl")) == 2
    folder = read_votes(str(tmp_path))
    assert [v.model_a for v in folder] == ["ours", "ours", "third"]

    (tmp_path / "two.jsonl").write_text(line() + "\n" + line(winner="nobody") + "\n")
    with pytest.raises(VoteError, match=r"two\.jsonl line 2: unknown winner"):
        read_votes(tmp_path)
    with pytest.raises(VoteError, match="no such file"):
        read_votes(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VoteError, match=r"no \*\.jsonl files"):
        read_votes(empty)


def test_register_and_read_votes_from_the_registry(registry, votes):
    version = register_votes(registry, "demo", votes[:50])
    assert version.ref == "votes/demo@1"
    assert version.metadata["n_votes"] == 50
    assert version.metadata["models"] == sorted({m for v in votes[:50] for m in (v.model_a, v.model_b)})
    assert read_votes("votes/demo@latest", registry) == votes[:50]
    # the same votes again: the registry reuses the version
    assert register_votes(registry, "demo", votes[:50]).reused


# ---------------------------------------------------------------------------------------------------- bounds
TRUE_BOUNDS = HPANormalization(foreground=HPABounds(fid_max=20.0, lpips_max=0.5, dir_min=0.7))
"""Foreground ranges FID 20, LPIPS 0.5, DIR 0.3: far from the defaults (64.46, 0.2253, 0.9162)."""


def synthetic_models(n: int = 8, seed: int = 0) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Random foreground metrics; ELO a linear function of HPA under ``TRUE_BOUNDS``."""
    rng = np.random.default_rng(seed)
    metrics = {
        f"model-{k}": {
            "fid": rng.uniform(8, 30),
            "lpips": rng.uniform(0.05, 0.2),
            "dir": rng.uniform(0.15, 0.35),
        }
        for k in range(n)
    }
    elo = {m: 900.0 + 400.0 * TRUE_BOUNDS.score("foreground", **v) for m, v in metrics.items()}
    return metrics, elo


def test_fit_bounds_recovers_the_true_ranges():
    metrics, elo = synthetic_models()
    fit = fit_bounds(metrics, elo, "foreground")
    before, after = fit.before_table.pearson["HPA"], fit.after_table.pearson["HPA"]
    assert before < 0.9  # the default bounds weight the parts differently from the truth
    assert after >= before
    assert after == pytest.approx(1.0, abs=1e-6)
    assert fit.after_table.spearman["HPA"] == pytest.approx(1.0)
    b = fit.after.foreground
    # best ends stay ideal; only the ratios of the ranges are identified by a correlation
    assert (b.fid_min, b.lpips_min, b.dir_max) == (0.0, 0.0, 1.0)
    ranges = np.array([b.fid_max, b.lpips_max, 1.0 - b.dir_min])
    assert ranges / ranges[0] == pytest.approx(np.array([20.0, 0.5, 0.3]) / 20.0, rel=1e-3)
    # the overall scale is kept: geometric mean of the factors is 1
    factors = ranges / np.array([64.46, 0.2253, 0.9162])
    assert np.prod(factors) == pytest.approx(1.0, rel=1e-6)
    # the other kind is untouched; the report is JSON and the summary shows both correlations
    assert fit.after.background == fit.before.background
    data = json.loads(json.dumps(fit.to_dict()))
    assert data["after"]["normalization"]["foreground"]["fid_max"] == pytest.approx(b.fid_max)
    assert data["before"]["alignment"]["pearson"]["HPA"] == pytest.approx(before)
    text = fit.summary()
    assert f"{before:+.4f}" in text and "+1.0000" in text and f"{b.fid_max:.4g}" in text


def test_fit_bounds_stays_within_limits_and_never_gets_worse():
    metrics, _ = synthetic_models(seed=3)
    # a truth the limits cannot reach: ELO follows LPIPS only
    elo = {m: 1000.0 - 2000.0 * v["lpips"] for m, v in metrics.items()}
    fit = fit_bounds(metrics, elo, "foreground", limits=(0.5, 2.0))
    assert fit.after_table.pearson["HPA"] >= fit.before_table.pearson["HPA"] - 1e-12
    b = fit.after.foreground
    factors = np.array([b.fid_max, b.lpips_max, 1.0 - b.dir_min]) / np.array([64.46, 0.2253, 0.9162])
    assert np.all(factors >= 0.5 - 1e-9) and np.all(factors <= 2.0 + 1e-9)
    assert factors[1] < 1.0  # LPIPS weighted up (a smaller range)


def test_fit_bounds_errors():
    metrics, elo = synthetic_models(n=3)
    two = dict(list(metrics.items())[:2])
    with pytest.raises(EloError, match="at least 3 models"):
        fit_bounds(two, elo, "foreground")
    with pytest.raises(EloError, match="no ELO rating for"):
        fit_bounds(metrics, dict(list(elo.items())[:2]), "foreground")
    with pytest.raises(EloError, match="all equal"):
        fit_bounds(metrics, dict.fromkeys(metrics, 1000.0), "foreground")
    with pytest.raises(ValueError, match="unknown layer kind"):
        fit_bounds(metrics, elo, "middle")
