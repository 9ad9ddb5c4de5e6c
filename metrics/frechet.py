"""The Fréchet distance between two Gaussians, in float64, and the Gaussian fitted to feature sums.

    d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½)

Tr (S1 S2)^½ is computed as Tr (A S2 A)^½ with A = S1^½: A S2 A is symmetric positive
semi-definite, so both square roots come from `eigh` and are real. The common route, the
eigenvalues of the non-symmetric S1 S2 (torchmetrics' FID) or scipy's `sqrtm` of it, picks up
complex parts and small negative eigenvalues from rounding, which then have to be discarded by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GaussianStats:
    """Mean and (unbiased) covariance of `count` feature vectors, float64."""

    mean: Tensor  # [D]
    cov: Tensor  # [D, D]
    count: int

    @classmethod
    def from_sums(cls, total: Tensor, outer: Tensor, count: int) -> "GaussianStats":
        """From sum_i x_i and sum_i x_i x_iᵀ, which is what ranks can add up exactly."""
        if count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {count}")
        total, outer = total.double(), outer.double()
        mean = total / count
        cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
        return cls(mean, (cov + cov.T) / 2, count)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    # Rounding leaves eigenvalues of a singular covariance slightly below zero.
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), float64."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (*mu1.shape, *mu1.shape):
        raise ValueError(f"mismatched statistics: means {tuple(mu1.shape)}, {tuple(mu2.shape)}; "
                         f"covariances {tuple(sigma1.shape)}, {tuple(sigma2.shape)}")
    root = _psd_sqrt(sigma1)
    middle = root @ sigma2 @ root
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross


def stats_distance(a: GaussianStats, b: GaussianStats) -> Tensor:
    # Cached statistics live on the CPU, accumulated ones wherever the metric is.
    device = a.mean.device
    return frechet_distance(a.mean, a.cov, b.mean.to(device), b.cov.to(device))
