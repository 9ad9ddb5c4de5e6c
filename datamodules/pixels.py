"""The one place where pixel values change range.

Everything upstream (decoders, shard builders, the synthetic renderer) speaks uint8 RGB, and
everything a model sees is float in [-1, 1]. Converting only here keeps the two conventions from
drifting apart between training, evaluation and generation.
"""

from __future__ import annotations

import torch
from einops import rearrange


def to_model(
    video: torch.Tensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 [..., T, H, W, C] (channels last, as decoded) -> float [..., C, T, H, W] in [-1, 1].

    out: optional destination (e.g. a shared-memory buffer in a DataLoader worker); the result
        is always contiguous.
    """
    if video.dtype != torch.uint8:
        raise TypeError(f"to_model expects uint8 pixels, got {video.dtype}")
    video = rearrange(video, "... t h w c -> ... c t h w")
    if out is None:
        out = torch.empty(video.shape, dtype=dtype, device=video.device)
    out.copy_(video)
    return out.div_(127.5).sub_(1.0)


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """float [..., C, T, H, W] in [-1, 1] -> uint8 [..., T, H, W, C], clamping what overshoots."""
    video = rearrange(video.detach().float(), "... c t h w -> ... t h w c")
    return video.add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)
