"""Sliding windows over long videos, for FVD and KVD of videos longer than I3D's clip.

I3D sees a fixed number of frames (16 for the reference FVD), so a 128-frame video scored on its
first 16 frames says nothing about how it drifts later. MeBT scores long videos over windows: every
`window`-frame span, `stride` frames apart, goes into the feature set as a clip of its own.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor


def window_count(num_frames: int, window: int, stride: int) -> int:
    """How many windows `sliding_windows` cuts from a num_frames-frame video (1 if it is shorter)."""
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got {window} and {stride}")
    return 1 if num_frames <= window else (num_frames - window) // stride + 1


def sliding_windows(video: Tensor, window: int, stride: int) -> Tensor:
    """[B, C, T, H, W] -> [B * n, C, window, H, W], the windows of each video in order; a video
    shorter than the window is returned whole (I3D's preprocessing stretches it)."""
    t = video.shape[2]
    count = window_count(t, window, stride)
    if t <= window:
        return video
    # Frames after the last full window are left out: every clip I3D sees has `window` real frames.
    spans = video[:, :, : window + (count - 1) * stride].unfold(2, window, stride)  # [B, C, n, H, W, window]
    return rearrange(spans, "b c n h w t -> (b n) c t h w")
