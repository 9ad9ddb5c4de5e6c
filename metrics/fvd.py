"""Fréchet Video Distance as a torchmetrics Metric, correct across ranks, with cached real statistics.

Each rank adds up, in float64, the count, sum and sum of outer products of its videos' I3D
features; torchmetrics sums those over ranks before `compute`, so N ranks holding N parts of a
set give the FVD of the whole set (up to float64 rounding of the sums). Means and covariances are
formed only after the sum, which a per-rank mean/covariance average would get wrong.

Real-video statistics can be computed once (`maskvid eval real-stats`) and cached to a file;
`real_stats=` then takes the place of real updates. The file records which I3D made it, and a
different one is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from maskvid.metrics.frechet import GaussianStats, stats_distance
from maskvid.metrics.i3d import I3DFeatures, load_i3d

STATS_FORMAT = "maskvid-fvd-stats/1"


class FVDStatsError(ValueError):
    """A cached statistics file that is missing, unreadable or made with other features."""


def save_stats(path: str | Path, stats: GaussianStats, features: dict[str, Any], source: str = "",
               rows: Optional[Tensor] = None) -> Path:
    """Write real-video statistics; `features` is `I3DFeatures.info()` of the network used (plus how
    clips were cut); `rows`, the feature vectors themselves, lets KVD use the file too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": STATS_FORMAT, "count": stats.count, "mean": stats.mean.cpu(), "cov": stats.cov.cpu(),
               "features": features, "source": source}
    if rows is not None:
        payload["rows"] = rows.double().cpu()
    torch.save(payload, path)
    return path


def load_stats(path: str | Path, features: Optional[dict[str, Any]] = None) -> GaussianStats:
    """Read cached statistics, checking they come from the same feature network and clip length."""
    return load_cached(path, features)[0]


def load_cached(path: str | Path, features: Optional[dict[str, Any]] = None) -> tuple[GaussianStats, Optional[Tensor]]:
    """(statistics, feature rows or None for files written without them), checked as `load_stats`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FVDStatsError(f"FVD statistics file not found: {path} (make one with `maskvid eval real-stats`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise FVDStatsError(f"cannot read FVD statistics {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != STATS_FORMAT:
        raise FVDStatsError(f"{path} is not an FVD statistics file (from `maskvid eval real-stats`)")
    if features is not None:
        saved = payload.get("features", {})
        for key in ("fingerprint", "num_features", "num_frames", "resolution", "window_stride", "max_frames"):
            if saved.get(key) != features.get(key):
                raise FVDStatsError(f"{path} was computed with other features ({key} {saved.get(key)!r}, "
                                    f"these features have {features.get(key)!r}): recompute it with this network and clip cutting")
    rows = payload.get("rows")
    return (GaussianStats(payload["mean"].double(), payload["cov"].double(), int(payload["count"])),
            rows.double() if rows is not None else None)


class FrechetVideoDistance(Metric):
    """FVD between the real and generated videos seen by `update` on every rank.

    `compute()` returns {"fvd", "num_real", "num_fake"} (all ranks together); FVD_N in papers
    names N, the number of generated videos. With fewer than 2 videos on a side it is NaN.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, features: I3DFeatures | str | None = None, real_stats: str | None = None,
                 num_features: Optional[int] = None, **kwargs: Any) -> None:
        """
        Args:
            features: The I3D feature extractor, or a path for `load_i3d`. None: only features
                can be given to `update` (then give num_features).
            real_stats: A file from `maskvid eval real-stats` that replaces real updates.
            num_features: Feature size when there is no extractor.
        """
        super().__init__(**kwargs)
        if isinstance(features, (str, Path)):
            features = load_i3d(features)
        # A list hides the network from nn.Module: no state_dict keys, no sharding, no .to().
        self._features: list[I3DFeatures] = [features] if features is not None else []
        dim = features.num_features if features is not None else num_features
        if dim is None:
            raise ValueError("FrechetVideoDistance needs a feature extractor or num_features")
        self.num_features = int(dim)
        self.fixed_real: Optional[GaussianStats] = None
        if real_stats:
            self.fixed_real = load_stats(real_stats, features.info() if features is not None else None)
            if self.fixed_real.mean.shape != (self.num_features,):
                raise FVDStatsError(f"{real_stats} holds {self.fixed_real.mean.shape[0]}-d statistics, "
                                    f"the features are {self.num_features}-d")
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @property
    def extractor(self) -> I3DFeatures:
        if not self._features:
            raise ValueError("this FrechetVideoDistance has no feature extractor; give `update` features [N, num_features]")
        return self._features[0]

    @property
    def uses_cached_real(self) -> bool:
        return self.fixed_real is not None

    def update(self, videos: Tensor, real: bool) -> None:
        """videos: float [B, C, T, H, W] in [-1, 1], or their features [B, num_features]."""
        if real and self.uses_cached_real:
            raise ValueError("real statistics come from the cached file; do not update with real videos")
        features = videos if videos.ndim == 2 else self.extractor(videos)
        if features.shape[1] != self.num_features:
            raise ValueError(f"expected features [N, {self.num_features}], got {tuple(features.shape)}")
        x = features.to(device=self.real_sum.device, dtype=torch.float64)
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + x.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + x.T @ x)
        setattr(self, f"{side}_count", getattr(self, f"{side}_count") + x.shape[0])

    def _stats(self, side: str) -> Optional[GaussianStats]:
        if side == "real" and self.fixed_real is not None:
            return self.fixed_real
        count = int(getattr(self, f"{side}_count"))
        if count < 2:
            return None
        return GaussianStats.from_sums(getattr(self, f"{side}_sum"), getattr(self, f"{side}_outer"), count)

    def compute(self) -> dict[str, Tensor]:
        real, fake = self._stats("real"), self._stats("fake")
        num_real = real.count if real is not None else int(self.real_count)
        num_fake = fake.count if fake is not None else int(self.fake_count)
        if real is None or fake is None:
            rank_zero_warn(f"FVD needs at least 2 videos on each side (got {num_real} real, {num_fake} fake): NaN")
            value = torch.tensor(float("nan"), dtype=torch.float64)
        else:
            value = stats_distance(real, fake)
        return {"fvd": value, "num_real": torch.tensor(num_real), "num_fake": torch.tensor(num_fake)}
