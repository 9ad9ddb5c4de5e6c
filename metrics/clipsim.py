"""CLIPSIM: text-video similarity as papers report it, as a torchmetrics Metric across ranks.

Convention: for each video, the mean over its (real, unpadded) frames of the cosine between the
frame's CLIP image embedding and its caption's CLIP text embedding; CLIPSIM is the mean of that
over videos. It is the raw cosine in [-1, 1], not torchmetrics CLIPScore's 100 * max(cos, 0). For one-frame videos,
CLIPScore = 100 * max(CLIPSIM, 0) with the same model (tests/test_metrics.py checks it).

The model and processor come from a callable of the kind CLIPScore takes (`LocalCLIP(path)` for
a local directory), and frames go through the CLIP processor exactly as CLIPScore sends images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torchmetrics import Metric

from maskvid.datamodules.pixels import to_uint8
from maskvid.metrics.clip_model import LocalCLIP

FRAME_CHUNK = 64  # frames per CLIP forward: bounds memory for long or many videos


class CLIPSimilarity(Metric):
    """Mean over videos of the mean over frames of cos(CLIP(frame), CLIP(caption))."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, clip: str | Path | Callable[[], tuple[Any, Any]], **kwargs: Any) -> None:
        """
        Args:
            clip: A local CLIP directory, or a callable returning (model, processor) as
                torchmetrics' CLIPScore accepts.
        """
        super().__init__(**kwargs)
        loader = LocalCLIP(clip) if isinstance(clip, (str, Path)) else clip
        model, processor = loader()
        model.eval().requires_grad_(False)
        # Held in a list: outside the module tree, so never checkpointed, sharded or trained.
        self._clip: list[Any] = [model, processor]
        self.add_state("cosine_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @property
    def _max_text_length(self) -> int:
        return int(getattr(self._clip[0].config.text_config, "max_position_embeddings", 77))

    @torch.no_grad()
    def embed_text(self, captions: Sequence[str], device: torch.device) -> Tensor:
        model, processor = self._clip
        tokens = processor(text=list(captions), return_tensors="pt", padding=True, truncation=True,
                           max_length=self._max_text_length)
        features = model.get_text_features(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        return F.normalize(features.double(), dim=-1)

    @torch.no_grad()
    def embed_frames(self, frames: Tensor, device: torch.device) -> Tensor:
        """uint8 [N, C, H, W] -> unit image embeddings [N, D] (float64)."""
        model, processor = self._clip
        out = []
        for chunk in frames.cpu().split(FRAME_CHUNK):
            pixels = processor(images=list(chunk), return_tensors="pt")["pixel_values"]
            out.append(model.get_image_features(pixels.to(device)))
        return F.normalize(torch.cat(out).double(), dim=-1)

    @torch.no_grad()
    def frame_cosines(self, videos: Tensor, captions: Sequence[str]) -> Tensor:
        """[B, T] cosine of every frame with its video's caption."""
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"expected videos [B, 3, T, H, W] in [-1, 1], got {tuple(videos.shape)}")
        if len(captions) != videos.shape[0]:
            raise ValueError(f"{videos.shape[0]} videos but {len(captions)} captions")
        device = self.cosine_sum.device
        model = self._clip[0]
        if next(model.parameters()).device != device:
            model.to(device)
        with torch.autocast(device.type, enabled=False):
            frames = rearrange(to_uint8(videos), "b t h w c -> b t c h w")  # what the CLIP processor rescales
            b, t = frames.shape[:2]
            image = self.embed_frames(rearrange(frames, "b t c h w -> (b t) c h w"), device)
            text = self.embed_text(captions, device)
        return torch.einsum("btd,bd->bt", rearrange(image, "(b t) d -> b t d", b=b, t=t), text)

    def update(self, videos: Tensor, captions: Sequence[str], frame_mask: Optional[Tensor] = None) -> None:
        """videos: float [B, C, T, H, W] in [-1, 1]; frame_mask: bool [B, T], True = real frame."""
        cosines = self.frame_cosines(videos, captions)
        if frame_mask is None:
            per_video = cosines.mean(dim=1)
        else:
            mask = frame_mask.to(cosines.device, torch.float64)
            per_video = (cosines * mask).sum(1) / mask.sum(1).clamp(min=1)
        self.cosine_sum += per_video.sum()
        self.count += per_video.numel()

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.cosine_sum / self.count
