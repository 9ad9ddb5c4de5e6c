"""Turn video shards into token shards for stage 2's fast path (tokens + cached text embeddings).

Every clip is decoded once (from its start, as validation does), tokenized with the frozen stage-1
tokenizer, and its caption embedded with the frozen text encoder (stored as float16). Stage 2 then
trains on these with `data.samples: tokens`, skipping video decoding, the tokenizer and the text
encoder entirely. Decoding runs in --workers processes; encoding batches use every core.

Output: OUT/shard-*.tar (+ shards.json), each sample holding tokens.npy, latentmask.npy,
text.npy, textmask.npy, txt and json (grid, vocab_size, tokenizer and text encoder used).

examples:
  maskvid data tokenize --tokenizer runs/tokenizer_demo/checkpoints/last.ckpt \\
      --shards data/synthetic/train --out data/synthetic_tokens/train --num-frames 17
  maskvid data tokenize --tokenizer tok.ckpt --text-encoder /models/t5-base --shards 'web/{000..099}.tar' \\
      --out tokens/train --num-frames 17 --resolution 128 --batch-size 32 --device cuda
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from maskvid.datamodules.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, type=Path, help="stage-1 checkpoint (TokenizerModule), or an exported tokenizer directory (maskvid ckpt export)")
    parser.add_argument("--shards", required=True, help="video shards: directory, brace pattern or URLs")
    parser.add_argument("--out", required=True, type=Path, help="output directory for the token shards")
    parser.add_argument("--text-encoder", default="packaged:minilm", help="text encoder (default: packaged:minilm)")
    parser.add_argument("--max-length", type=int, default=16, help="caption tokens kept (default: 16)")
    parser.add_argument("--num-frames", type=int, default=17, help="frames per clip, 1 + k*pt (default: 17)")
    parser.add_argument("--resolution", type=int, default=None, help="clip side in pixels (default: the tokenizer's image_size)")
    parser.add_argument("--frame-stride", type=int, default=1, help="take every n-th frame (default: 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="clips encoded together (default: 16)")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes (default: 2)")
    parser.add_argument("--samples-per-shard", type=int, default=1024, help="samples per output shard (default: 1024)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def file_digest(path: Path, limit: int = 1 << 20) -> str:
    """A short fingerprint of the tokenizer (the first MiB of its file, or of each file of its
    directory: an export or a sharded checkpoint), recorded in every sample."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        with open(file, "rb") as f:
            digest.update(f.read(limit))
    return digest.hexdigest()[:16]


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from maskvid.datamodules.shard_writer import ShardSink
    from maskvid.datamodules.streams import expand_shards, shard_size
    from maskvid.datamodules.token_samples import npy_bytes
    from maskvid.datamodules.video_datamodule import VideoDataModule
    from maskvid.models.text_encoder import TextEncoder, TextEncoderError
    from maskvid.models.tokenizer_checkpoint import TokenizerCheckpointError
    from maskvid.video_tokenizer import load_tokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        tokenizer = load_tokenizer(args.tokenizer, map_location=device)
        args.resolution = args.resolution or tokenizer.image_size
        grid = tokenizer.token_grid(args.num_frames, args.resolution)
        encoder = TextEncoder(args.text_encoder, args.max_length).to(device)
    except (TokenizerCheckpointError, TextEncoderError, ValueError) as exc:
        raise DataError(str(exc)) from None
    data = VideoDataModule(
        val_shards=args.shards, num_frames=args.num_frames, resolution=args.resolution,
        frame_stride=args.frame_stride, batch_size=args.batch_size, num_workers=args.workers,
    )
    loader = data.val_dataloader()
    try:
        total = sum(shard_size(u) for u in expand_shards(args.shards))
    except Exception:  # noqa: BLE001 - remote shards: size unknown
        total = None
    dtype = np.int16 if tokenizer.vocab_size <= 32767 else np.int32
    common = {
        "grid": list(grid), "vocab_size": tokenizer.vocab_size, "tokenizer": str(args.tokenizer),
        "tokenizer_sha256_head": file_digest(args.tokenizer), "text_encoder": args.text_encoder,
        "max_length": args.max_length, "num_frames": args.num_frames, "resolution": args.resolution,
    }
    written = 0
    with ShardSink(args.out, samples_per_shard=args.samples_per_shard, overwrite=args.overwrite) as sink:
        bar = tqdm(total=total, desc="tokenizing", unit="clip", disable=args.quiet)
        for batch in loader:
            with torch.no_grad():
                tokens = tokenizer.encode(batch["video"].to(device)).cpu().numpy().astype(dtype)
                text, text_mask = encoder(batch["caption"])
            latent = tokenizer.latent_frame_mask(batch["frame_mask"])[:, : grid[0]].numpy()
            text = text.cpu().numpy().astype(np.float16)
            text_mask = text_mask.cpu().numpy()
            for i, key in enumerate(batch["meta"]["key"]):
                sink.write_sample(
                    key.replace(".", "_"),
                    {
                        "tokens.npy": npy_bytes(tokens[i]),
                        "latentmask.npy": npy_bytes(latent[i]),
                        "text.npy": npy_bytes(text[i]),
                        "textmask.npy": npy_bytes(text_mask[i]),
                        "txt": batch["caption"][i],
                        "json": {**common, "source_key": key, "source_url": batch["meta"]["url"][i]},
                    },
                )
            written += len(batch["caption"])
            bar.update(len(batch["caption"]))
        bar.close()
    skipped = data.skipped if hasattr(data, "skipped") else 0
    print(f"wrote {written} token samples to {args.out} (grid {tuple(grid)}, vocab {tokenizer.vocab_size})")
    if skipped:
        print(f"skipped {skipped} bad samples")
    return 0
