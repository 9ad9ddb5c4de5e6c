"""Measurements `maskvid demo` takes: the data-pipeline check, the oracle's caption accuracy of
generated videos, and metrics read back from the fits' logs (CSV or TensorBoard)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

from maskvid.datamodules.errors import DataError
from maskvid.launch.run_curves import curve_rows, read_curves


def intended_attributes(info: Optional[dict[str, Any]], caption: str) -> Optional[dict[str, Any]]:
    """What a clip should show: the synthetic json's true attributes, else its caption's if it
    parses (None: the oracle cannot score it)."""
    from maskvid.datamodules.synthetic import parse_caption

    return info if info and "colour" in info else parse_caption(caption)


def rounded(accuracy: dict[str, float]) -> dict[str, float]:
    """caption_accuracy's fractions to 4 digits, as summary.json records them."""
    return {k: round(v, 4) for k, v in accuracy.items()}


def check_data(train_shards: str, val_shards: str, out: Path, workers: int = 2, seed: int = 0,
               synthetic: bool = True, batch_size: int = 8, train_batches: int = 2, num_frames: int = 17
               ) -> dict[str, Any]:
    """Stream train and val exactly as `maskvid fit` does; previews, shapes, ranges, and (when the
    clips carry synthetic attributes) the oracle's reading of every val clip: decoding, cropping
    and normalisation must keep the content the captions describe."""
    from maskvid.datamodules.pixels import to_uint8
    from maskvid.datamodules.preview import contact_sheet
    from maskvid.datamodules.video_datamodule import VideoDataModule
    from maskvid.metrics.oracle import caption_accuracy

    dm = VideoDataModule(train_shards=train_shards, val_shards=val_shards, num_frames=num_frames, resolution=64,
                         batch_size=batch_size, num_workers=workers, seed=seed)
    start = time.perf_counter()
    first_train = None
    for i, batch in enumerate(dm.train_dataloader()):
        first_train = first_train or batch
        if i + 1 >= train_batches:
            break
    train_rate = train_batches * batch_size / (time.perf_counter() - start)
    videos, attrs, captions, first_val = [], [], [], None
    for batch in dm.val_dataloader():
        first_val = first_val or batch
        infos = batch["meta"]["info"] if synthetic else [None] * len(batch["caption"])
        for video, info, caption in zip(to_uint8(batch["video"]), infos, batch["caption"]):
            captions.append(caption)
            target = intended_attributes(info, caption)
            if target is not None:
                videos.append(video)
                attrs.append(target)
    if first_train is None or first_val is None:
        raise DataError(f"no clips streamed from {train_shards if first_train is None else val_shards}")
    contact_sheet(first_train["video"], first_train["caption"], first_train["frame_mask"]).save(out / "preview-train.png")
    contact_sheet(first_val["video"], first_val["caption"], first_val["frame_mask"]).save(out / "preview-val.png")
    if not synthetic:
        # The user's own val captions become the demo's prompts (unless --prompts is given).
        distinct = list(dict.fromkeys(c.strip().replace("\n", " ") for c in captions if c.strip()))
        (out / "prompts").mkdir(exist_ok=True)
        (out / "prompts/val_captions.txt").write_text("\n".join(distinct[:16]) + "\n")
    video = first_train["video"]
    accuracy = caption_accuracy(videos, attrs) if videos else None
    return {
        "train_batch": {"video": list(video.shape), "dtype": str(video.dtype),
                        "range": [round(video.min().item(), 3), round(video.max().item(), 3)]},
        "train_clips_per_s": round(train_rate, 1),
        "val_clips": len(captions),
        "oracle_accuracy_on_val": (rounded(accuracy) if accuracy else
                                   {"value": None, "reason": "no val caption names synthetic attributes"}),
        "skipped_samples": dm.skipped,
        "previews": [str(out / "preview-train.png"), str(out / "preview-val.png")],
    }


