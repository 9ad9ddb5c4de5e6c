"""The stage-2 record in a training checkpoint: what rebuilds the generator without Lightning.

MaskedVideoModule writes, under STAGE2_KEY, the backbone config and which weights to use (EMA when
kept), the frozen tokenizer's config, the text encoder's name and the sampling defaults.
`maskvid.TextToVideo.from_checkpoint` reads it.
"""

from __future__ import annotations

from typing import Any

import torch

STAGE2_KEY = "maskvid_stage2"
STAGE2_FORMAT = 1


class Stage2CheckpointError(ValueError):
    """The checkpoint holds no usable stage-2 model."""


def stage2_record(checkpoint: Any, source: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the record, the checkpoint's weights) of a loaded stage-2 checkpoint."""
    info = checkpoint.get(STAGE2_KEY) if isinstance(checkpoint, dict) else None
    if info is None:
        raise Stage2CheckpointError(
            f"{source} is not a stage-2 checkpoint (no {STAGE2_KEY!r}); text-to-video needs one written by "
            "MaskedVideoModule. A stage-1 (tokenizer) checkpoint cannot generate from text: load it with "
            "VideoTokenizer.from_checkpoint."
        )
    if info.get("format") != STAGE2_FORMAT:
        raise Stage2CheckpointError(f"{source}: stage-2 format {info.get('format')} is not supported")
    return info, checkpoint.get("state_dict", {})
