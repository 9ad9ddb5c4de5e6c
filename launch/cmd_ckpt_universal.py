"""Convert a DeepSpeed checkpoint to a universal one, loadable at any world size.

Resuming a DeepSpeed checkpoint at another number of processes does this by itself (next to the
checkpoint, as `<name>.universal`); this command does it ahead of time, e.g. on a CPU node before
a job with a different GPU count starts. Resume with `maskvid fit ... --ckpt_path OUT`.

example:
  maskvid ckpt universal runs/stage2/checkpoints/last.ckpt --out runs/stage2/checkpoints/last.universal
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="DeepSpeed checkpoint directory (holds a 'latest' file)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: CHECKPOINT.universal)")


def run(args: argparse.Namespace) -> int:
    from maskvid.checkpoint_files import CheckpointFormatError, deepspeed_world_size, to_universal

    out = args.out or args.checkpoint.with_name(args.checkpoint.name + ".universal")
    try:
        ranks = deepspeed_world_size(args.checkpoint)
        to_universal(args.checkpoint, out)
    except CheckpointFormatError as e:
        print(f"maskvid ckpt universal: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (from a checkpoint written by {ranks} ranks)")
    return 0
