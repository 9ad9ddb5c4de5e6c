"""Small stage-2 building blocks for tests: a tiny T5 text encoder directory and a stage-1
checkpoint file made from an untrained tokenizer (nothing downloaded, nothing trained)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.cvivit import CViViT
from models.quantizer import VectorQuantizer
from models.tokenizer_checkpoint import save_tokenizer


def tiny_t5_dir(out: Path, d_model: int = 32) -> Path:
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=384, d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    T5EncoderModel(config).save_pretrained(out)
    ByT5Tokenizer().save_pretrained(out)
    return out


def tiny_tokenizer(codebook_size: int = 64, image_size: int = 32) -> CViViT:
    torch.manual_seed(0)
    return CViViT(image_size=image_size, patch_size=8, dim=32, spatial_depth=1, temporal_depth=1, heads=2,
                  quantizer=VectorQuantizer(codebook_size, 8))


def write_tokenizer_checkpoint(path: Path, tokenizer: CViViT) -> Path:
    """What TokenizerModule writes, minus the training state."""
    return save_tokenizer(path, tokenizer)