def oracle_accuracy(index_path: Path) -> dict[str, Any]:
    """Caption accuracy of the videos `maskvid generate` listed in index.json, on the prompts the
    synthetic vocabulary can parse; a note instead when none can."""
    from maskvid.datamodules.synthetic import parse_caption
    from maskvid.datamodules.video_io import decode_all
    from maskvid.metrics.oracle import caption_accuracy

    index = json.loads(index_path.read_text())
    scored = [(item, parse_caption(item["prompt"])) for item in index]
    scored = [(item, attrs) for item, attrs in scored if attrs is not None]
    if not scored:
        return {"value": None, "reason": "the prompts do not name synthetic colour/shape/direction; "
                                          "the oracle only reads the synthetic dataset"}
    videos = [decode_all(video_path(item, index_path).read_bytes()) for item, _ in scored]
    result = caption_accuracy(videos, [attrs for _, attrs in scored])
    return {**rounded(result), "unparsed_prompts": len(index) - len(scored)}


def prompt_chance(prompts: list[str]) -> dict[str, Any]:
    """Per attribute, the best caption accuracy a model that ignores that word can expect on these
    prompts: the share of the most frequent value among the prompts the oracle can score
    (synthetic.attribute_chance). Null when none parses."""
    from maskvid.datamodules.synthetic import attribute_chance, parse_caption

    parsed = [a for a in map(parse_caption, prompts) if a is not None]
    if not parsed:
        return {"value": None, "reason": "no prompt names synthetic colour/shape/direction"}
    combos = [(a["colour"], a["shape"], a["direction"]) for a in parsed]
    return {**rounded(attribute_chance(combos)), "n_prompts": len(combos)}


def reconstruction_accuracy(tokenizer_ckpt: Path, token_shards: str, limit: int = 128,
                            batch_size: int = 16) -> dict[str, Any]:
    """The oracle's caption accuracy on the tokenizer's decode of real clips' tokens, through mp4
    as generated videos go: the most stage 2 can score, since it can only emit such tokens. Far
    below the data's own accuracy, the tokenizer (not stage 2) is what limits caption accuracy."""
    import torch

    from maskvid.datamodules.streams import ValStream, expand_shards
    from maskvid.datamodules.token_samples import TokenSampleDecoder
    from maskvid.datamodules.video_io import decode_all, encode_mp4
    from maskvid.metrics.oracle import caption_accuracy
    from maskvid.video_tokenizer import VideoTokenizer

    tokenizer = VideoTokenizer.from_checkpoint(tokenizer_ckpt)
    tokens, attrs = [], []
    for sample in ValStream(expand_shards(token_shards), TokenSampleDecoder()):
        info = sample["meta"]["info"]
        target = intended_attributes(info, sample["caption"])
        if target is not None:
            tokens.append(sample["tokens"])
            attrs.append(target)
        if len(tokens) >= limit:
            break
    if not tokens:
        return {"value": None, "reason": "no val caption names synthetic attributes"}
    videos = []
    with torch.no_grad():
        for i in range(0, len(tokens), batch_size):
            for video in tokenizer.decode(torch.stack(tokens[i:i + batch_size])).numpy():
                videos.append(decode_all(encode_mp4(list(video), fps=8.0, reproducible=True)[0]))
    return rounded(caption_accuracy(videos, attrs))


def video_path(item: dict[str, Any], index_path: Path) -> Path:
    """A video listed in index.json: its path as written, else beside the index (generate run
    from another working directory writes paths relative to that one)."""
    path = Path(item["path"])
    return path if path.is_file() else index_path.parent / path.name


def read_metrics(run_root: Path) -> list[dict[str, float]]:
    """Every logged point under run_root as a row {"step": s, metric: value}, ordered by step,
    from the CSV logs or, without them, the TensorBoard event files (launch/run_curves.py)."""
    return curve_rows(read_curves(run_root))


def tokenizer_psnr(run_root: Path) -> Optional[dict[str, float]]:
    """The last val/psnr the tokenizer fit logged, with its step (None before any validation)."""
    values = [(r["step"], r["val/psnr"]) for r in read_metrics(run_root) if not math.isnan(r.get("val/psnr", math.nan))]
    if not values:
        return None
    step, value = values[-1]
    return {"value": round(value, 3), "step": int(step), "source": "val/psnr in the fit's log"}
