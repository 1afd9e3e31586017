"""S_fid: the Fréchet distance between feature sets of predicted and ground-truth layers composited on one background.

Both layer sets are composited on the same fixed background ``B`` before any feature network sees them
(rld-method.md: the paper does not say which ``B``). The platform uses mid-grey, ``FID_BACKGROUND`` = (128, 128,
128): neither black nor white, so a layer's dark or light edges and a missing alpha both show against it. Every
report records it.

Features come from any network (Inception-v3 pool features for real FID, a stand-in in tests); this module only
needs the vectors. :class:`FeatureMoments` accumulates sums so that batches computed apart (Ray Data actors) merge
exactly into one mean and covariance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

FID_BACKGROUND: tuple[int, int, int] = (128, 128, 128)
"""The background B (RGB, 0-255) both layer sets are composited on for FID."""


def fid_caveat(n: int) -> str:
    """The sample-size caveat every report states next to an FID computed from ``n`` samples per set."""
    return (
        f"FID from {n} samples per set: FID is biased upwards at small sample sizes and its value depends on n "
        "(published FIDs use thousands of samples); compare FIDs only at the same n, on the same rows, with the "
        "same feature network."
    )


def composite(layer: np.ndarray, background: tuple[int, int, int] = FID_BACKGROUND) -> np.ndarray:
    """Composite an HxWx4 uint8 straight-alpha layer over a constant colour: ``rgb * a + B * (1 - a)``.

    Returns:
        HxWx3 uint8 RGB.
    """
    if layer.ndim != 3 or layer.shape[2] != 4 or layer.dtype != np.uint8:
        raise ValueError(f"composite: expected an HxWx4 uint8 RGBA layer, got {layer.dtype} {layer.shape}")
    a = layer[..., 3:].astype(np.float32) / 255.0
    bg = np.asarray(background, dtype=np.float32).reshape(1, 1, 3)
    out = layer[..., :3].astype(np.float32) * a + bg * (1.0 - a)
    return np.rint(out).astype(np.uint8)


def composite_torch(
    rgb: torch.Tensor, alpha: torch.Tensor, background: tuple[int, int, int] = FID_BACKGROUND
) -> torch.Tensor:
    """Batched :func:`composite`: ``rgb`` Bx3xHxW and ``alpha`` Bx1xHxW floats in [0, 1] -> Bx3xHxW in [0, 1]."""
    if rgb.ndim != 4 or rgb.shape[1] != 3 or alpha.shape != (rgb.shape[0], 1, *rgb.shape[2:]):
        raise ValueError(
            f"composite_torch: rgb {tuple(rgb.shape)} must be Bx3xHxW and alpha {tuple(alpha.shape)} Bx1xHxW"
        )
    bg = torch.tensor(background, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1) / 255.0
    return rgb * alpha + bg * (1.0 - alpha)


@dataclass
class FeatureMoments:
    """Running count, sum and sum of outer products of D-dimensional features (float64); mergeable."""

    n: int
    """Number of feature vectors seen."""
    total: np.ndarray
    """Sum of the vectors, shape D."""
    outer: np.ndarray
    """Sum of their outer products, shape DxD."""

    @classmethod
    def empty(cls, dim: int) -> FeatureMoments:
        """No vectors yet, dimension ``dim``."""
        return cls(n=0, total=np.zeros(dim), outer=np.zeros((dim, dim)))

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureMoments:
        """Moments of an NxD array."""
        m = cls.empty(_as_features(features, "features").shape[1])
        m.update(features)
        return m

    def update(self, features: np.ndarray) -> None:
        """Add an NxD batch (N may be 0)."""
        f = _as_features(features, "features")
        if f.shape[1] != self.total.shape[0]:
            raise ValueError(
                f"FeatureMoments: batch of dimension {f.shape[1]}, expected {self.total.shape[0]}"
            )
        self.n += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def merge(self, other: FeatureMoments) -> FeatureMoments:
        """The moments of both sets together (neither is changed)."""
        if other.total.shape != self.total.shape:
            raise ValueError(
                f"FeatureMoments: cannot merge dimension {other.total.shape[0]} into {self.total.shape[0]}"
            )
        return FeatureMoments(
            n=self.n + other.n, total=self.total + other.total, outer=self.outer + other.outer
        )

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D) and unbiased covariance (DxD, ``ddof=1``, as ``np.cov``); needs at least 2 vectors."""
        if self.n < 2:
            raise ValueError(f"FeatureMoments: a covariance needs at least 2 feature vectors, have {self.n}")
        mu = self.total / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (cov + cov.T) / 2.0


