"""Precompute the real videos' FVD/KVD features once (I3D feature mean, covariance and rows) into a file.

Real-video features cost as much as generated ones and never change, so compute them once and
reuse the file: `maskvid eval fvd --real STATS.pt`, or `fvd_real_stats: STATS.pt` in a stage-2
model config (required for FVD when training on token shards, which hold no pixels). The file
records the I3D's fingerprint, clip length and input size; using it with another I3D is refused.
Cut the clips as the model sees them (--resolution = data.resolution) so that real and generated
videos are compared alike. Options as for `maskvid eval fvd`.

examples:
  maskvid eval real-stats --data data/synthetic/val --i3d ~/models/i3d_torchscript.pt --out stats/val.pt
  maskvid eval real-stats --data 'shards/web-{000..099}.tar' --i3d i3d.pt --resolution 128 \\
      --max-videos 2048 --batch-size 32 --device cuda --out stats/web_2048.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from maskvid.launch.cmd_eval_fvd import add_feature_arguments, feature_info, features_of, gaussian, open_features


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR|SHARDS",
                        help="real videos: a folder of video files, or shards (folder of .tar, brace pattern, URLs)")
    parser.add_argument("--out", required=True, type=Path, metavar="STATS.pt", help="where to write the statistics")
    add_feature_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from maskvid.metrics.fvd import save_stats

    extract, device = open_features(args)
    rows, _ = features_of(args.data, args, extract, device, "real")
    stats = gaussian(rows)
    source = {"data": str(args.data), "clip_resolution": args.resolution, "max_videos": args.max_videos}
    save_stats(args.out, stats, feature_info(args, extract), source=repr(source), rows=rows)
    print(f"wrote FVD statistics of {stats.count} videos ({extract.num_features}-d I3D features, "
          f"{args.num_frames} frames) to {args.out}")
    return 0
