"""Kernel Video Distance (KVD), as MeBT and TATS report it beside FVD: KID's estimator on I3D features.

KVD is the unbiased estimate of MMD² between the real and generated feature sets under the cubic
polynomial kernel k(x, y) = (xᵀy / d + 1)³, averaged over random subsets of equal size. Unlike FVD
it assumes no Gaussian and is unbiased, so small sets compare fairly. torchmetrics supplies the
kernel and the estimator (`poly_mmd`); this module adds what video evaluation needs: the same I3D
features as FVD, features given directly, subsets drawn from a seeded generator (the same sets give
the same value on every run and rank), and the feature rows gathered from every rank.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.image.kid import poly_mmd
from torchmetrics.utilities import dim_zero_cat, rank_zero_warn

from maskvid.metrics.i3d import I3DFeatures


def _canonical(rows: Tensor) -> Tensor:
    """The rows in lexicographic order (first column first)."""
    order = np.lexsort(rows.numpy().T[::-1])
    return rows[torch.from_numpy(order)]


def kernel_distance(real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
                    degree: int = 3, gamma: Optional[float] = None, coef: float = 1.0) -> tuple[Tensor, Tensor]:
    """(mean, std) over `subsets` draws of the unbiased MMD² between `subset_size` rows of each set
    (fewer when a set is smaller), in float64."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected features [N, D] and [M, D], got {tuple(real.shape)} and {tuple(fake.shape)}")
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError(f"KVD needs at least 2 feature rows on each side, got {real.shape[0]} and {fake.shape[0]}")
    # Subsets are drawn from the rows in sorted order, so the value depends on the sets alone, not on
    # the order ranks or batches delivered them in.
    real, fake = _canonical(real.double().cpu()), _canonical(fake.double().cpu())
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        r = real[torch.randperm(real.shape[0], generator=generator)[:size]]
        f = fake[torch.randperm(fake.shape[0], generator=generator)[:size]]
        values.append(poly_mmd(r, f, degree=degree, gamma=gamma, coef=coef))
    scores = torch.stack(values)
    return scores.mean(), scores.std(unbiased=False)


class KernelVideoDistance(Metric):
    """KVD between the real and generated videos seen by `update` on every rank.

    `compute()` returns {"kvd", "kvd_std", "num_real", "num_fake"} (all ranks together); with fewer
    than 2 videos on a side, "kvd" is NaN. Papers report KVD like FVD, scaled by 1000 for print; this
    returns the unscaled value.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, features: I3DFeatures | None = None, num_features: Optional[int] = None,
                 real_features: Optional[Tensor] = None, subsets: int = 100, subset_size: int = 1000,
                 seed: int = 0, **kwargs: Any) -> None:
        """
        Args:
            features: The I3D feature extractor. None: `update` takes features [N, num_features].
            num_features: Feature size when there is no extractor.
            real_features: Cached real feature rows [N, D] (from `maskvid eval real-stats`) that
                replace real updates.
            subsets: Random subsets the estimate is averaged over.
            subset_size: Rows per subset and side (capped at the smaller set's size).
            seed: Seed of the subset draws.
        """
        super().__init__(**kwargs)
        self._features: list[I3DFeatures] = [features] if features is not None else []
        dim = features.num_features if features is not None else num_features
        if dim is None:
            raise ValueError("KernelVideoDistance needs a feature extractor or num_features")
        self.num_features = int(dim)
        if real_features is not None and (real_features.ndim != 2 or real_features.shape[1] != self.num_features):
            raise ValueError(f"cached real features must be [N, {self.num_features}], got {tuple(real_features.shape)}")
        self.fixed_real = real_features.double().cpu() if real_features is not None else None
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed
        self.add_state("real_rows", [], dist_reduce_fx="cat")
        self.add_state("fake_rows", [], dist_reduce_fx="cat")

    @property
    def uses_cached_real(self) -> bool:
        return self.fixed_real is not None

    def update(self, videos: Tensor, real: bool) -> None:
        """videos: float [B, C, T, H, W] in [-1, 1], or their features [B, num_features]."""
        if real and self.uses_cached_real:
            raise ValueError("real features come from the cached file; do not update with real videos")
        if videos.ndim != 2 and not self._features:
            raise ValueError("this KernelVideoDistance has no feature extractor; give `update` features [N, D]")
        features = videos if videos.ndim == 2 else self._features[0](videos)
        if features.shape[1] != self.num_features:
            raise ValueError(f"expected features [N, {self.num_features}], got {tuple(features.shape)}")
        (self.real_rows if real else self.fake_rows).append(features.detach().double())

    def _rows(self, side: str) -> Tensor:
        if side == "real" and self.fixed_real is not None:
            return self.fixed_real
        rows = getattr(self, f"{side}_rows")
        if isinstance(rows, Tensor):  # after the cross-rank sync, a list state is one concatenated tensor
            return rows
        return dim_zero_cat(rows) if rows else torch.zeros(0, self.num_features, dtype=torch.float64)

    def compute(self) -> dict[str, Tensor]:
        real, fake = self._rows("real"), self._rows("fake")
        if real.shape[0] < 2 or fake.shape[0] < 2:
            rank_zero_warn(f"KVD needs at least 2 videos on each side (got {real.shape[0]} real, "
                           f"{fake.shape[0]} fake): NaN")
            mean = std = torch.tensor(float("nan"), dtype=torch.float64)
        else:
            mean, std = kernel_distance(real, fake, self.subsets, self.subset_size, self.seed)
        return {"kvd": mean, "kvd_std": std, "num_real": torch.tensor(real.shape[0]),
                "num_fake": torch.tensor(fake.shape[0])}
