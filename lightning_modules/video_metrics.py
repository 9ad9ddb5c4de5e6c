"""The video-quality metrics both stages log in validation: FVD, KVD, CLIPSIM and caption accuracy.

Each is built only when configured (an I3D file, a CLIP directory, synthetic prompts). Their
frozen networks live inside the metrics but outside the module tree, so a LightningModule holding
this bundle checkpoints, shards and optimises none of them. `compute` is collective (torchmetrics
syncs over ranks): every rank must call it, and it returns the same values everywhere.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from torch import Tensor, nn

from maskvid.metrics.caption_accuracy import KEYS as CAPTION_KEYS
from maskvid.metrics.caption_accuracy import CaptionAccuracy
from maskvid.metrics.clipsim import CLIPSimilarity
from maskvid.metrics.fvd import FrechetVideoDistance, load_cached
from maskvid.metrics.i3d import load_i3d
from maskvid.metrics.kvd import KernelVideoDistance


class VideoEvalMetrics(nn.Module):
    """FVD and KVD (real vs generated), CLIPSIM (generated vs prompts), caption accuracy (oracle).

    KVD rides on FVD's I3D features; with cached real statistics it needs the file's feature rows
    (written by `maskvid eval real-stats`), and is left out for older files without them."""

    def __init__(self, i3d_path: Optional[str] = None, fvd_real_stats: Optional[str] = None,
                 clip_path: Optional[str] = None, caption_accuracy: Optional[bool] = False,
                 fvd_name: str = "fvd") -> None:
        super().__init__()
        if fvd_real_stats and not i3d_path:
            raise ValueError("fvd_real_stats needs i3d_path: the generated videos' features come from that I3D")
        self.fvd_name = fvd_name
        self.fvd = FrechetVideoDistance(load_i3d(i3d_path), real_stats=fvd_real_stats) if i3d_path else None
        self.kvd = None
        if self.fvd is not None:
            rows = load_cached(fvd_real_stats)[1] if fvd_real_stats else None
            if rows is not None or not fvd_real_stats:
                self.kvd = KernelVideoDistance(num_features=self.fvd.num_features, real_features=rows)
        self.clipsim = CLIPSimilarity(clip_path) if clip_path else None
        self.caption_mode = caption_accuracy  # None: only when every prompt is a synthetic one
        self.caption = CaptionAccuracy() if caption_accuracy is not False else None

    @property
    def wants_real(self) -> bool:
        """Whether real clips must be fed (FVD without cached real statistics)."""
        return self.fvd is not None and not self.fvd.uses_cached_real

    def update_real(self, videos: Tensor) -> None:
        if self.wants_real:
            features = self.fvd.extractor(videos)  # once, for both distances
            self.fvd.update(features, real=True)
            if self.kvd is not None:
                self.kvd.update(features, real=True)

    def update_generated(self, videos: Tensor, prompts: Optional[Sequence[str]] = None,
                         attrs: Optional[Sequence[Optional[Mapping[str, Any]]]] = None) -> None:
        if self.fvd is not None:
            features = self.fvd.extractor(videos)
            self.fvd.update(features, real=False)
            if self.kvd is not None:
                self.kvd.update(features, real=False)
        if self.clipsim is not None and prompts is not None:
            self.clipsim.update(videos, prompts)
        if self.caption is not None and attrs is not None:
            self.caption.update(videos, attrs)

    def compute(self, prefix: str = "val/") -> dict[str, float]:
        """Loggable values, identical on every rank; metrics without enough data are left out."""
        logs: dict[str, float] = {}
        if self.fvd is not None:
            out = self.fvd.compute()
            if math.isfinite(float(out["fvd"])):
                # FVD depends strongly on the number of videos, so the name carries it.
                logs[f"{prefix}{self.fvd_name}_{int(out['num_fake'])}"] = float(out["fvd"])
        if self.kvd is not None:
            out = self.kvd.compute()
            if math.isfinite(float(out["kvd"])):
                logs[f"{prefix}{self.fvd_name.replace('fvd', 'kvd')}_{int(out['num_fake'])}"] = float(out["kvd"])
        if self.clipsim is not None:
            value = float(self.clipsim.compute())
            if math.isfinite(value):
                logs[f"{prefix}clipsim"] = value
        if self.caption is not None:
            out = self.caption.compute()
            auto_ok = self.caption_mode is not None or int(out["unscored"]) == 0
            if int(out["count"]) > 0 and auto_ok:
                logs.update({f"{prefix}caption_acc/{k}": float(out[k]) for k in CAPTION_KEYS})
        return logs

    def reset(self) -> None:
        for metric in (self.fvd, self.kvd, self.clipsim, self.caption):
            if metric is not None:
                metric.reset()
