"""The one place where pixel values change range.

Everything upstream (decoders, shard builders, the synthetic renderer) speaks uint8 RGB, and
everything a model sees is float in [-1, 1]. Converting only here keeps the two conventions from
drifting apart between training, evaluation and generation.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange


_SCALE = 1.0 / 127.5  # applied as float32 by both paths below, so they agree bit for bit


def to_model(
    video: torch.Tensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 [..., T, H, W, C] (channels last, as decoded) -> float [..., C, T, H, W] in [-1, 1].

    out: optional destination; the result is always contiguous.
    """
    if video.dtype != torch.uint8:
        raise TypeError(f"to_model expects uint8 pixels, got {video.dtype}")
    if out is None and dtype == torch.float32 and video.device.type == "cpu":
        # On the host this runs in the loader's process beside the decoding workers. numpy is
        # single-threaded: torch's OpenMP threads spin after each op and take cores from the
        # decoding workers (benchmarks/data_throughput.py).
        planes = rearrange(video.numpy(), "... t h w c -> ... c t h w").astype(np.float32, order="C")
        planes *= np.float32(_SCALE)
        planes -= np.float32(1.0)
        return torch.from_numpy(planes)
    video = rearrange(video, "... t h w c -> ... c t h w")
    if out is None:
        out = torch.empty(video.shape, dtype=dtype, device=video.device)
    out.copy_(video)
    return out.mul_(_SCALE).sub_(1.0)


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """float [..., C, T, H, W] in [-1, 1] -> uint8 [..., T, H, W, C], clamping what overshoots."""
    video = rearrange(video.detach().float(), "... c t h w -> ... t h w c")
    return video.add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)
