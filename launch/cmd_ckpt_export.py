"""Export any checkpoint to a model directory: config.json + model.safetensors, nothing pickled.

Reads a single-file Lightning checkpoint, an FSDP2 DCP directory or a DeepSpeed directory, of
stage 1 (tokenizer) or stage 2 (text-to-video), and writes the inference weights (EMA when the run
kept one) and the networks' configs, without optimizer or loop state. Load the directory with
`maskvid.TextToVideo.from_pretrained` / `maskvid.VideoTokenizer.from_pretrained` (docs/api.md),
`maskvid generate --ckpt DIR`, or as a stage-2 `tokenizer_path`. Written atomically.

examples:
  maskvid ckpt export runs/maskgit_demo/checkpoints/last.ckpt --out maskgit_demo
  maskvid ckpt export runs/big/checkpoints/step=20000.ckpt --out big     # a sharded directory
  maskvid ckpt export runs/tokenizer_demo/checkpoints/last.ckpt --out tokenizer
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from maskvid.checkpoint_files import CheckpointFormatError, read_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="checkpoint file or sharded checkpoint directory")
    parser.add_argument("--out", type=Path, required=True,
                        help="the directory to write (config.json + model.safetensors)")


def run(args: argparse.Namespace) -> int:
    try:
        out, kind = export(args.checkpoint, args.out)
    except ValueError as e:  # CheckpointFormatError, a stage record that does not match its weights, ...
        print(f"maskvid ckpt export: error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"wrote {out} ({kind}, {size:.1f} MiB)")
    return 0


def export(path: str | Path, out: str | Path) -> tuple[Path, str]:
    """Any stage-1 or stage-2 checkpoint -> an exported model directory (config.json +
    model.safetensors: the inference weights, EMA when kept; no optimizer or loop state), and
    which kind it is ("maskvid.text_to_video" or "maskvid.video_tokenizer")."""
    from maskvid.models.stage2_checkpoint import STAGE2_KEY
    from maskvid.models.tokenizer_checkpoint import CHECKPOINT_KEY

    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointFormatError(f"{path}: no weights found")
    if STAGE2_KEY in checkpoint:
        from maskvid.text_to_video import TextToVideo

        model = TextToVideo.from_checkpoint_dict(checkpoint, path)
    elif CHECKPOINT_KEY in checkpoint:
        from maskvid.video_tokenizer import VideoTokenizer

        model = VideoTokenizer.from_checkpoint_dict(checkpoint, path)
    else:
        raise CheckpointFormatError(f"{path} holds neither a stage-1 tokenizer nor a stage-2 model "
                                    "(was it written by `maskvid fit`?)")
    return model.save_pretrained(out), model.FORMAT
