"""The stage-1 record in a training checkpoint.

A checkpoint written by `maskvid fit` with TokenizerModule carries, under CHECKPOINT_KEY, the
tokenizer's config and which weights to use (the EMA copy when training kept one), so the
checkpoint alone rebuilds the tokenizer. `maskvid.VideoTokenizer` reads it (and exported
directories); stage 2 and `maskvid data tokenize` go through `maskvid.video_tokenizer.load_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHECKPOINT_KEY = "maskvid_tokenizer"
FORMAT_VERSION = 1


class TokenizerCheckpointError(ValueError):
    """The path holds no usable stage-1 tokenizer."""


def tokenizer_record(checkpoint: Any, source: Any, use_ema: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the tokenizer's network config, its weights without prefix) from a loaded checkpoint."""
    info = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if info is None:
        raise TokenizerCheckpointError(
            f"{source} has no tokenizer in it (was it written by TokenizerModule / `maskvid fit` stage 1?)"
        )
    if info.get("format") != FORMAT_VERSION:
        raise TokenizerCheckpointError(f"{source}: tokenizer format {info.get('format')} is not supported")
    prefix = info["prefix"] if use_ema else "tokenizer."
    state = {k[len(prefix):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith(prefix)}
    return info["config"], state
