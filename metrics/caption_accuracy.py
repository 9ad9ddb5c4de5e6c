"""Caption accuracy of generated videos, read back by the synthetic oracle, as a Metric across ranks.

For each video, `maskvid.metrics.oracle` reads colour, shape and direction from its pixels and compares
them with what its prompt asked for; the metric is the fraction right per attribute and for all
three at once ("joint"). Videos whose prompt names no synthetic attributes are counted as
`unscored`, so a caller can tell whether the score covers every video.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from maskvid.metrics.oracle import ATTRIBUTES, recover, score

KEYS = (*ATTRIBUTES, "joint")


def target_attributes(caption: str, info: Optional[Mapping[str, Any]] = None) -> Optional[dict[str, str]]:
    """What a prompt asks for: a synthetic sample's json attributes, else those its caption names
    (`maskvid.datamodules.synthetic.parse_caption`), else None."""
    if info and all(isinstance(info.get(name), str) for name in ATTRIBUTES):
        return {name: info[name] for name in ATTRIBUTES}
    from maskvid.datamodules.synthetic import parse_caption

    return parse_caption(caption) if caption else None


def _uint8_channels_last(videos: Tensor) -> Tensor:
    """float [B, C, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, C]; uint8 input is taken as it is."""
    if videos.dtype == torch.uint8:
        return videos
    from maskvid.datamodules.pixels import to_uint8

    return to_uint8(videos)


class CaptionAccuracy(Metric):
    """Fraction of videos whose colour, shape, direction (and all three) match their prompt."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", torch.zeros(len(KEYS), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("unscored", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, videos: Tensor, attrs: Sequence[Optional[Mapping[str, Any]]]) -> None:
        """videos: float [B, C, T, H, W] in [-1, 1] (or uint8 [B, T, H, W, 3]); attrs: per video the
        intended colour/shape/direction, or None when its prompt has none."""
        if len(attrs) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(attrs)} attribute sets")
        pixels = _uint8_channels_last(videos).cpu().numpy()
        hits = torch.zeros(len(KEYS), dtype=torch.long)
        scored = 0
        for video, target in zip(pixels, attrs):
            if target is None:
                continue
            result = score(recover(video), dict(target))
            hits += torch.tensor([int(result[k]) for k in KEYS])
            scored += 1
        self.hits += hits.to(self.hits.device)
        self.count += scored
        self.unscored += len(attrs) - scored

    def compute(self) -> dict[str, Tensor]:
        count = int(self.count)
        values = self.hits.double() / count if count else torch.full((len(KEYS),), float("nan"), dtype=torch.float64)
        return {**{k: values[i] for i, k in enumerate(KEYS)}, "count": self.count.clone(), "unscored": self.unscored.clone()}
