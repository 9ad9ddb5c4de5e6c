"""Does a stage-2 model use each word of the caption? Cross-entropy of the real tokens of synthetic
val clips, a random fraction masked, under the true caption and under the caption with one
attribute swapped (colour -> the next colour, shape -> the next shape, direction -> its opposite).
A gap near zero means the model ignores that word at that mask ratio.

This is how the MeBT gap was found: in the demo recipe, swapping "left" for "right" raised
maskgit's cross-entropy on object tokens but left MeBT's almost unchanged at every mask ratio;
MeBT read colour and nothing of the motion (docs/demo.md, "The direction word").

Object tokens (those differing from the clip set's commonest, background token) are scored apart
from all masked tokens, because the background dominates the mean and no caption changes it.

    python -m maskvid.metrics.caption_sensitivity --ckpt runs/mebt_demo/checkpoints/last.ckpt \\
        --tokens 'tokens/val/shard-*.tar' --json-out results/sensitivity.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def swap_word(word: str, attribute: str) -> str | None:
    """The replacement of one caption word for `attribute` (None: the word does not name it):
    colour -> the next colour, shape -> the next shape, a direction word -> the same form of the
    opposite direction ("leftward" -> "rightward")."""
    from maskvid.datamodules.synthetic import COLOURS, SHAPES

    if attribute == "direction":
        for stem, opposite in OPPOSITE.items():
            if word in (stem, stem + "ward", stem + "wards"):
                return opposite + word[len(stem):]
        return None
    names = list(COLOURS) if attribute == "colour" else list(SHAPES)
    return names[(names.index(word) + 1) % len(names)] if word in names else None


def swapped(caption: str, attribute: str) -> str:
    """The caption with every word naming `attribute` replaced (see swap_word)."""
    return re.sub(r"[a-z]+", lambda m: swap_word(m.group(0), attribute) or m.group(0), caption.lower())


def load_clips(pattern: str, limit: int) -> tuple[torch.Tensor, list[str]]:
    """Token grids [n, t, h, w] and captions of the first `limit` val clips whose captions name a
    colour, a shape and a direction of the synthetic vocabulary."""
    from maskvid.datamodules.streams import ValStream, expand_shards
    from maskvid.datamodules.synthetic import parse_caption
    from maskvid.datamodules.token_samples import TokenSampleDecoder

    tokens, captions = [], []
    for sample in ValStream(expand_shards(pattern), TokenSampleDecoder()):
        if parse_caption(sample["caption"]) is not None:
            tokens.append(sample["tokens"])
            captions.append(sample["caption"])
        if len(tokens) >= limit:
            break
    if not tokens:
        raise SystemExit(f"no caption in {pattern} names a colour, a shape and a direction of the synthetic data")
    return torch.stack(tokens).long(), captions


@torch.no_grad()
def sensitivity(generator, tokens: torch.Tensor, captions: list[str], ratios: list[float], seed: int = 0) -> dict:
    """-> {ratio: {"true": {"object": ce, "all": ce}, "colour": {...}, ..., "gap": {attribute: object ce gap}}}."""
    backbone = generator.backbone.eval()
    variants = {"true": captions}
    for attribute in ("colour", "shape", "direction"):
        variants[attribute] = [swapped(c, attribute) for c in captions]
    encoded = {k: generator.text_encoder(v) for k, v in variants.items()}
    background = tokens.flatten().mode().values
    results = {}
    for ratio in ratios:
        masked = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(seed)) < ratio
        inputs = torch.where(masked, torch.full_like(tokens, backbone.mask_id), tokens)
        obj = tokens[masked] != background
        row = {}
        for name, (text, text_mask) in encoded.items():
            logits = backbone(inputs, text.float(), text_mask).float()
            ce = F.cross_entropy(logits[masked], tokens[masked], reduction="none")
            row[name] = {"object": round(ce[obj].mean().item(), 4), "all": round(ce.mean().item(), 4)}
        row["gap"] = {a: round(row[a]["object"] - row["true"]["object"], 4) for a in ("colour", "shape", "direction")}
        results[str(ratio)] = row
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="stage-2 checkpoint (.ckpt written by maskvid fit)")
    p.add_argument("--tokens", required=True, help="token shards of synthetic val clips (maskvid data tokenize)")
    p.add_argument("--clips", type=int, default=64, help="val clips scored (default: 64)")
    p.add_argument("--mask-ratios", type=float, nargs="+", default=[0.3, 0.6, 0.9, 0.97],
                   help="fractions of tokens masked (default: 0.3 0.6 0.9 0.97)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    p.add_argument("--json-out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    if any(not 0 < r <= 1 for r in args.mask_ratios):
        p.error("--mask-ratios must lie in (0, 1]")

    from maskvid.text_to_video import TextToVideo

    generator = TextToVideo.load(args.ckpt)
    tokens, captions = load_clips(args.tokens, args.clips)
    result = {"benchmark": "caption_sensitivity", "ckpt": str(args.ckpt), "clips": len(captions),
              "ratios": sensitivity(generator, tokens, captions, args.mask_ratios, args.seed)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text)
    return result


if __name__ == "__main__":
    main()
