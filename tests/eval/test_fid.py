"""Fréchet distance against the closed form, compositing on B, S_vis with a stand-in LPIPS, S_gen."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from reflade.eval.features import (
    build_lpips,
    directional_similarity,
    layers_to_tensors,
    lpips_visible,
    masks_to_tensor,
)
from reflade.eval.fid import (
    FID_BACKGROUND,
    FeatureMoments,
    composite,
    composite_torch,
    fid_caveat,
    fid_from_moments,
    frechet_distance,
    frechet_distance_from_moments,
)


def test_frechet_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance_from_moments(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected)
    # from samples: the same within sampling error
    rng = np.random.default_rng(0)
    a = mu1 + rng.normal(size=(20000, 3)) * np.sqrt(s1)
    b = mu2 + rng.normal(size=(20000, 3)) * np.sqrt(s2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.03)


def test_frechet_identical_sets_and_singular_covariance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # fewer samples than dimensions: singular covariances, still a finite non-negative number
    few = rng.normal(size=(5, 32))
    d = frechet_distance(few, few + 0.1)
    assert np.isfinite(d) and d == pytest.approx(32 * 0.01, rel=0.05, abs=0.05)
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        frechet_distance(x[:1], x)
    with pytest.raises(ValueError, match="shapes disagree"):
        frechet_distance_from_moments(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_feature_moments_merge_like_one_set():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    m = FeatureMoments.of(x[:100]).merge(FeatureMoments.of(x[100:250])).merge(FeatureMoments.of(x[250:]))
    mu, cov = m.mean_cov()
    assert m.n == 300
    np.testing.assert_allclose(mu, x.mean(axis=0), atol=1e-10)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), atol=1e-9)
    with pytest.raises(ValueError, match="dimension 4, expected 6"):
        m.update(np.zeros((2, 4)))


def test_torchmetrics_fid_from_merged_moments_is_the_closed_form():
    """The product's FID (torchmetrics' FrechetInceptionDistance over moments merged from separate batches)."""
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    rng = np.random.default_rng(5)
    a = mu1 + rng.normal(size=(20000, 3)) * np.sqrt(s1)
    b = mu2 + rng.normal(size=(20000, 3)) * np.sqrt(s2)
    real = FeatureMoments.of(a[:7000]).merge(FeatureMoments.of(a[7000:]))
    fake = FeatureMoments.of(b[:123]).merge(FeatureMoments.of(b[123:]))
    got = fid_from_moments(real, fake)
    assert got == pytest.approx(frechet_distance(a, b), rel=1e-6)
    assert got == pytest.approx(expected, rel=0.03)
    assert fid_from_moments(real, real) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid_from_moments(FeatureMoments.of(a[:1]), fake)
    with pytest.raises(ValueError, match="dimensions differ"):
        fid_from_moments(FeatureMoments.of(np.zeros((3, 2))), fake)


def test_composite_on_background():
    assert FID_BACKGROUND == (128, 128, 128)
    lay = np.zeros((2, 2, 4), np.uint8)
    lay[0, 0] = (255, 0, 0, 255)
    lay[0, 1] = (255, 0, 0, 51)  # alpha 0.2
    out = composite(lay)
    assert out[0, 0].tolist() == [255, 0, 0] and out[1, 1].tolist() == [128, 128, 128]
    assert out[0, 1].tolist() == [round(255 * 0.2 + 128 * 0.8), round(128 * 0.8), round(128 * 0.8)]
    rgb, alpha = layers_to_tensors([lay])
    np.testing.assert_allclose(composite_torch(rgb, alpha)[0].permute(1, 2, 0).numpy() * 255, out, atol=0.51)
    assert "200 samples" in fid_caveat(200)


@pytest.fixture(scope="module")
def stand_in_lpips():
    """LPIPS-alex with a RANDOM backbone (pnet_rand) and the package's shipped linear heads: a stand-in, not
    comparable with published LPIPS; nothing is downloaded."""
    torch.manual_seed(0)
    return build_lpips("alex")


def test_lpips_stand_in_zero_when_identical_and_rising_with_noise(stand_in_lpips):
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 3, 64, 64, generator=g)
    vis = torch.zeros(2, 1, 64, 64)
    vis[:, :, 8:56, 8:56] = 1
    # outside the visible region anything goes
    pred = gt.clone()
    pred[:, :, :4] = torch.rand(2, 3, 4, 64, generator=g)
    assert lpips_visible(pred, gt, vis, stand_in_lpips).abs().max() < 1e-6
    d = [
        lpips_visible((gt + s * torch.randn(gt.shape, generator=g)).clamp(0, 1), gt, vis, stand_in_lpips)
        for s in (0.02, 0.1, 0.4)
    ]
    assert all(x.shape == (2,) for x in d)
    assert (d[0] > 0).all() and (d[0] < d[1]).all() and (d[1] < d[2]).all()


def test_build_lpips_loads_a_torchvision_backbone():
    torch.manual_seed(3)
    alex = torchvision.models.alexnet(weights=None)
    model = build_lpips("alex", backbone_state=alex.state_dict())  # classifier.* ignored
    # lpips keeps torchvision's indices inside its slices: features.10 is slice5's module "10"
    assert torch.equal(getattr(model.net.slice5, "10").weight, alex.features[10].weight)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="lacks"):
        build_lpips("alex", backbone_state={"features.0.weight": alex.features[0].weight})


def projection_features(dim: int = 16) -> callable:
    """A fixed random linear projection of the flattened image: a deterministic stand-in feature network."""
    w = torch.randn(3 * 16 * 16, dim, generator=torch.Generator().manual_seed(7))
    return lambda x: x.flatten(1) @ w


def test_directional_similarity():
    f = projection_features()
    g = torch.Generator().manual_seed(1)
    gt = torch.rand(3, 3, 16, 16, generator=g)
    vis = torch.zeros(3, 1, 16, 16)
    vis[:, :, :, :8] = 1  # left half visible, right half to complete
    visible_only = gt * vis
    assert directional_similarity(gt, gt, vis, f) == pytest.approx(torch.ones(3), abs=1e-5)
    # half-way there: same direction, cosine still 1
    halfway = visible_only + 0.5 * (gt - visible_only)
    assert directional_similarity(halfway, gt, vis, f) == pytest.approx(torch.ones(3), abs=1e-5)
    # moving the other way (removing what the ground truth adds) is negative: -1 for a linear f
    away = visible_only - (gt - visible_only)
    assert (directional_similarity(away, gt, vis, f) < -0.99).all()
    # adding nothing: no direction, 0
    assert directional_similarity(visible_only, gt, vis, f).abs().max() < 1e-6
    with pytest.raises(ValueError, match=r"visible mask \(3, 1, 8, 8\) must be \(3, 1, 16, 16\)"):
        directional_similarity(gt, gt, vis[:, :, :8, :8], f)
    with pytest.raises(ValueError, match="feature_fn returned"):
        directional_similarity(gt, gt, vis, lambda x: x)


def test_tensor_conversion_from_the_sample_format():
    lay = np.zeros((4, 5, 4), np.uint8)
    lay[1, 2] = (255, 0, 51, 255)
    rgb, alpha = layers_to_tensors([lay, lay])
    assert rgb.shape == (2, 3, 4, 5) and alpha.shape == (2, 1, 4, 5)
    assert rgb[0, :, 1, 2].tolist() == pytest.approx([1.0, 0.0, 0.2]) and alpha.sum() == 2
    m = masks_to_tensor([np.full((4, 5), 255, np.uint8), np.zeros((4, 5), bool)])
    assert m.shape == (2, 1, 4, 5) and m.sum() == 20
    with pytest.raises(ValueError, match="one shape"):
        layers_to_tensors([lay, lay[:2]])
