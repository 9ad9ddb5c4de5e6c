"""Stream batches through VideoDataModule and save what the model would see (PNG sheet + mp4s).

Reads the `data:` section of a config (the same YAML `maskvid fit` takes), applies overrides, pulls
a few batches from the train or val stream and writes:
  OUT/preview-<split>.png    clips × frames with their captions (padded frames dimmed)
  OUT/clips/*.mp4            the clips of the first batch
  OUT/preview-<split>.json   shapes, value range, frame-mask fill, skips and clips/s

example:
  maskvid data preview --config configs/data/synthetic.yaml --split val --out runs/preview
  maskvid data preview --shards 'shards/mine/shard-{000000..000009}.tar' --num-frames 17
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from maskvid.datamodules.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML with a `data:` section (e.g. configs/data/synthetic.yaml)")
    parser.add_argument("--shards", help="shard URLs for the chosen split (overrides the config)")
    parser.add_argument("--split", choices=["train", "val"], default="train", help="which stream (default: train)")
    parser.add_argument("--batches", type=int, default=2, help="batches to pull (default: 2)")
    parser.add_argument("--out", default="runs/preview", help="output folder (default: runs/preview)")
    parser.add_argument("--num-frames", type=int, help="override data.num_frames")
    parser.add_argument("--resolution", type=int, help="override data.resolution")
    parser.add_argument("--batch-size", type=int, help="override data.batch_size")
    parser.add_argument("--num-workers", type=int, help="override data.num_workers")
    parser.add_argument("--seed", type=int, help="override data.seed")


def data_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """VideoDataModule kwargs from --config's data section plus command-line overrides."""
    kwargs: dict[str, Any] = {}
    if args.config:
        import yaml

        try:
            doc = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise DataError(f"cannot read config {args.config}: {e}") from e
        section = doc.get("data", doc)
        kwargs = dict(section.get("init_args", section))
    if args.shards:
        kwargs[f"{args.split}_shards"] = args.shards
    for name in ("num_frames", "resolution", "batch_size", "num_workers", "seed"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    if not kwargs.get(f"{args.split}_shards"):
        raise DataError(f"no {args.split} shards: pass --shards or a --config with data.{args.split}_shards")
    return kwargs


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from maskvid.datamodules.preview import contact_sheet, save_batch_videos
    from maskvid.datamodules.video_datamodule import VideoDataModule

    kwargs = data_kwargs(args)
    try:
        dm = VideoDataModule(**kwargs)
    except TypeError as e:
        raise DataError(f"bad data option: {e}") from e
    loader = dm.train_dataloader() if args.split == "train" else dm.val_dataloader()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    batches = []
    for batch in tqdm(loader, total=args.batches, desc=f"streaming {args.split}", unit="batch"):
        batches.append(batch)
        if len(batches) >= args.batches:
            break
    elapsed = time.perf_counter() - start
    if not batches:
        raise DataError(f"the {args.split} stream produced no batches (all samples bad?)")
    first = batches[0]
    video = first["video"]
    clips = sum(b["video"].shape[0] for b in batches)
    sheet = contact_sheet(video, first["caption"], first["frame_mask"])
    sheet_path = out / f"preview-{args.split}.png"
    sheet.save(sheet_path)
    fps = float(first["meta"]["info"][0].get("fps") or 8.0)
    mp4s = save_batch_videos(video, out / "clips", fps=fps, prefix=args.split)
    summary = {
        "split": args.split,
        "batches": len(batches),
        "clips": clips,
        "clips_per_s": round(clips / elapsed, 2),
        "video": {"shape": list(video.shape), "dtype": str(video.dtype), "min": round(video.min().item(), 4), "max": round(video.max().item(), 4)},
        "frame_mask_fill": round(first["frame_mask"].float().mean().item(), 4),
        "captions": first["caption"],
        "keys": first["meta"]["key"],
        "skipped": dm.skipped if args.split == "train" else int(first["meta"]["skipped"]),
        "sheet": str(sheet_path),
        "videos": [str(p) for p in mp4s],
    }
    (out / f"preview-{args.split}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0
