"""`VideoTokenizer`: a frozen C-ViViT behind uint8 videos in, token ids out, and back.

    tok = VideoTokenizer.from_pretrained("my_tokenizer")   # or .from_checkpoint("last.ckpt")
    ids = tok.encode(video)                                 # uint8 [B, T, H, W, 3] -> [B, t, h, w]
    video = tok.decode(ids)                                 # -> uint8 [B, T, H, W, 3]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from maskvid import pretrained
from maskvid.datamodules.pixels import to_model, to_uint8
from maskvid.models.cvivit import CViViT
from maskvid.models.tokenizer_checkpoint import TokenizerCheckpointError

_PREFIX = "tokenizer."


class VideoTokenizer:
    """A frozen stage-1 tokenizer (C-ViViT) with pixel conversion and safetensors I/O."""

    FORMAT = pretrained.VIDEO_TOKENIZER

    def __init__(self, network: CViViT, source: dict[str, Any] | None = None) -> None:
        """
        Args:
            network: the C-ViViT; it is put in eval mode with gradients off.
            source: where it came from (checkpoint, step, EMA), recorded in config.json.
        """
        if not isinstance(network, CViViT):
            raise TypeError(f"VideoTokenizer wraps a CViViT, got {type(network).__name__}")
        self.network = network.eval().requires_grad_(False)
        self.source = dict(source or {})

    def __repr__(self) -> str:
        n = self.network
        return (f"VideoTokenizer(image_size={n.image_size}, patch_size={n.patch_size}, "
                f"temporal_patch_size={n.temporal_patch_size}, vocab_size={self.vocab_size}, device={self.device})")

    # -- the model ------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.network.vocab_size

    def to(self, device: str | torch.device) -> VideoTokenizer:
        self.network.to(device)
        return self

    def token_grid(self, num_frames: int, size: int | tuple[int, int] | None = None) -> tuple[int, int, int]:
        """(t, h, w) of the token grid for `num_frames` frames of `size` (default: image_size)."""
        return self.network.token_grid(num_frames, self.network.image_size if size is None else size)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Videos -> token ids int64 [B, t, h, w] on the CPU.

        video: uint8 [B, T, H, W, 3] (as decoded), or float [B, 3, T, H, W] in [-1, 1] (what the
        datamodule yields; datamodules/pixels.py). T = 1 + k * temporal_patch_size.
        """
        if video.dtype == torch.uint8:
            if video.dim() != 5 or video.shape[-1] != 3:
                raise ValueError(f"uint8 video must be [B, T, H, W, 3], got {list(video.shape)}")
            video = to_model(video.cpu()).to(self.device)
        elif video.is_floating_point():
            if video.dim() != 5 or video.shape[1] != 3:
                raise ValueError(f"float video must be [B, 3, T, H, W] in [-1, 1], got {list(video.shape)}")
            video = video.to(self.device, torch.float32)
        else:
            raise TypeError(f"video must be uint8 or float, got {video.dtype}")
        self.token_grid(video.shape[2], (video.shape[3], video.shape[4]))  # a clear error for a bad size
        return self.network.encode(video).cpu()

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, t, h, w] -> uint8 videos [B, T, H, W, 3] on the CPU."""
        if ids.dim() != 4:
            raise ValueError(f"token ids must be [B, t, h, w], got {list(ids.shape)}")
        return to_uint8(self.network.decode(ids.to(self.device)).clamp(-1, 1)).cpu()

    # -- saving and loading ---------------------------------------------------------------------

    def save_pretrained(self, out: str | Path) -> Path:
        """Write `out/config.json` and `out/model.safetensors`; `from_pretrained(out)` reads them."""
        config = {"format": self.FORMAT, "tokenizer": self.network.config, "source": self.source}
        return pretrained.write_directory(out, config, pretrained.prefixed(_PREFIX, self.network))

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> VideoTokenizer:
        """The tokenizer in an exported directory: a tokenizer's, or a text-to-video model's (whose
        tokenizer it is)."""
        config = pretrained.read_config(path, (cls.FORMAT, pretrained.TEXT_TO_VIDEO))
        tensors = pretrained.read_weights(path)
        if config["format"] == cls.FORMAT:
            pretrained.check_all_used(tensors, (_PREFIX,), path)
        network = pretrained.load_network(config["tokenizer"], tensors, config.get("weights", {}).get("tokenizer", _PREFIX), path)
        return cls(network, config.get("source")).to(map_location)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu",
                        use_ema: bool = True) -> VideoTokenizer:
        """The tokenizer in a training checkpoint: a single file or a sharded (FSDP2 DCP, DeepSpeed)
        directory, of stage 1 (EMA weights when kept, unless use_ema=False) or of stage 2."""
        from maskvid.checkpoint_files import read_checkpoint

        return cls.from_checkpoint_dict(read_checkpoint(path), path, use_ema).to(map_location)

    @classmethod
    def from_checkpoint_dict(cls, checkpoint: dict, source: Any, use_ema: bool = True) -> VideoTokenizer:
        from maskvid.models.stage2_checkpoint import STAGE2_KEY, stage2_record
        from maskvid.models.tokenizer_checkpoint import CHECKPOINT_KEY, tokenizer_record

        if isinstance(checkpoint, dict) and CHECKPOINT_KEY not in checkpoint and STAGE2_KEY in checkpoint:
            info, state = stage2_record(checkpoint, source)  # stage 2 carries its frozen tokenizer
            config, prefix = info["tokenizer"], info["tokenizer_prefix"]
        else:
            config, state = tokenizer_record(checkpoint, source, use_ema)
            prefix = ""
        network = pretrained.load_network(config, state, prefix, source)
        return cls(network, provenance(checkpoint, source, ema=use_ema and "_ema." in str(
            checkpoint.get(CHECKPOINT_KEY, {}).get("prefix", ""))))

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu", use_ema: bool = True) -> VideoTokenizer:
        """An exported directory (config.json) or any checkpoint."""
        if pretrained.is_pretrained_dir(path):
            return cls.from_pretrained(path, map_location)
        return cls.from_checkpoint(path, map_location, use_ema)


def provenance(checkpoint: dict, source: Any, ema: bool) -> dict[str, Any]:
    """What config.json records about the checkpoint a model came from."""
    return {"checkpoint": str(source), "global_step": checkpoint.get("global_step"), "ema": ema}


def load_tokenizer(path: str | Path, map_location: str | torch.device = "cpu", use_ema: bool = True) -> CViViT:
    """The CViViT in `path` (an exported directory, a stage-1 checkpoint file or sharded directory,
    or a stage-2 checkpoint/export, which carries its tokenizer), in eval mode, gradients off."""
    try:
        return VideoTokenizer.load(path, map_location=map_location, use_ema=use_ema).network
    except TokenizerCheckpointError:
        raise
    except ValueError as exc:  # a bad directory or checkpoint file: one error type for the callers
        raise TokenizerCheckpointError(str(exc)) from None
