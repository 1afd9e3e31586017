"""HPA normalisation (reproduces the paper's published rows) and the human-alignment table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from reflade.eval.alignment import COLUMNS, human_alignment, pearson, spearman
from reflade.eval.hpa import HPABounds, HPANormalization

# rld-method.md, "Results on the RefLade test set": (HPA, FID, LPIPS, DIR) per train set.
PAPER = {
    "foreground": [
        (0.3852, 22.68, 0.1403, 0.2031),
        (0.4629, 10.98, 0.1411, 0.2543),
        (0.4685, 11.10, 0.1377, 0.2561),
        (0.4698, 10.60, 0.1378, 0.2531),
        (0.4813, 10.50, 0.1330, 0.2652),
    ],
    "background": [
        (0.3459, 21.84, 0.1588, 0.6385),
        (0.5932, 16.87, 0.0520, 0.7206),
        (0.5587, 17.35, 0.0730, 0.7190),
        (0.6657, 12.99, 0.0487, 0.7721),
        (0.6682, 13.14, 0.0437, 0.7673),
    ],
}


@pytest.mark.parametrize("kind,tol", [("background", 1e-3), ("foreground", 3e-3)])
def test_default_bounds_reproduce_the_papers_rows(kind, tol):
    norm = HPANormalization()
    errors = [norm.score(kind, fid=f, lpips=lp, dir=d) - hpa for hpa, f, lp, d in PAPER[kind]]
    assert max(abs(e) for e in errors) < tol, errors
    # the fit is in fact far inside rounding of the inputs
    assert max(abs(e) for e in errors) < 5e-4, errors


def test_default_bounds_ideal_ends_and_papers_ranking():
    norm = HPANormalization()
    for kind in ("foreground", "background"):
        b = norm.bounds(kind)
        assert (b.fid_min, b.lpips_min, b.dir_max) == (0.0, 0.0, 1.0)
        assert norm.score(kind, fid=0.0, lpips=0.0, dir=1.0) == pytest.approx(1.0)
        scores = [norm.score(kind, fid=f, lpips=lp, dir=d) for _, f, lp, d in PAPER[kind]]
        published = [row[0] for row in PAPER[kind]]
        assert np.argsort(scores).tolist() == np.argsort(published).tolist()


def test_formula_and_clipping():
    b = HPABounds(fid_min=10, fid_max=50, lpips_min=0.1, lpips_max=0.3, dir_min=0.0, dir_max=0.5)
    norm = HPANormalization(foreground=b, background=b)
    # parts: (50-30)/40 = 0.5, (0.3-0.15)/0.2 = 0.75, 0.25/0.5 = 0.5
    assert norm.parts("foreground", fid=30, lpips=0.15, dir=0.25) == pytest.approx(
        {"s_fid": 0.5, "s_vis": 0.75, "s_gen": 0.5}
    )
    assert norm.score("foreground", fid=30, lpips=0.15, dir=0.25) == pytest.approx(1.75 / 3)
    # worse than the worst bound: negative unclipped, 0 clipped
    assert norm.parts("background", fid=90, lpips=0.15, dir=0.25)["s_fid"] == pytest.approx(-1.0)
    clipped = HPANormalization(foreground=b, background=b, clip=True)
    assert clipped.parts("background", fid=90, lpips=0.05, dir=0.25) == pytest.approx(
        {"s_fid": 0.0, "s_vis": 1.0, "s_gen": 0.5}
    )
    assert math.isnan(norm.score("foreground", fid=math.nan, lpips=0.1, dir=0.2))


def test_to_dict_round_trip_and_errors():
    norm = HPANormalization(clip=True)
    data = json.loads(json.dumps(norm.to_dict()))
    assert HPANormalization.from_dict(data) == norm
    partial = HPANormalization.from_dict({"background": {"fid_max": 30}})
    assert partial.background.fid_max == 30.0 and partial.foreground == HPANormalization().foreground
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['middleground'\].*known: foreground"):
        HPANormalization.from_dict({"middleground": {}})
    with pytest.raises(ValueError, match=r"unknown bound\(s\) \['fid_top'\] for foreground"):
        HPANormalization.from_dict({"foreground": {"fid_top": 1}})
    with pytest.raises(ValueError, match="lpips_min=0.5 must be finite and below lpips_max=0.2"):
        HPANormalization.from_dict({"foreground": {"lpips_min": 0.5, "lpips_max": 0.2}})
    with pytest.raises(ValueError, match="not a number"):
        HPANormalization.from_dict({"foreground": {"fid_max": "big"}})
    with pytest.raises(ValueError, match="clip='yes' must be true or false"):
        HPANormalization.from_dict({"clip": "yes"})
    with pytest.raises(ValueError, match="unknown layer kind 'middle'"):
        norm.score("middle", fid=1, lpips=0.1, dir=0.1)


def test_correlation_helpers_match_scipy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=12), rng.normal(size=12)
    y[3] = y[5]  # a tie
    assert pearson(x, y) == pytest.approx(pearsonr(x, y).statistic)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert math.isnan(pearson(np.ones(4), np.arange(4.0)))


def test_human_alignment_known_answer():
    # ELO is a linear function of the background HPA's DIR part only; FID and LPIPS are constant except one model.
    b = HPANormalization().background
    models = {f"m{i}": {"fid": 20.0, "lpips": 0.1, "dir": 0.6 + 0.05 * i} for i in range(6)}
    elo = {f"m{i}": 1000.0 + 40 * i for i in range(6)} | {"unrated-extra": 1.0}
    table = human_alignment(models, elo, kind="background")
    assert table.pearson["S_gen"] == pytest.approx(1.0)
    assert table.spearman["S_gen"] == pytest.approx(1.0)
    # HPA and every pair holding gen are affine in DIR here: perfect too
    for col in ("HPA", "vis+gen", "fid+gen"):
        assert table.pearson[col] == pytest.approx(1.0) and table.spearman[col] == pytest.approx(1.0)
    for col in ("S_vis", "S_fid", "vis+fid"):  # constant columns: undefined
        assert math.isnan(table.pearson[col]) and math.isnan(table.spearman[col])
    assert set(table.pearson) == set(COLUMNS)
    assert table.to_dict()["pearson"]["S_vis"] is None
    assert "| Pearson | 1.00 |" in table.markdown()

    # a metric that ranks exactly backwards; FID ranks right but not linearly
    models = {
        f"m{i}": {"fid": [40.0, 30.0, 25.0, 24.0, 23.9, 5.0][i], "lpips": 0.05 + 0.02 * i, "dir": 0.7}
        for i in range(6)
    }
    table = human_alignment(models, elo, kind="background", normalization=HPANormalization())
    assert table.spearman["S_vis"] == pytest.approx(-1.0) and table.pearson["S_vis"] == pytest.approx(-1.0)
    assert table.spearman["S_fid"] == pytest.approx(1.0) and 0.5 < table.pearson["S_fid"] < 0.99
    s_fid = [(b.fid_max - m["fid"]) / (b.fid_max - b.fid_min) for m in models.values()]
    assert table.pearson["S_fid"] == pytest.approx(pearsonr(s_fid, list(elo.values())[:6]).statistic)


def test_human_alignment_errors():
    models = {"a": {"fid": 1, "lpips": 0.1, "dir": 0.5}, "b": {"fid": 2, "lpips": 0.1, "dir": 0.5}}
    with pytest.raises(ValueError, match=r"no ELO rating for \['b'\]"):
        human_alignment(models, {"a": 1000}, kind="foreground")
    with pytest.raises(ValueError, match="at least 3 models"):
        human_alignment(models, {"a": 1000, "b": 900}, kind="foreground")
    with pytest.raises(ValueError, match=r"lack \['dir'\]"):
        human_alignment(
            {k: {"fid": 1, "lpips": 0.1} for k in "abc"}, dict.fromkeys("abc", 1.0), kind="foreground"
        )
