"""Run the built-in demo end to end on synthetic data (CPU or GPU), writing what it saw.

Today the demo covers the data pipeline: it renders the synthetic captioned dataset (moving
coloured shapes) as WebDataset shards, streams train and val batches through VideoDataModule
exactly as `maskvid fit` would, reads every val clip back with the attribute oracle (a check
that decoding, cropping and normalisation preserved the content), and saves:

  OUT/preview-train.png, OUT/preview-val.png   clips x frames with captions
  OUT/clips/*.mp4                              the first val batch as videos
  OUT/demo.json                                shapes, ranges, clips/s, oracle accuracy

Existing demo data is reused unless --rebuild. Model training joins the demo as the tokenizer
and stage-2 models land.

example:
  maskvid demo
  maskvid demo --out runs/demo2 --num-train 2048 --rebuild
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from datamodules.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="where previews and demo.json go (default: runs/demo)")
    parser.add_argument("--data-dir", default="data/synthetic",
                        help="synthetic shards (default: data/synthetic, what configs/data/synthetic.yaml reads)")
    parser.add_argument("--num-train", type=int, default=512, help="train clips to render (default: 512)")
    parser.add_argument("--num-val", type=int, default=64, help="val clips to render (default: 64)")
    parser.add_argument("--num-heldout", type=int, default=64, help="held-out-combination clips (default: 64)")
    parser.add_argument("--frames", type=int, default=17, help="frames per clip (default: 17)")
    parser.add_argument("--size", type=int, default=64, help="frame size in pixels (default: 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per batch (default: 8)")
    parser.add_argument("--workers", type=int, default=2, help="data worker processes (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data and stream (default: 0)")
    parser.add_argument("--rebuild", action="store_true", help="re-render the synthetic data even if present")


def _build_data(args: argparse.Namespace) -> dict[str, Any]:
    from datamodules.synthetic import build_synthetic

    data_dir = Path(args.data_dir)
    marker = data_dir / "attributes.json"
    if marker.exists() and not args.rebuild:
        info = json.loads(marker.read_text())
        print(f"[1/4] reusing synthetic data in {data_dir} (pass --rebuild to re-render)")
        return info
    print(f"[1/4] rendering synthetic data into {data_dir}")
    build_synthetic(
        data_dir,
        seed=args.seed,
        num_train=args.num_train,
        num_val=args.num_val,
        num_heldout=args.num_heldout,
        size=args.size,
        frames=args.frames,
        samples_per_shard=max(16, args.num_train // 8),
        workers=args.workers,
        overwrite=True,
    )
    return json.loads(marker.read_text())


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from datamodules.pixels import to_uint8
    from datamodules.preview import contact_sheet, save_batch_videos
    from datamodules.video_datamodule import VideoDataModule
    from metrics.oracle import caption_accuracy

    info = _build_data(args)
    data_dir = Path(args.data_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dm = VideoDataModule(
        train_shards=str(data_dir / "train"),
        val_shards=str(data_dir / "val"),
        num_frames=int(info.get("frames", args.frames)),
        resolution=int(info.get("size", args.size)),
        batch_size=args.batch_size,
        num_workers=args.workers,
        seed=args.seed,
    )

    print("[2/4] streaming train batches (resampled, shuffled, random temporal crops)")
    train_batches = []
    start = time.perf_counter()
    for batch in tqdm(dm.train_dataloader(), total=4, desc="train stream", unit="batch"):
        train_batches.append(batch)
        if len(train_batches) == 4:
            break
    train_rate = 4 * args.batch_size / (time.perf_counter() - start)

    print("[3/4] streaming the whole val split and reading it back with the oracle")
    videos, attrs, val_batches = [], [], []
    for batch in tqdm(dm.val_dataloader(), desc="val stream", unit="batch"):
        val_batches.append(batch)
        videos += list(to_uint8(batch["video"]))
        attrs += batch["meta"]["info"]
    if not videos:
        raise DataError(f"the val split in {data_dir / 'val'} produced no clips")
    accuracy = caption_accuracy(videos, attrs)

    print(f"[4/4] writing previews to {out}")
    first_train, first_val = train_batches[0], val_batches[0]
    contact_sheet(first_train["video"], first_train["caption"], first_train["frame_mask"]).save(out / "preview-train.png")
    contact_sheet(first_val["video"], first_val["caption"], first_val["frame_mask"]).save(out / "preview-val.png")
    mp4s = save_batch_videos(first_val["video"], out / "clips", fps=float(info.get("fps", 8.0)), prefix="val")
    video = first_train["video"]
    summary = {
        "data": str(data_dir),
        "train_batch": {"video": list(video.shape), "dtype": str(video.dtype),
                        "range": [round(video.min().item(), 3), round(video.max().item(), 3)],
                        "frame_mask": list(first_train["frame_mask"].shape), "captions": first_train["caption"][:4]},
        "train_clips_per_s": round(train_rate, 1),
        "val_clips": len(videos),
        "oracle_accuracy_on_val": {k: round(v, 4) for k, v in accuracy.items() if k != "n"},
        "skipped_samples": dm.skipped,
        "previews": [str(out / "preview-train.png"), str(out / "preview-val.png")],
        "videos": [str(p) for p in mp4s[:3]] + (["..."] if len(mp4s) > 3 else []),
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"\ndone. Look at {out / 'preview-train.png'}; train on this data with "
          f"`maskvid fit --config configs/data/synthetic.yaml --config configs/trainer/cpu.yaml --model ...`")
    return 0
