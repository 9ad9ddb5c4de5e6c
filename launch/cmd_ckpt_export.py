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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="checkpoint file or sharded checkpoint directory")
    parser.add_argument("--out", type=Path, required=True,
                        help="the directory to write (config.json + model.safetensors)")


def run(args: argparse.Namespace) -> int:
    from maskvid.launch.checkpoints import export

    try:
        out, kind = export(args.checkpoint, args.out)
    except ValueError as e:  # CheckpointFormatError, a stage record that does not match its weights, ...
        print(f"maskvid ckpt export: error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"wrote {out} ({kind}, {size:.1f} MiB)")
    return 0
