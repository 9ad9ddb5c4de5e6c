"""Token-shard samples: what `maskvid data tokenize` writes and stage 2 reads on its fast path.

A sample is
    tokens.npy      int16/int32 [t, h, w]  the clip's video tokens
    latentmask.npy  bool [t]                latent frames made from real (not padded) frames
    text.npy        float16 [L, D]          the caption's text-encoder embeddings
    textmask.npy    bool [L]                True = real text token
    txt             the caption
    json            {"grid", "vocab_size", "tokenizer", "text_encoder", "source_key", ...}
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from maskvid.datamodules.samples import BadSample, collate_meta

TOKEN_FIELDS = ("tokens.npy", "latentmask.npy", "text.npy", "textmask.npy")


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy(raw: dict[str, Any], name: str) -> np.ndarray:
    if name not in raw:
        raise BadSample("not a token sample", f"missing {name} (is this a video shard? set data.samples: video)")
    try:
        return np.load(io.BytesIO(raw[name]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BadSample("bad npy", f"{name}: {e}") from e


@dataclass
class TokenSampleDecoder:
    """Decodes token-shard samples into {tokens, latent_mask, text_emb, text_mask, caption, meta}."""

    num_latent_frames: Optional[int] = None  # keep the first t latent frames (None: all)

    def __call__(self, raw: dict[str, Any], rng: Optional[np.random.Generator]) -> dict[str, Any]:
        try:
            info = json.loads(raw.get("json", b"{}"))
        except (ValueError, UnicodeDecodeError) as e:
            raise BadSample("bad json", str(e)[:200]) from e
        tokens = _npy(raw, "tokens.npy")
        latent_mask = _npy(raw, "latentmask.npy").astype(bool)
        text = _npy(raw, "text.npy")
        text_mask = _npy(raw, "textmask.npy").astype(bool)
        if tokens.ndim != 3 or latent_mask.shape != tokens.shape[:1] or text.ndim != 2 or text_mask.shape != text.shape[:1]:
            raise BadSample("bad token sample", f"shapes tokens {tokens.shape} text {text.shape}")
        if self.num_latent_frames is not None:
            if tokens.shape[0] < self.num_latent_frames:
                raise BadSample("too few latent frames", f"{tokens.shape[0]} < {self.num_latent_frames}")
            tokens, latent_mask = tokens[: self.num_latent_frames], latent_mask[: self.num_latent_frames]
        caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else ""
        return {
            "tokens": torch.from_numpy(tokens.astype(np.int64)),
            "latent_mask": torch.from_numpy(latent_mask),
            "text_emb": torch.from_numpy(text.astype(np.float16)),
            "text_mask": torch.from_numpy(text_mask),
            "caption": caption,
            "meta": {"key": raw.get("__key__", ""), "url": raw.get("__url__", ""), "info": info},
        }


def collate_tokens(samples: list[dict[str, Any]]) -> dict[str, Any]:
    metas = [s["meta"] for s in samples]
    shapes = {tuple(s["tokens"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"token samples of different grids in one batch: {sorted(shapes)}")
    return {
        "tokens": torch.stack([s["tokens"] for s in samples]),
        "latent_mask": torch.stack([s["latent_mask"] for s in samples]),
        "text_emb": torch.stack([s["text_emb"] for s in samples]),
        "text_mask": torch.stack([s["text_mask"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "meta": collate_meta(metas),
    }
