"""Rebuild a text-to-video generator from a stage-2 checkpoint alone, without Lightning.

The checkpoint written by MaskedVideoModule carries the backbone config and weights (EMA when
kept), the frozen tokenizer's config and weights, the text encoder's name and the sampling
defaults. `maskvid generate` uses this, and so can any script.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from maskvid.models.config import instantiate
from maskvid.models.cvivit import CViViT
from maskvid.models.sampling import SamplingOptions, maskgit_sample

STAGE2_KEY = "maskvid_stage2"
STAGE2_FORMAT = 1


class Stage2CheckpointError(ValueError):
    """The file is not a usable stage-2 checkpoint."""


def _load_prefixed(net: nn.Module, state: dict, prefix: str, path: Path) -> None:
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = net.load_state_dict(sub, strict=False)
    if missing or unexpected:
        raise Stage2CheckpointError(
            f"{path}: weights under {prefix!r} do not match the recorded config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


@dataclass
class TextToVideo:
    """Frozen backbone + tokenizer + text encoder, and how to sample from them."""

    backbone: nn.Module
    tokenizer: CViViT
    text_encoder: nn.Module
    defaults: SamplingOptions = field(default_factory=SamplingOptions)
    grid: tuple[int, int, int] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def grid_for(self, num_frames: int | None, resolution: int | None = None) -> tuple[int, int, int]:
        """The token grid for `num_frames` (default: the training clip length)."""
        if num_frames is None:
            if self.grid is None:
                raise ValueError("this checkpoint does not record its clip length: pass num_frames")
            return self.grid
        size = resolution or self.tokenizer.patch_size * (self.grid[1] if self.grid else self.backbone.grid[1])
        grid = self.tokenizer.token_grid(num_frames, size)
        self.backbone.check_grid((min(grid[0], self.trained_frames), *grid[1:]))  # longer: sliding window
        return grid

    @property
    def trained_frames(self) -> int:
        """Latent frames per clip in training: longer videos are made with a sliding window."""
        return self.grid[0] if self.grid else self.backbone.grid[0]

    @torch.no_grad()
    def tokens(
        self,
        prompts: list[str],
        grid: tuple[int, int, int],
        options: SamplingOptions,
        generator,
        prime: torch.Tensor | None = None,
        context: int = 2,
    ) -> torch.Tensor:
        """Sample a [B, t, h, w] token grid. Past the trained length, a window of the trained
        length slides forward, each window primed with the last `context` latent frames."""
        text, text_mask = self.text_encoder(prompts)
        text, text_mask = text.to(self.device), text_mask.to(self.device)
        t, h, w = grid
        window = self.trained_frames
        if t <= window:
            return maskgit_sample(self.backbone, grid, text, text_mask, options, generator, prime=prime)
        if not 0 < context < window:
            raise ValueError(f"sliding-window context must be in [1, {window - 1}], got {context}")
        tokens = maskgit_sample(self.backbone, (window, h, w), text, text_mask, options, generator, prime=prime)
        while tokens.shape[1] < t:
            step = min(window - context, t - tokens.shape[1])
            new = maskgit_sample(
                self.backbone, (context + step, h, w), text, text_mask, options, generator, prime=tokens[:, -context:]
            )
            tokens = torch.cat([tokens, new[:, context:]], dim=1)
        return tokens

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(tokens).clamp(-1, 1)

    def to(self, device: str | torch.device) -> TextToVideo:
        self.backbone.to(device)
        self.tokenizer.to(device)
        self.text_encoder.to(device)
        return self


def load_generator(path: str | Path, map_location: str | torch.device = "cpu") -> TextToVideo:
    """The generator stored in a stage-2 checkpoint file."""
    from maskvid.models.text_encoder import TextEncoder

    path = Path(path)
    if path.is_dir():
        raise Stage2CheckpointError(f"{path} is a sharded checkpoint directory; consolidate it into one file first")
    if not path.is_file():
        raise Stage2CheckpointError(f"stage-2 checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise Stage2CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    info = checkpoint.get(STAGE2_KEY) if isinstance(checkpoint, dict) else None
    if info is None:
        raise Stage2CheckpointError(
            f"{path} is not a stage-2 checkpoint (no {STAGE2_KEY!r}); `maskvid generate` needs one written by "
            "MaskedVideoModule. A stage-1 (tokenizer) checkpoint cannot generate from text."
        )
    if info.get("format") != STAGE2_FORMAT:
        raise Stage2CheckpointError(f"{path}: stage-2 format {info.get('format')} is not supported")
    state = checkpoint["state_dict"]
    backbone = instantiate(info["backbone"])
    _load_prefixed(backbone, state, info["backbone_prefix"], path)
    tokenizer = instantiate(info["tokenizer"])
    _load_prefixed(tokenizer, state, info["tokenizer_prefix"], path)
    text_encoder = TextEncoder(**info["text_encoder"])
    sampling = info.get("sampling", {})
    return TextToVideo(
        backbone=backbone.eval().requires_grad_(False),
        tokenizer=tokenizer.eval().requires_grad_(False),
        text_encoder=text_encoder,
        defaults=SamplingOptions(**{k: v for k, v in sampling.items() if k in SamplingOptions.__dataclass_fields__}),
        grid=tuple(info["grid"]) if info.get("grid") else None,
    )
