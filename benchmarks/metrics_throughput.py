"""Evaluation-metric throughput: videos/s of I3D feature extraction (FVD) and of CLIP scoring
(CLIPSIM), with random-weight full-size networks, on this machine.

- i3d: `maskvid.metrics.i3d.I3DFeatures` on the Kinetics-400 InceptionI3d (12.7 M parameters), exactly as
  FVD runs it: a batch of generated-size videos (--resolution, --frames) is fitted to 16 frames,
  resized bilinearly to 224x224 and pushed through the network. FLOPs from
  torch.utils.flop_counter, compared with the matmul roof measured next to it.
- clip: `maskvid.metrics.clipsim.CLIPSimilarity` with a ViT-B/32-sized CLIP (transformers' CLIPConfig
  defaults: 151 M parameters): every frame through the CLIP image processor (pillow bicubic
  resize to 224 + center crop) and the vision tower, the captions through the text tower.
  Reported per video (all its frames) and per frame.

Weights are random (nothing is downloaded); speed does not depend on them. The first pass of each
is a warm-up and is not timed.

    python benchmarks/metrics_throughput.py                          # batch 16, 16 frames, 64x64
    python benchmarks/metrics_throughput.py --batch-size 2 --frames 16 --repeats 1   # smoke run
    python benchmarks/metrics_throughput.py --device cuda --json-out benchmarks/results/metrics.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from common import emit, matmul_roof, peak_rss_mib  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, repeats: int, warmup: int, device: str) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def bench_i3d(args) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from maskvid.metrics.i3d import I3DFeatures, InceptionI3d

    torch.manual_seed(0)
    network = InceptionI3d()
    features = I3DFeatures(network, num_features=400).to(args.device)
    videos = torch.rand(args.batch_size, 3, args.frames, args.resolution, args.resolution, device=args.device) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        features(videos[:1])
    flops_per_video = counter.get_total_flops()
    times = _timed(lambda: features(videos), args.repeats, args.warmup, args.device)
    seconds = statistics.median(times)
    roof = matmul_roof(args.device, repeats=3)
    return {
        "videos_per_s": args.batch_size / seconds,
        "seconds_per_batch": seconds,
        "gflop_per_video": flops_per_video / 1e9,
        "fraction_of_roof": flops_per_video * args.batch_size / seconds / 1e9 / roof,
        "params_m": sum(p.numel() for p in network.parameters()) / 1e6,
        "times": times,
    }


def bench_clip(args) -> dict:
    from maskvid.metrics.clip_model import write_random_clip
    from maskvid.metrics.clipsim import CLIPSimilarity

    with tempfile.TemporaryDirectory() as tmp:
        # CLIPConfig's defaults are ViT-B/32; the real 49408-token embedding table, though the
        # byte-level test tokenizer uses only its first 514 rows.
        model = write_random_clip(Path(tmp) / "clip-b32", text={"vocab_size": 49408})
        params = sum(p.numel() for p in model.parameters()) / 1e6
        del model
        metric = CLIPSimilarity(Path(tmp) / "clip-b32").to(args.device)
    videos = torch.rand(args.batch_size, 3, args.frames, args.resolution, args.resolution, device=args.device) * 2 - 1
    captions = [f"a red circle moving left, number {i}" for i in range(args.batch_size)]
    times = _timed(lambda: metric.update(videos, captions), args.repeats, args.warmup, args.device)
    seconds = statistics.median(times)
    return {
        "videos_per_s": args.batch_size / seconds,
        "frames_per_s": args.batch_size * args.frames / seconds,
        "seconds_per_batch": seconds,
        "params_m": params,
        "times": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints JSON: for i3d and clip, videos_per_s, seconds_per_batch and the raw timings; "
        "i3d also gflop_per_video and fraction_of_roof (this machine's dense fp32 matmul speed).",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="videos per batch (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=16, help="frames per video (default: %(default)s, FVD's clip length)")
    parser.add_argument("--resolution", type=int, default=64,
                        help="side of the generated videos before I3D/CLIP resize them to 224 (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches, median reported (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first (default: %(default)s)")
    parser.add_argument("--only", choices=("i3d", "clip"), default=None, help="run one of the two (default: both)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    result = {
        "config": {"batch_size": args.batch_size, "frames": args.frames, "resolution": args.resolution,
                   "repeats": args.repeats, "device": args.device, "torch_threads": torch.get_num_threads()},
    }
    with torch.inference_mode():
        if args.only in (None, "i3d"):
            result["i3d"] = bench_i3d(args)
        if args.only in (None, "clip"):
            result["clip"] = bench_clip(args)
    result["peak_rss_mib"] = peak_rss_mib()
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
