"""The frozen text encoder: offline loading of the packaged model, and its bf16 option."""

from __future__ import annotations

import torch

from maskvid.models.text_encoder import TextEncoder

CAPTIONS = ["a red circle moving left", "a blue square moving up"]


def test_bf16_weights_halve_memory_and_give_fp32_embeddings_close_to_fp32():
    full, half = TextEncoder("packaged:minilm", 16), TextEncoder("packaged:minilm", 16, dtype="bf16")
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    size = lambda enc: sum(p.numel() * p.element_size() for p in enc.model.parameters())
    assert size(half) * 2 == size(full)
    (e32, m32), (e16, m16) = full(CAPTIONS), half(CAPTIONS)
    assert e16.dtype == torch.float32 and torch.equal(m32, m16)
    cos = torch.nn.functional.cosine_similarity(e32[m32], e16[m16], dim=-1)
    assert cos.min() > 0.98, cos.min()
    # The captions stay told apart: a constant or random output would not pass this.
    assert torch.nn.functional.cosine_similarity(e16[0, 1:4].flatten(), e16[1, 1:4].flatten(), dim=0) < 0.99
