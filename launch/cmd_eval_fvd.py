"""Fréchet Video Distance between real and generated videos (folders of mp4s, shards, or cached stats).

Both sets go through the frozen I3D given by --i3d (a state_dict or the TorchScript detector
StyleGAN-V made popular, i3d_torchscript.pt; nothing is downloaded) with the reference
preprocessing: the first --num-frames frames of each video (16; shorter videos are stretched by
repeating frames), center-cropped square, resized bilinearly to 224x224, values in [-1, 1]; the
features are the 400-d logits. FVD compares the Gaussians fitted to the two feature sets. It
grows with fewer videos, so compare numbers made with the same count: the report is FVD_N, with
N the number of generated videos (papers mostly use 2048).

--real takes a folder of videos, video shards (a folder of .tar, a brace pattern, URLs), or a
statistics file from `maskvid eval real-stats` (computed once, reused for every evaluation).
--fake takes a folder (e.g. the output of `maskvid generate`) or shards. Undecodable videos are
skipped and counted. Exits 2 with a one-line error on a missing or mismatched I3D file, or fewer
than 2 readable videos on a side.

examples:
  maskvid eval fvd --real data/synthetic/val --fake samples/ --i3d ~/models/i3d_torchscript.pt
  maskvid eval real-stats --data data/synthetic/val --i3d i3d.pt --out stats/val.pt
  maskvid eval fvd --real stats/val.pt --fake samples/ --i3d i3d.pt --json fvd.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from maskvid.datamodules.errors import DataError


def add_feature_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that decide the features (shared with `eval real-stats`)."""
    parser.add_argument("--i3d", required=True, metavar="PATH",
                        help="I3D weights: state_dict (.pt/.pth) or TorchScript file (i3d_torchscript.pt)")
    parser.add_argument("--num-frames", type=int, default=16,
                        help="frames per clip fed to I3D (default: %(default)s, the reference FVD)")
    parser.add_argument("--resolution", type=int, default=None, metavar="PIXELS",
                        help="resize the short side to this and center-crop before I3D's own resize to 224, "
                        "as the datamodule cuts training clips (default: center-crop only)")
    parser.add_argument("--max-videos", type=int, default=None, metavar="N",
                        help="use at most N videos of each set (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="videos per I3D batch (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--real", required=True, metavar="DIR|SHARDS|STATS.pt",
                        help="real videos: folder, shards, or a statistics file from `maskvid eval real-stats`")
    parser.add_argument("--fake", required=True, metavar="DIR|SHARDS", help="generated videos: folder or shards")
    add_feature_arguments(parser)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON")


def open_features(args: argparse.Namespace):
    """The I3D feature extractor on the chosen device; DataError for bad options or weights."""
    import torch

    from maskvid.metrics.i3d import I3DWeightsError, load_i3d

    if args.num_frames < 1 or args.batch_size < 1 or (args.max_videos is not None and args.max_videos < 1):
        raise DataError("--num-frames, --batch-size and --max-videos must be >= 1")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        return load_i3d(args.i3d, num_frames=args.num_frames, device=device), device
    except I3DWeightsError as exc:
        raise DataError(str(exc)) from None


def statistics(spec: str, args: argparse.Namespace, extract, device, label: str):
    from tqdm import tqdm

    from maskvid.metrics.video_sets import VideoSet, set_statistics

    videos = VideoSet(spec, args.num_frames, args.resolution, args.max_videos)
    with tqdm(desc=label, unit="video", disable=args.quiet) as bar:
        stats = set_statistics(videos, extract, args.batch_size, device, progress=bar)
    if videos.skipped:
        print(f"{label}: skipped {videos.skipped} unreadable video(s)")
    return stats


def run(args: argparse.Namespace) -> int:
    from maskvid.metrics.frechet import stats_distance
    from maskvid.metrics.fvd import FVDStatsError, load_stats

    extract, device = open_features(args)
    if Path(args.real).is_file() and args.real.endswith((".pt", ".pth")):
        try:
            real = load_stats(args.real, extract.info())
        except FVDStatsError as exc:
            raise DataError(str(exc)) from None
    else:
        real = statistics(args.real, args, extract, device, "real")
    fake = statistics(args.fake, args, extract, device, "generated")
    fvd = float(stats_distance(real, fake))
    result = {"fvd": fvd, "name": f"fvd_{fake.count}", "num_real": real.count, "num_fake": fake.count,
              "num_frames": args.num_frames, "i3d": str(args.i3d), "real": str(args.real), "fake": str(args.fake)}
    print(f"FVD_{fake.count}: {fvd:.4f}  ({real.count} real, {fake.count} generated videos, "
          f"{args.num_frames} frames, I3D {args.i3d})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0
