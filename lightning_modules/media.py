"""Reconstruction and sample media of a run: written into `<log dir>/media/` (a PNG frame grid with
the captions, and an mp4), and sent to the loggers as a video (TensorBoard: an animated GIF image
summary, which its image tab plays; W&B: `wandb.Video` of the mp4) and as the PNG grid."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from maskvid.datamodules.pixels import to_uint8
from maskvid.datamodules.preview import contact_sheet
from maskvid.datamodules.video_io import encode_mp4

# Logged GIFs are upscaled (nearest) until a clip is at least this tall: TensorBoard shows images
# at their own size, and tiny training frames are unreadable at 1:1.
MIN_CLIP_HEIGHT = 128


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


def encode_gif(frames: np.ndarray, fps: float, scale: int = 1) -> bytes:
    """uint8 [T, H, W, 3] -> a looping animated GIF, each frame upscaled `scale` times (nearest).
    Pillow folds a frame identical to the previous one into its duration."""
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return buffer.getvalue()


def gif_scale(clip_height: int) -> int:
    """The integer upscale that makes a clip of this height at least MIN_CLIP_HEIGHT tall."""
    return max(1, math.ceil(MIN_CLIP_HEIGHT / clip_height))


def log_reconstructions(
    trainer,
    real: torch.Tensor,
    recon: torch.Tensor,
    captions: Sequence[str],
    tag: str = "val/reconstructions",
    fps: float = 8.0,
) -> dict[str, Path]:
    """Write `<media>/<tag>_step<N>.png|.mp4`; the video (real left, reconstructed right, one row a
    clip) and the grid go to the loggers."""
    real, recon = real.detach().float().cpu(), recon.detach().float().cpu()
    rows = rearrange(torch.stack([real, recon.clamp(-1, 1)], dim=1), "b two c t h w -> (b two) c t h w")
    labels = [text for cap in captions[: len(real)] for text in (f"real: {cap}", "reconstructed")]
    sheet = contact_sheet(rows, labels, max_frames=9)
    frames = comparison_video(real, recon)
    return _write_and_send(trainer, tag, sheet, frames, clip_height=real.shape[-2], fps=fps)


def log_samples(
    trainer, video: torch.Tensor, prompts: Sequence[str], tag: str = "val/samples", fps: float = 8.0
) -> dict[str, Path]:
    """Generated videos [B, C, T, H, W] in [-1, 1] with their prompts: `<media>/<tag>_step<N>.png|.mp4`; the
    video (clips side by side) and the grid go to the loggers."""
    video = video.detach().float().cpu()
    sheet = contact_sheet(video, list(prompts), max_frames=9)
    frames = rearrange(to_uint8(video), "b t h w c -> t h (b w) c").numpy()
    return _write_and_send(trainer, tag, sheet, frames, clip_height=video.shape[-2], fps=fps)


def _write_and_send(trainer, tag: str, sheet: Image.Image, frames: np.ndarray, clip_height: int,
                    fps: float) -> dict[str, Path]:
    out = media_dir(trainer)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{tag.replace('/', '_')}_step{trainer.global_step:07d}"
    png = out / f"{stem}.png"
    sheet.save(png)
    data, _ = encode_mp4(list(frames), fps=fps)
    mp4 = out / f"{stem}.mp4"
    mp4.write_bytes(data)
    _send_image(trainer, tag, np.asarray(sheet))
    _send_video(trainer, f"{tag}_video", frames, mp4, clip_height, fps)
    return {"png": png, "mp4": mp4}


def _send_image(trainer, tag: str, image: np.ndarray) -> None:
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # W&B, Neptune, MLflow-style loggers
            logger.log_image(key=tag, images=[image], step=trainer.global_step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
            logger.experiment.add_image(tag, image, trainer.global_step, dataformats="HWC")


def _send_video(trainer, tag: str, frames: np.ndarray, mp4: Path, clip_height: int, fps: float) -> None:
    gif = None
    for logger in trainer.loggers:
        if hasattr(logger, "log_video"):  # W&B: the mp4 as written, no re-encoding (numpy would need moviepy)
            logger.log_video(key=tag, videos=[str(mp4)], step=trainer.global_step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
            gif = gif or encode_gif(frames, fps, gif_scale(clip_height))
            add_gif(logger.experiment, tag, gif, trainer.global_step)


def add_gif(writer, tag: str, gif: bytes, step: int) -> None:
    """An animated GIF as a TensorBoard image summary: what `SummaryWriter.add_video` writes, less
    its moviepy encoder."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    with Image.open(io.BytesIO(gif)) as image:
        width, height = image.size
    summary = Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
        height=height, width=width, colorspace=3, encoded_image_string=gif))])
    writer._get_file_writer().add_summary(summary, step)
