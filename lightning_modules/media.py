"""Reconstruction media: real next to reconstructed, as a frame grid (PNG, and to the logger when
it takes images) and as an mp4 in the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from einops import rearrange

from maskvid.datamodules.pixels import to_uint8
from maskvid.datamodules.preview import contact_sheet
from maskvid.datamodules.video_io import encode_mp4


def media_dir(trainer) -> Path:
    """`<log dir>/media`: next to the metrics of the run the media belong to.

    Not `trainer.log_dir`: under DDP that property broadcasts from rank 0, a collective, and media
    are written by rank 0 alone, so it waited forever for the other ranks (a hang at the first
    validation of every multi-process run that logs media). The logger's own log_dir is local."""
    logger = trainer.logger
    root = getattr(logger, "log_dir", None) if logger is not None else None
    return Path(root or trainer.default_root_dir) / "media"


def comparison_video(real: torch.Tensor, recon: torch.Tensor) -> np.ndarray:
    """uint8 [T, B*H, 2*W, 3]: each clip's real frames left, reconstruction right, clips stacked."""
    both = torch.stack([real, recon.clamp(-1, 1)], dim=1)  # b two c t h w
    frames = to_uint8(both)  # b two t h w c
    return rearrange(frames, "b two t h w c -> t (b h) (two w) c").numpy()


def log_reconstructions(
    trainer,
    real: torch.Tensor,
    recon: torch.Tensor,
    captions: Sequence[str],
    tag: str = "val/reconstructions",
    fps: float = 8.0,
) -> dict[str, Path]:
    """Write `<media>/<tag>_step<N>.png|.mp4` and send the grid to a logger that takes images."""
    real, recon = real.detach().float().cpu(), recon.detach().float().cpu()
    rows = rearrange(torch.stack([real, recon.clamp(-1, 1)], dim=1), "b two c t h w -> (b two) c t h w")
    labels = [text for cap in captions[: len(real)] for text in (f"real: {cap}", "reconstructed")]
    sheet = contact_sheet(rows, labels, max_frames=9)
    out = media_dir(trainer)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{tag.replace('/', '_')}_step{trainer.global_step:07d}"
    png = out / f"{stem}.png"
    sheet.save(png)
    data, _ = encode_mp4(list(comparison_video(real, recon)), fps=fps)
    mp4 = out / f"{stem}.mp4"
    mp4.write_bytes(data)
    _send_image(trainer, tag, np.asarray(sheet))
    return {"png": png, "mp4": mp4}


def log_samples(
    trainer, video: torch.Tensor, prompts: Sequence[str], tag: str = "val/samples", fps: float = 8.0
) -> dict[str, Path]:
    """Generated videos with their prompts: `<media>/<tag>_step<N>.png|.mp4`, grid to the logger."""
    video = video.detach().float().cpu()
    sheet = contact_sheet(video, list(prompts), max_frames=9)
    out = media_dir(trainer)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{tag.replace('/', '_')}_step{trainer.global_step:07d}"
    png = out / f"{stem}.png"
    sheet.save(png)
    frames = rearrange(to_uint8(video), "b t h w c -> t h (b w) c").numpy()
    data, _ = encode_mp4(list(frames), fps=fps)
    mp4 = out / f"{stem}.mp4"
    mp4.write_bytes(data)
    _send_image(trainer, tag, np.asarray(sheet))
    return {"png": png, "mp4": mp4}


def _send_image(trainer, tag: str, image: np.ndarray) -> None:
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # W&B, Neptune, MLflow-style loggers
            logger.log_image(key=tag, images=[image], step=trainer.global_step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
            logger.experiment.add_image(tag, image, trainer.global_step, dataformats="HWC")
