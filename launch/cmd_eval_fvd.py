"""FVD and KVD between real and generated videos (folders of mp4s, shards, or cached stats).

Both sets go through the frozen I3D given by --i3d (a state_dict or the TorchScript detector
StyleGAN-V made popular, i3d_torchscript.pt; nothing is downloaded) with the reference
preprocessing: the first --num-frames frames of each video (16; shorter videos are stretched by
repeating frames), center-cropped square, resized bilinearly to 224x224, values in [-1, 1]; the
features are the 400-d logits. FVD compares the Gaussians fitted to the two feature sets. It
grows with fewer videos, so compare numbers made with the same count: the report is FVD_N, with
N the number of generated videos (papers mostly use 2048). KVD (Kernel Video Distance, KID's
unbiased polynomial-kernel MMD on the same features) is reported beside it, as MeBT does.

Long videos: --window-stride S scores every --num-frames window, S frames apart, of the first
--max-frames frames of each video (MeBT's FVD over sliding windows); each window counts as a clip.

--real takes a folder of videos, video shards (a folder of .tar, a brace pattern, URLs), or a
statistics file from `maskvid eval real-stats` (computed once, reused for every evaluation).
--fake takes a folder (e.g. the output of `maskvid generate`) or shards. Undecodable videos are
skipped and counted. Exits 2 with a one-line error on a missing or mismatched I3D file, or fewer
than 2 readable videos on a side.

examples:
  maskvid eval fvd --real data/synthetic/val --fake samples/ --i3d ~/models/i3d_torchscript.pt
  maskvid eval real-stats --data data/synthetic/val --i3d i3d.pt --out stats/val.pt
  maskvid eval fvd --real stats/val.pt --fake samples/ --i3d i3d.pt --json fvd.json
  maskvid eval fvd --real long_real/ --fake long_samples/ --i3d i3d.pt --window-stride 16 --max-frames 128
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
    parser.add_argument("--window-stride", type=int, default=None, metavar="S",
                        help="score sliding windows of --num-frames frames, S frames apart, over the first "
                        "--max-frames frames of each video (default: only the first --num-frames frames)")
    parser.add_argument("--max-frames", type=int, default=128, metavar="N",
                        help="with --window-stride: frames decoded per video (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="videos per I3D batch (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--real", required=True, metavar="DIR|SHARDS|STATS.pt",
                        help="real videos: folder, shards, or a statistics file from `maskvid eval real-stats`")
    parser.add_argument("--fake", required=True, metavar="DIR|SHARDS", help="generated videos: folder or shards")
    add_feature_arguments(parser)
    parser.add_argument("--kvd-subsets", type=int, default=100, help="KVD: random subsets averaged (default: %(default)s)")
    parser.add_argument("--kvd-subset-size", type=int, default=1000,
                        help="KVD: videos per subset, capped at the smaller set (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON")


def open_features(args: argparse.Namespace):
    """The I3D feature extractor on the chosen device; DataError for bad options or weights."""
    import torch

    from maskvid.metrics.i3d import I3DWeightsError, load_i3d

    if args.num_frames < 1 or args.batch_size < 1 or (args.max_videos is not None and args.max_videos < 1):
        raise DataError("--num-frames, --batch-size and --max-videos must be >= 1")
    if args.window_stride is not None and (args.window_stride < 1 or args.max_frames < args.num_frames):
        raise DataError("--window-stride must be >= 1 and --max-frames at least --num-frames")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        return load_i3d(args.i3d, num_frames=args.num_frames, device=device), device
    except I3DWeightsError as exc:
        raise DataError(str(exc)) from None


def feature_info(args: argparse.Namespace, extract) -> dict:
    """What the features depend on, sliding windows included (recorded with cached statistics)."""
    return {**extract.info(), "window_stride": args.window_stride,
            "max_frames": args.max_frames if args.window_stride else None}


def features_of(spec: str, args: argparse.Namespace, extract, device, label: str):
    """Every clip's (or window's) I3D features [N, D], float64 on the CPU, and the videos read."""
    import torch
    from tqdm import tqdm

    from maskvid.metrics.video_sets import VideoSet, set_features
    from maskvid.metrics.windows import sliding_windows

    stride = args.window_stride
    frames = args.max_frames if stride else args.num_frames
    videos = VideoSet(spec, frames, args.resolution, args.max_videos)
    seen = [0]

    def per_clip(x):
        seen[0] += x.shape[0]
        return extract(sliding_windows(x, args.num_frames, stride) if stride else x)

    with tqdm(desc=label, unit="video", disable=args.quiet) as bar:
        rows = [f.double().cpu() for f in set_features(videos, per_clip, args.batch_size, device, progress=bar)]
    if videos.skipped:
        print(f"{label}: skipped {videos.skipped} unreadable video(s)")
    features = torch.cat(rows) if rows else torch.zeros(0, extract.num_features, dtype=torch.float64)
    if features.shape[0] < 2:
        raise DataError(f"{spec}: FVD needs at least 2 clips, found {features.shape[0]} readable "
                        f"({videos.skipped} skipped)")
    return features, seen[0]


def gaussian(features):
    from maskvid.metrics.frechet import GaussianStats

    return GaussianStats.from_sums(features.sum(0), features.T @ features, features.shape[0])


def run(args: argparse.Namespace) -> int:
    from maskvid.metrics.frechet import stats_distance
    from maskvid.metrics.fvd import FVDStatsError, load_cached
    from maskvid.metrics.kvd import kernel_distance

    extract, device = open_features(args)
    if Path(args.real).is_file() and args.real.endswith((".pt", ".pth")):
        try:
            real, real_rows = load_cached(args.real, feature_info(args, extract))
        except FVDStatsError as exc:
            raise DataError(str(exc)) from None
    else:
        real_rows, _ = features_of(args.real, args, extract, device, "real")
        real = gaussian(real_rows)
    fake_rows, fake_videos = features_of(args.fake, args, extract, device, "generated")
    fake = gaussian(fake_rows)
    fvd = float(stats_distance(real, fake))
    result = {"fvd": fvd, "name": f"fvd_{fake_videos}", "num_real": real.count, "num_fake": fake.count,
              "num_fake_videos": fake_videos, "num_frames": args.num_frames, "window_stride": args.window_stride,
              "i3d": str(args.i3d), "real": str(args.real), "fake": str(args.fake)}
    clips = f"{args.num_frames}-frame windows every {args.window_stride} frames" if args.window_stride else (
        f"{args.num_frames} frames")
    print(f"FVD_{fake_videos}: {fvd:.4f}  ({real.count} real, {fake.count} generated clips, {clips}, I3D {args.i3d})")
    if real_rows is None:
        print("KVD: not computed (the statistics file holds no feature rows; remake it with `maskvid eval real-stats`)")
    else:
        kvd, kvd_std = kernel_distance(real_rows, fake_rows, args.kvd_subsets, args.kvd_subset_size)
        result.update(kvd=float(kvd), kvd_std=float(kvd_std))
        print(f"KVD_{fake_videos}: {float(kvd):.6f} ± {float(kvd_std):.6f}  (x1000 as papers print it: "
              f"{1000 * float(kvd):.3f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0