def _as_features(features: np.ndarray, name: str) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name}: expected an NxD array of feature vectors, got shape {f.shape}")
    return f


def frechet_distance_from_moments(
    mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, eps: float = 1e-6
) -> float:
    """``||mu1 - mu2||^2 + Tr(C1 + C2 - 2 sqrt(C1 C2))`` between two Gaussians.

    The matrix square root is scipy's ``sqrtm``. Where it is not finite (a near-singular product, e.g. fewer
    samples than dimensions), ``eps`` is added to both diagonals and it is taken again; a complex result whose
    imaginary diagonal exceeds 1e-3 raises, a smaller one is numerical noise and dropped (the usual FID handling,
    as in pytorch-fid and torchmetrics).

    Raises:
        ValueError: shapes disagree, or the square root has a significant imaginary part.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    d = mu1.shape[0]
    if mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: shapes disagree: mu1 {mu1.shape}, mu2 {mu2.shape}, cov1 {cov1.shape}, cov2 {cov2.shape}"
        )
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ValueError(
                f"frechet_distance: the covariance square root has an imaginary component {imag:.3g}"
            )
        covmean = covmean.real
    fd = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)  # a distance: tiny negatives are round-off of identical sets


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, eps: float = 1e-6) -> float:
    """FID between two sets of feature vectors, NxD and MxD (N, M >= 2; same D), e.g. Inception pool features of the
    composited predictions and ground truths. See :func:`frechet_distance_from_moments`."""
    a, b = FeatureMoments.of(features_a), FeatureMoments.of(features_b)
    return frechet_distance_from_moments(*a.mean_cov(), *b.mean_cov(), eps=eps)


def fid_from_moments(real: FeatureMoments, fake: FeatureMoments) -> float:
    """FID between two accumulated feature sets through torchmetrics' ``FrechetInceptionDistance``.

    The evaluation extracts features in Ray Data actors (with the Inception network loaded from the registry) and
    merges their sums here; torchmetrics keeps exactly these sums as its state (``*_features_sum``,
    ``*_features_cov_sum``, ``*_features_num_samples``), so they are set and its own ``compute`` does the
    distance. :func:`frechet_distance_from_moments` is the same formula in SciPy (the tests compare the two).

    Raises:
        ValueError: fewer than 2 vectors in a set, or dimensions that differ.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    dim = real.total.shape[0]
    if fake.total.shape[0] != dim:
        raise ValueError(f"fid_from_moments: dimensions differ ({dim} and {fake.total.shape[0]})")
    if real.n < 2 or fake.n < 2:
        raise ValueError(
            f"fid_from_moments: FID needs at least 2 samples per set, have {real.n} and {fake.n}"
        )

    class _Features(torch.nn.Module):
        """A feature 'network' over vectors already extracted (torchmetrics reads ``num_features``)."""

        num_features = dim

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    metric = FrechetInceptionDistance(feature=_Features(), reset_real_features=True)
    for prefix, m in (("real", real), ("fake", fake)):
        setattr(metric, f"{prefix}_features_sum", torch.from_numpy(m.total.astype(np.float64)))
        setattr(metric, f"{prefix}_features_cov_sum", torch.from_numpy(m.outer.astype(np.float64)))
        setattr(metric, f"{prefix}_features_num_samples", torch.tensor(int(m.n)))
    metric.orig_dtype = torch.float64
    # torchmetrics warns that compute() runs before update(); the state was set directly, on purpose.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return max(float(metric.compute()), 0.0)
