"""Consolidate any checkpoint into one inference file that `maskvid generate` takes.

Reads a single-file Lightning checkpoint, an FSDP2 DCP directory or a DeepSpeed directory, and
writes one file with the weights (fp32, EMA included) and what is needed to rebuild the model
(`maskvid generate` for stage 2, `maskvid.models.tokenizer_checkpoint.load_tokenizer` for stage 1). No
optimizer or loop state, so it is a fraction of the size. Written atomically.

examples:
  maskvid ckpt export runs/maskgit_demo/checkpoints/last.ckpt --out maskgit.pt
  maskvid ckpt export runs/big/checkpoints/step=20000.ckpt --out big.pt     # a sharded directory
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="checkpoint file or sharded checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="the single file to write")


def run(args: argparse.Namespace) -> int:
    from maskvid.launch.checkpoints import CheckpointFormatError, export

    try:
        out = export(args.checkpoint, args.out)
    except CheckpointFormatError as e:
        print(f"maskvid ckpt export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0
