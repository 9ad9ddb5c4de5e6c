"""Pictures of batches: a contact sheet (clips × frames, with captions) and side-by-side mp4s."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from maskvid.datamodules.pixels import to_uint8
from maskvid.datamodules.video_io import encode_mp4


def contact_sheet(
    video: torch.Tensor,
    captions: Sequence[str],
    frame_mask: torch.Tensor | None = None,
    max_frames: int = 9,
    scale: int = 2,
) -> Image.Image:
    """One row per clip: up to `max_frames` evenly spaced frames, caption underneath.

    video: float [B, C, T, H, W] in [-1, 1]. Padded frames (frame_mask False) are dimmed.
    """
    frames = to_uint8(video).numpy()  # [B, T, H, W, C]
    b, t, h, w, _ = frames.shape
    cols = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    cw, ch = w * scale, h * scale
    text_h = 28
    font = ImageFont.load_default()
    sheet = Image.new("RGB", (len(cols) * (cw + 2) + 2, b * (ch + text_h + 2) + 2), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i in range(b):
        y = 2 + i * (ch + text_h + 2)
        for j, f in enumerate(cols):
            tile = frames[i, f]
            if frame_mask is not None and not bool(frame_mask[i, f]):
                tile = (tile * 0.35).astype(np.uint8)
            img = Image.fromarray(tile).resize((cw, ch), Image.NEAREST)
            sheet.paste(img, (2 + j * (cw + 2), y))
        caption = textwrap.shorten(captions[i] if i < len(captions) else "", width=max(20, len(cols) * cw // 6))
        draw.text((4, y + ch + 4), caption, fill=(230, 230, 230), font=font)
    return sheet


def save_batch_videos(video: torch.Tensor, out_dir: str | Path, fps: float = 8.0, prefix: str = "clip") -> list[Path]:
    """Write each clip of a float [B, C, T, H, W] batch as an mp4; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, clip in enumerate(to_uint8(video).numpy()):
        data, _ = encode_mp4(list(clip), fps=fps)
        path = out_dir / f"{prefix}-{i:03d}.mp4"
        path.write_bytes(data)
        paths.append(path)
    return paths
