"""Make the built-in synthetic captioned dataset (moving coloured shapes) as video shards.

Renders clips of one coloured shape moving left, right, up or down (varying speed, size and
background), captions them from templates, and writes WebDataset shards:

  OUT/train/shard-*.tar     seen (colour, shape, direction) combinations
  OUT/val/shard-*.tar       seen combinations, other samples
  OUT/heldout/shard-*.tar   only the held-out combinations, to measure composition
  OUT/prompts_seen.txt, OUT/prompts_heldout.txt (+ .jsonl with attributes), OUT/attributes.json

The same --seed gives byte-identical shards whatever --workers is.

example:
  maskvid data synthetic --out data/synthetic
  maskvid data synthetic --out data/tiny --num-train 256 --num-val 32 --size 32 --overwrite
  maskvid data synthetic --out data/easy --sizes large --backgrounds black   # less variation
"""

from __future__ import annotations

import argparse

from maskvid.datamodules.synthetic import BACKGROUNDS, HELDOUT_COMBOS, SIZES, SPEEDS, Variation, build_synthetic, seen_combos


def add_variation_arguments(parser: argparse.ArgumentParser, shown: Variation, default_all: bool = False) -> None:
    """--sizes/--speeds/--backgrounds (shared with `maskvid demo`). default_all: the parsed default
    is every value; otherwise None (the caller's recipe decides) and `shown` is what help names."""
    for flag, metavar, vocab, values in (("--sizes", "SIZE", SIZES, shown.sizes), ("--speeds", "SPEED", SPEEDS, shown.speeds),
                                         ("--backgrounds", "BACKGROUND", tuple(BACKGROUNDS), shown.backgrounds)):
        parser.add_argument(flag, nargs="+", metavar=metavar, default=list(vocab) if default_all else None,
                            help=f"synthetic {flag[2:]} to draw from, of {list(vocab)}; quote names with a space "
                                 f"(default: {' '.join(map(repr, values))})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="randomness of every sample (default: 0)")
    parser.add_argument("--num-train", type=int, default=1024, help="train clips (default: 1024)")
    parser.add_argument("--num-val", type=int, default=128, help="val clips (default: 128)")
    parser.add_argument(
        "--num-heldout", type=int, default=128, help="clips of held-out combinations (default: 128)"
    )
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels, even (default: 64)")
    parser.add_argument(
        "--frames", type=int, default=17, help="frames per clip; 1 + 4k suits temporal patch 4 (default: 17)"
    )
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate stored in the mp4 (default: 8)")
    parser.add_argument("--samples-per-shard", type=int, default=128, help="clips per shard (default: 128)")
    parser.add_argument(
        "--workers", type=int, default=None, help="render processes, 0 = in process (default: min(4, CPUs))"
    )
    add_variation_arguments(parser, Variation(), default_all=True)
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    variation = Variation(sizes=tuple(args.sizes), speeds=tuple(args.speeds), backgrounds=tuple(args.backgrounds))
    build = build_synthetic(
        args.out,
        seed=args.seed,
        num_train=args.num_train,
        num_val=args.num_val,
        num_heldout=args.num_heldout,
        size=args.size,
        frames=args.frames,
        fps=args.fps,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
        variation=variation,
    )
    print(
        f"synthetic dataset in {build.out_dir} (seed {args.seed}, {args.size}x{args.size}, "
        f"{args.frames} frames at {args.fps:g} fps)"
    )
    for split, pattern in build.patterns.items():
        print(f"  {split:<8} {build.counts[split]:>6} clips  {pattern}")
    print(f"  prompts  {len(seen_combos()):>6} seen     {build.prompt_files['seen']}")
    print(f"  prompts  {len(HELDOUT_COMBOS):>6} held out {build.prompt_files['heldout']}")
    return 0
