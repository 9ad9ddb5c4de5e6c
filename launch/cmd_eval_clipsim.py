"""CLIPSIM of generated videos against their prompts, with a local CLIP model directory.

CLIPSIM is the mean over videos of the mean over frames of the raw cosine between each frame's
CLIP image embedding and the prompt's text embedding (in [-1, 1]; not CLIPScore's 100*max(cos, 0)).
Videos and prompts come from a folder written by `maskvid generate` (its index.json), or any
folder of videos with sidecar captions (clip.mp4 + clip.txt or clip.mp4.txt). --clip is a Hugging
Face CLIP directory (save_pretrained layout, e.g. a downloaded openai/clip-vit-base-patch32);
nothing is downloaded.

examples:
  maskvid eval clipsim --videos samples/ --clip ~/models/clip-vit-base-patch32
  maskvid eval clipsim --videos samples/ --clip ~/models/clip-vit-base-patch32 --max-frames 8 --json clip.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from maskvid.datamodules.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--videos", required=True, type=Path, metavar="DIR",
                        help="generated videos: a `maskvid generate` output folder, or videos with sidecar .txt captions")
    parser.add_argument("--clip", required=True, metavar="DIR", help="local Hugging Face CLIP directory")
    parser.add_argument("--max-frames", type=int, default=None, metavar="N",
                        help="use the first N frames of each video (default: all)")
    parser.add_argument("--batch-size", type=int, default=4, help="videos per CLIP batch (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def captioned_videos(folder: Path) -> list[tuple[Path, str]]:
    """(video, prompt) pairs from index.json, else from sidecar caption files."""
    from maskvid.metrics.video_sets import video_files

    if not folder.is_dir():
        raise DataError(f"not a folder: {folder}")
    index = folder / "index.json"
    if index.is_file():
        try:
            items = json.loads(index.read_text())
            pairs = [(Path(item["path"]), item["prompt"]) for item in items]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{index}: expected a list of {{\"path\": ..., \"prompt\": ...}} (from maskvid generate)") from None
        # A story's prompt is a list of scenes; CLIPSIM needs one caption per video.
        pairs = [(p if p.is_absolute() or p.exists() else folder / p.name, prompt) for p, prompt in pairs
                 if isinstance(prompt, str)]
    else:
        pairs = []
        for path in video_files(folder):
            sidecar = next((c for c in (path.with_suffix(".txt"), Path(f"{path}.txt")) if c.is_file()), None)
            if sidecar is not None and sidecar.read_text().strip():
                pairs.append((path, sidecar.read_text().strip()))
    if not pairs:
        raise DataError(f"no captioned videos in {folder} (need index.json or sidecar .txt captions)")
    return pairs


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from maskvid.datamodules.pixels import to_model
    from maskvid.datamodules.video_io import VideoDecodeError, decode_all
    from maskvid.metrics.clip_model import CLIPLoadError
    from maskvid.metrics.clipsim import CLIPSimilarity

    if args.batch_size < 1 or (args.max_frames is not None and args.max_frames < 1):
        raise DataError("--batch-size and --max-frames must be >= 1")
    pairs = captioned_videos(args.videos)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        metric = CLIPSimilarity(args.clip).to(device)
    except CLIPLoadError as exc:
        raise DataError(str(exc)) from None
    skipped = 0
    batch: list[tuple[np.ndarray, str]] = []

    def flush() -> None:
        # Videos of different lengths or sizes go one by one.
        groups: dict[tuple, list] = {}
        for frames, prompt in batch:
            groups.setdefault(frames.shape, []).append((frames, prompt))
        for items in groups.values():
            pixels = torch.from_numpy(np.stack([f for f, _ in items]))
            metric.update(to_model(pixels).to(device), [p for _, p in items])
        batch.clear()

    for path, prompt in tqdm(pairs, desc="clipsim", unit="video", disable=args.quiet):
        try:
            batch.append((decode_all(path.read_bytes(), max_frames=args.max_frames), prompt))
        except (VideoDecodeError, OSError):
            skipped += 1
            continue
        if len(batch) >= args.batch_size:
            flush()
    flush()
    count = int(metric.count)
    if count == 0:
        raise DataError(f"no readable videos in {args.videos} ({skipped} skipped)")
    value = float(metric.compute())
    print(f"CLIPSIM: {value:.4f}  ({count} videos{f', {skipped} unreadable skipped' if skipped else ''}, CLIP {args.clip})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"clipsim": value, "num_videos": count, "clip": str(args.clip)}, indent=2))
    return 0
