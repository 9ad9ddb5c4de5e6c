"""metrics/caption_sensitivity.py: attribute swaps and the cross-entropy gap they cause."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import torch

from maskvid.metrics.caption_sensitivity import sensitivity, swapped
from maskvid.models.maskgit import MaskGITBackbone


def test_swaps_name_another_value_in_the_same_word_form():
    caption = "The magenta triangle moves leftwards quickly on a black background"
    assert swapped(caption, "direction") == "the magenta triangle moves rightwards quickly on a black background"
    assert swapped("a red square moving up", "direction") == "a red square moving down"
    assert swapped(caption, "colour") != caption.lower() and "triangle" in swapped(caption, "colour")
    assert swapped(caption, "shape") == "the magenta square moves leftwards quickly on a black background"
    assert "black" in swapped(caption, "colour")  # the background is not the object's colour


class WordEncoder:
    """A caption -> one fixed random vector per word; words in `blind` all map to one vector, so a
    model cannot tell them apart (as MeBT could not tell left from right)."""

    def __init__(self, dim: int = 16, blind: tuple[str, ...] = ()) -> None:
        self.dim, self.blind = dim, blind

    def vector(self, word: str) -> torch.Tensor:
        key = "<blind>" if word in self.blind else word
        seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        words = [c.split() for c in captions]
        length = max(map(len, words))
        emb = torch.zeros(len(captions), length, self.dim)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws):
                emb[i, j], mask[i, j] = self.vector(w), True
        return emb, mask


def test_the_gap_is_zero_exactly_for_a_word_the_model_cannot_see():
    torch.manual_seed(0)
    backbone = MaskGITBackbone(vocab_size=32, grid=(2, 4, 4), dim=32, depth=1, heads=2, text_dim=16).eval()
    tokens = torch.randint(1, 32, (6, 2, 4, 4))
    tokens[:, :, :2] = 0  # a background token, so that object tokens are the others
    captions = ["a red square moving left", "a blue circle moving up", "a green triangle moving right"] * 2
    sees_all = sensitivity(SimpleNamespace(backbone=backbone, text_encoder=WordEncoder()), tokens, captions, [0.5, 1.0])
    assert set(sees_all) == {"0.5", "1.0"}
    for row in sees_all.values():
        assert {"true", "colour", "shape", "direction", "gap"} <= set(row)
        assert all(abs(g) > 1e-4 for g in row["gap"].values()), row["gap"]
    blind = WordEncoder(blind=("left", "right", "up", "down"))
    no_direction = sensitivity(SimpleNamespace(backbone=backbone, text_encoder=blind), tokens, captions, [0.5, 1.0])
    for row in no_direction.values():
        assert row["gap"]["direction"] == 0.0
        assert abs(row["gap"]["colour"]) > 1e-4
