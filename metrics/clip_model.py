"""A local Hugging Face CLIP directory as the (model, processor) pair torchmetrics' CLIPScore takes.

torchmetrics' CLIPScore only accepts hub names (openai/..., jinaai/..., zer0int/...) or a callable
returning (model, processor); `LocalCLIP(path)` is that callable, loading from a directory with
nothing downloaded (`local_files_only`). Two transformers-5 pitfalls are handled here:

- `get_image_features`/`get_text_features` return a model output, not a tensor, and CLIPScore
  calls `.norm` on it: `PooledCLIPModel` returns the projected `pooler_output`.
- `CLIPImageProcessor` needs torchvision; `CLIPImageProcessorPil` gives the same preprocessing
  (bicubic resize of the short side, center crop, CLIP mean/std) with pillow only.

`write_random_clip` saves a randomly initialised CLIP with a byte-level tokenizer (no vocabulary
file needed) for tests and benchmarks: its scores mean nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor


class CLIPLoadError(ValueError):
    """A CLIP directory that is missing or cannot be loaded."""


def _pooled_model_class():
    from transformers import CLIPModel

    class PooledCLIPModel(CLIPModel):
        """CLIPModel whose feature getters return the projected embeddings as tensors."""

        def get_image_features(self, pixel_values: Tensor, **kwargs: Any) -> Tensor:  # type: ignore[override]
            return super().get_image_features(pixel_values=pixel_values, **kwargs).pooler_output

        def get_text_features(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,  # type: ignore[override]
                              **kwargs: Any) -> Tensor:
            return super().get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs).pooler_output

    return PooledCLIPModel


class LocalCLIP:
    """Callable -> (model, processor) from a local CLIP directory (save_pretrained layout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not (self.path / "config.json").is_file():
            raise CLIPLoadError(f"CLIP directory not found or incomplete: {self.path} (expected a Hugging Face "
                                "save_pretrained folder with config.json; maskvid downloads nothing)")

    def __call__(self):
        from transformers import AutoTokenizer, CLIPProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        try:
            model = _pooled_model_class().from_pretrained(self.path, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            if (self.path / "preprocessor_config.json").is_file():
                image_processor = CLIPImageProcessorPil.from_pretrained(self.path, local_files_only=True)
            else:
                image_processor = CLIPImageProcessorPil()
        except (OSError, ValueError, KeyError) as exc:
            raise CLIPLoadError(f"cannot load CLIP from {self.path}: {str(exc).splitlines()[0][:300]}") from None
        model.eval().requires_grad_(False)
        return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def byte_level_tokenizer():
    """A CLIP BPE tokenizer with the 256 byte symbols (+ end-of-word forms) and no merges."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for symbol in symbols:
            vocab.setdefault(symbol + suffix, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[])


def write_random_clip(out: str | Path, text: Optional[dict] = None, vision: Optional[dict] = None,
                      projection_dim: int = 512, seed: int = 0):
    """Save a random CLIP (ViT-B/32 sizes unless overridden) with a byte-level tokenizer to `out`.

    text/vision: CLIPTextConfig/CLIPVisionConfig fields. Returns the model.
    """
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = Path(out)
    tokenizer = byte_level_tokenizer()
    # The pooled text embedding is read at the first end-of-text token, which is id 1 here.
    text_config = {"vocab_size": len(tokenizer), "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, **(text or {})}
    vision_config = dict(vision or {})
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim))
    size = model.config.vision_config.image_size
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out)
    return model
