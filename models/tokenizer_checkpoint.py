"""Load a frozen tokenizer from a stage-1 checkpoint, without Lightning.

The checkpoint written by `maskvid fit` with TokenizerModule carries the tokenizer's config and
which weights to use (the EMA copy when training kept one), so the path alone is enough.
"""

from __future__ import annotations

from pathlib import Path

import torch

from maskvid.models.config import instantiate
from maskvid.models.cvivit import CViViT

CHECKPOINT_KEY = "maskvid_tokenizer"
FORMAT_VERSION = 1


class TokenizerCheckpointError(ValueError):
    """The file is not a usable stage-1 tokenizer checkpoint."""


def load_tokenizer(path: str | Path, map_location: str | torch.device = "cpu", use_ema: bool = True) -> CViViT:
    """The tokenizer saved in `path`, in eval mode, with gradients off."""
    path = Path(path)
    if path.is_dir():
        raise TokenizerCheckpointError(
            f"{path} is a sharded checkpoint directory; consolidate it into one file first"
        )
    if not path.is_file():
        raise TokenizerCheckpointError(f"tokenizer checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise TokenizerCheckpointError(f"cannot read tokenizer checkpoint {path}: {exc}") from exc
    info = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if info is None:
        raise TokenizerCheckpointError(
            f"{path} has no tokenizer in it (was it written by TokenizerModule / `maskvid fit` stage 1?)"
        )
    if info.get("format") != FORMAT_VERSION:
        raise TokenizerCheckpointError(f"{path}: tokenizer format {info.get('format')} is not supported")
    tokenizer = instantiate(info["config"])
    prefix = info["prefix"] if use_ema else "tokenizer."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = tokenizer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TokenizerCheckpointError(
            f"{path}: weights do not match the recorded config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return tokenizer.eval().requires_grad_(False).to(map_location)


def save_tokenizer(path: str | Path, tokenizer: CViViT) -> Path:
    """Write a standalone tokenizer file that `load_tokenizer` (and stage 2) read: the config
    and weights only, without training state (e.g. to ship a tokenizer, or one trained elsewhere)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            CHECKPOINT_KEY: {"format": FORMAT_VERSION, "config": tokenizer.config, "prefix": "tokenizer."},
            "state_dict": {f"tokenizer.{k}": v for k, v in tokenizer.state_dict().items()},
        },
        tmp,
    )
    tmp.replace(path)  # atomic: never a half-written file under the final name
    return path
