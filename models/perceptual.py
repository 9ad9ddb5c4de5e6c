"""Optional perceptual losses: LPIPS-style on VGG16 features per frame, and on I3D features per clip.

Nothing is downloaded. The file is a state_dict of torchvision's `vgg16().features`
(keys `features.N.weight|bias`, or the bare `N.weight|bias`), optionally with LPIPS's learned
per-channel weights (`lin0.model.1.weight` ... `lin4.model.1.weight`) in the same or a second file.
The network is frozen and never enters an optimizer.

`VideoFeatureLoss` is Phenaki's video perceptual term: the squared distance between the I3D
features of the real and reconstructed clips. The I3D comes from its caller (maskvid.metrics.i3d
loads it from a local file), so this module stays free of the metrics package.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# torchvision's vgg16 `features` layout: conv widths, "M" = max-pool.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# Indices (in `features`) of the ReLUs LPIPS reads: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_TAPS = (3, 8, 15, 22, 29)
_WIDTHS = (64, 128, 256, 512, 512)
# ImageNet statistics, expressed for inputs in [-1, 1] (LPIPS's scaling layer).
_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


class PerceptualWeightsError(ValueError):
    """The perceptual network's weights file is missing or does not fit VGG16."""


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    width = 3
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(width, item, 3, padding=1), nn.ReLU(inplace=False)]
            width = item
    return nn.Sequential(*layers)


class PerceptualLoss(nn.Module):
    """LPIPS distance between frames (mean over frames and pixels)."""

    def __init__(self, weights_path: str) -> None:
        """
        Args:
            weights_path: A VGG16 `features` state_dict (optionally with LPIPS `lin*` weights).
        """
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in _WIDTHS)
        self._load(weights_path)
        self.requires_grad_(False)
        self.eval()
        self.register_buffer("shift", _SHIFT.clone(), persistent=False)
        self.register_buffer("scale", _SCALE.clone(), persistent=False)

    def _load(self, weights_path: str) -> None:
        path = Path(weights_path)
        if not path.is_file():
            raise PerceptualWeightsError(f"perceptual weights file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
            raise PerceptualWeightsError(f"cannot read perceptual weights {path}: {exc}") from exc
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise PerceptualWeightsError(f"{path} does not hold a state_dict")
        feats = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("lin")}
        try:
            self.features.load_state_dict(feats, strict=True)
        except RuntimeError as exc:
            raise PerceptualWeightsError(f"{path} is not a VGG16 features state_dict: {exc}") from exc
        lins = {k: v for k, v in state.items() if k.startswith("lin")}
        if lins:
            for i, lin in enumerate(self.lins):
                key = f"lin{i}.model.1.weight"
                if key not in lins:
                    raise PerceptualWeightsError(f"{path} has LPIPS weights but lacks {key}")
                lin.weight.data.copy_(lins[key])
        else:  # plain VGG feature distance: equal channel weights
            for lin in self.lins:
                nn.init.constant_(lin.weight, 1.0 / lin.in_channels)

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # always frozen, whatever the parent module does

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x)
                if i == _TAPS[-1]:
                    break
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor, frame_mask: torch.Tensor | None = None,
                max_frames: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """a, b: video [B, C, F, H, W] in [-1, 1] -> scalar distance, the mean over the scored frames.

        frame_mask: bool [B, F], False on padding, which is never scored.
        max_frames: score at most this many real frames per clip, drawn at random (from
            `generator`) each call, so every frame is seen over training at a bounded cost; None
            scores every real frame.
        """
        pick = select_frames(a.shape[0], a.shape[2], a.device, frame_mask, max_frames, generator)
        a = rearrange(a, "b c f h w -> (b f) c h w")[pick]
        b = rearrange(b, "b c f h w -> (b f) c h w")[pick]
        total = a.new_zeros(())
        for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b)):
            diff = (F.normalize(fa, dim=1, eps=1e-10) - F.normalize(fb, dim=1, eps=1e-10)) ** 2
            total = total + lin(diff).mean()
        return total


def select_frames(batch: int, frames: int, device: torch.device, frame_mask: torch.Tensor | None = None,
                  max_frames: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices into the (batch * frames) flattened frames: every real frame, or at most `max_frames`
    real frames per clip drawn at random."""
    valid = torch.ones(batch, frames, dtype=torch.bool, device=device) if frame_mask is None else frame_mask.bool()
    if max_frames is not None and max_frames < frames:
        scores = torch.rand(batch, frames, generator=generator, device=generator.device if generator else device)
        scores = scores.to(device).masked_fill(~valid, 2.0)  # padding sorts last, never picked first
        rank = scores.argsort(dim=1).argsort(dim=1)
        valid = valid & (rank < max_frames)
    return valid.flatten().nonzero().squeeze(1)


class VideoFeatureLoss(nn.Module):
    """Mean squared distance between I3D features of real and reconstructed clips (Phenaki's video
    perceptual loss). Padded frames of the reconstruction are replaced by the real ones, so they add
    no distance and no gradient."""

    def __init__(self, network: nn.Module, resolution: int = 224) -> None:
        """
        Args:
            network: A differentiable I3D-like network: video [B, 3, T, H, W] in [-1, 1] -> features [B, D].
            resolution: Frames are resized to this square size first (I3D's input size).
        """
        super().__init__()
        self.network = network
        self.resolution = resolution
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VideoFeatureLoss:
        return super().train(False)  # frozen, whatever the parent module does

    def features(self, video: torch.Tensor) -> torch.Tensor:
        b = video.shape[0]
        frames = rearrange(video, "b c t h w -> (b t) c h w")
        frames = F.interpolate(frames, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return self.network(rearrange(frames, "(b t) c h w -> b c t h w", b=b)).float()

    def forward(self, real: torch.Tensor, recon: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """real, recon: [B, C, T, H, W] in [-1, 1]; frame_mask: bool [B, T] -> scalar."""
        if frame_mask is not None:
            recon = torch.where(frame_mask[:, None, :, None, None].bool(), recon, real)
        with torch.autocast(real.device.type, enabled=False):  # features are compared, not just used
            target = self.features(real.float()).detach()
            return F.mse_loss(self.features(recon.float()), target)
