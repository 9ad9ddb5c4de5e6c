"""Build WebDataset video shards from your captioned videos (mp4, webm, mkv, avi, mov, gif, ...),
or image shards from captioned images (--images) for joint image-video training

Input is one of:
  - a folder, scanned recursively, where each video has a caption in a sidecar text file next to
    it (clip.mp4 + clip.txt, or clip.mp4.txt); every file other than .txt/.json/.jsonl/.md/.csv
    and hidden files is tried as a video;
  - a JSONL manifest with one {"path": "clips/a.mp4", "caption": "a dog runs"} per line, paths
    relative to the manifest;
  - a CSV (--csv) such as WebVid's results_2M_train.csv, with the videos already downloaded into
    --videos DIR. Caption column: name (or caption). Each row's file is the first that exists of:
    DIR/PATH (column path), DIR/VIDEOID.mp4 and DIR/PAGE_DIR/VIDEOID.mp4 (columns videoid,
    page_dir), DIR/<file name of contentUrl>. Nothing is downloaded.
  - with --images instead of --videos: a folder of images (jpg, png, webp, bmp, tiff) with
    sidecar captions (cat.jpg + cat.txt), or a JSONL manifest of images. Each sample holds the
    image (jpg/png/webp: stored as is unless it must be turned upright or downscaled to
    --max-size), txt and json (kind "image", width, height, source, ...); other files are
    skipped as "not an image". Train on them beside video shards with data.image_shards and
    data.image_ratio.

Each video is decoded upright (rotation metadata applied), optionally resampled to --fps,
downscaled to --max-size and cut to --max-frames, and re-encoded as h264 mp4. Each sample in
the tar shards holds mp4, txt (the caption) and json (fps, num_frames, width, height, duration,
source, source_codec, ...; plus videoid and url for CSV rows).

Inputs that cannot be used are skipped, never fatal, and listed with a reason in the report
(default OUT/report.json): missing file, unreadable or corrupt, no video stream, zero frames,
missing caption, empty caption, bad manifest line (a JSONL line or CSV row that cannot be
parsed). The summary printed at the end counts them by reason and names the first few. The
command exits 0 when at least one video was written, and 2 with a one-line error when nothing
was usable, the input does not exist, a CSV lacks the columns it needs, the output is not
writable, or OUT already holds shards (pass --overwrite to replace them).

examples:
  maskvid data shards --videos ~/clips --out shards/mine
  maskvid data shards --videos clips/manifest.jsonl --out shards/mine --fps 8 --max-size 256 \\
      --samples-per-shard 500 --workers 8
  maskvid data shards --videos ~/clips --out shards/uncond --empty-caption keep --overwrite
  maskvid data shards --csv results_2M_train.csv --videos ~/webvid/videos --out shards/webvid \\
      --fps 8 --max-size 256 --workers 16
  maskvid data shards --images ~/photos --out shards/images --max-size 256

Shards that video2dataset wrote (mp4 + txt + json per sample) need no conversion: pass their
folder or brace pattern to data.train_shards / data.val_shards as they are.
"""

from __future__ import annotations

import argparse

from maskvid.datamodules.shards import X264_PRESETS, EncodeOptions, build_shards, default_workers
from maskvid.launch.arg_types import non_negative_int, positive_float, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input and output")
    source = io.add_mutually_exclusive_group(required=True)
    source.add_argument("--videos", metavar="DIR|MANIFEST.jsonl",
                        help="folder of videos with sidecar .txt captions, or a JSONL manifest; "
                        "with --csv, the folder the CSV's videos are in")
    source.add_argument("--images", metavar="DIR|MANIFEST.jsonl",
                        help="folder of images (jpg, png, webp, bmp, tiff) with sidecar .txt "
                        "captions, or a JSONL manifest of images: image shards for "
                        "data.image_shards (joint image-video training)")
    io.add_argument("--csv", default=None, metavar="CSV",
                    help="CSV listing the videos (WebVid's columns: videoid, contentUrl, name; "
                    "or path and caption); rows whose file is missing are skipped and reported")
    io.add_argument("--out", required=True, metavar="DIR", help="folder for the shards")
    io.add_argument("--report", metavar="PATH", default=None,
                    help="where to write the JSON report (default: OUT/report.json)")
    io.add_argument("--prefix", default="shard",
                    help="shard file name prefix: PREFIX-000000.tar ... (default: %(default)s)")
    io.add_argument("--samples-per-shard", type=positive_int, default=1000, metavar="N",
                    help="samples per tar shard (default: %(default)s)")
    io.add_argument("--overwrite", action="store_true",
                    help="replace shards already in OUT (otherwise the command refuses)")

    video = parser.add_argument_group("video")
    video.add_argument("--fps", type=positive_float, default=None,
                       help="resample to this frame rate, dropping or repeating frames "
                       "(default: keep the source rate)")
    video.add_argument("--max-size", type=positive_int, default=None, metavar="PIXELS",
                       help="downscale so the short side is at most this (default: keep size)")
    video.add_argument("--max-frames", type=positive_int, default=None, metavar="N",
                       help="keep at most N frames of each video (default: all)")
    video.add_argument("--crf", type=int, default=18, metavar="0..51",
                       help="h264 quality, lower is better and bigger (default: %(default)s)")
    video.add_argument("--preset", default="veryfast", choices=X264_PRESETS,
                       help="libx264 speed preset (default: %(default)s)")

    run_group = parser.add_argument_group("captions and run")
    run_group.add_argument("--empty-caption", choices=("skip", "keep"), default="skip",
                           help="videos with a missing or empty caption: skip them, or keep "
                           "them with caption \"\" for unconditional training (default: skip)")
    run_group.add_argument("--workers", type=non_negative_int, default=default_workers(),
                           metavar="N", help="worker processes; 0 or 1 runs in this process "
                           "(default: %(default)s, i.e. min(4, CPUs))")
    run_group.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    options = EncodeOptions(fps=args.fps, max_size=args.max_size, max_frames=args.max_frames,
                            crf=args.crf, preset=args.preset)
    report = build_shards(
        args.images or args.videos,
        args.out,
        options=options,
        samples_per_shard=args.samples_per_shard,
        prefix=args.prefix,
        empty_caption=args.empty_caption,
        workers=args.workers,
        overwrite=args.overwrite,
        report_path=args.report,
        progress=not args.quiet,
        csv=args.csv,
        images=args.images is not None,
    )
    kept = len(report.kept_empty_captions)
    extra = f" ({kept} with empty captions)" if kept else ""
    print(f"{report.written} written{extra} to {report.pattern}, "
          f"{len(report.skipped)} skipped, see {report.report_path}")
    if report.skipped:
        print(skipped_summary(report.reason_counts(), [s.path for s in report.skipped]))
    return 0


def skipped_summary(counts: dict[str, int], names: list[str], shown: int = 5) -> str:
    """One line: skips per reason, then the first few inputs skipped."""
    by_reason = ", ".join(f"{n} {reason}" for reason, n in counts.items())
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return f"skipped: {by_reason}; first: {', '.join(names[:shown])}{more}"
