"""Training with given prefixes (issue 35 item 3): MaskedVideoModule(prefix_prob) keeps the first K
latent frames of a fraction of clips unmasked, so generation from given frames is in-distribution."""

from __future__ import annotations

import pytest
import torch

from maskvid.lightning_modules.config_errors import ModelOptionError
from maskvid.lightning_modules.masked_video_module import MaskedVideoModule
from maskvid.models.maskgit import MaskGITBackbone
from tests.stage2_fixtures import tiny_t5_dir, tiny_tokenizer, write_tokenizer_checkpoint

MASK = 64


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    return {"t5": str(tiny_t5_dir(root / "t5")), "tok": str(write_tokenizer_checkpoint(root / "tok.ckpt", tiny_tokenizer()))}


def module(parts, **kw) -> MaskedVideoModule:
    torch.manual_seed(0)
    net = MaskGITBackbone(vocab_size=64, grid=(5, 4, 4), dim=32, depth=2, heads=2, text_dim=32)
    return MaskedVideoModule(net, parts["tok"], text_encoder=parts["t5"], text_max_length=8, **kw)


class Spy(torch.nn.Module):
    """Records the inputs the loss shows the backbone."""

    mask_id, vocab_size = MASK, 64

    def __init__(self) -> None:
        super().__init__()
        self.inputs = None

    def forward(self, inputs, text, text_mask, drop_text=None, masked_only=False, valid=None):
        self.inputs = inputs.clone()
        logits = torch.zeros(*inputs.shape, 64, requires_grad=True)
        return logits[inputs == MASK] if masked_only else logits


def batch(b: int = 64, t: int = 5, frames: list[int] | None = None) -> dict:
    latent = torch.ones(b, t, dtype=torch.bool)
    for i, n in enumerate(frames or []):
        latent[i, n:] = False
    return {"tokens": torch.randint(0, 64, (b, t, 4, 4), generator=torch.Generator().manual_seed(1)),
            "text_emb": torch.randn(b, 8, 32), "text_mask": torch.ones(b, 8, dtype=torch.bool),
            "latent_mask": latent, "caption": ["a"] * b}


def test_prefix_prob_one_gives_first_frames_and_masks_a_later_position(parts):
    m, spy = module(parts), Spy()
    data = batch(frames=[1, 2, 3])  # short clips: 1 real frame (nothing to give), 2, 3
    m.masked_loss(spy, data, generator=torch.Generator().manual_seed(0), prefix_prob=1.0)
    masked = spy.inputs == MASK  # [B, t, h, w]
    frames = data["latent_mask"].sum(1)
    given = m.prefix_mask(data["latent_mask"], 1.0, torch.Generator().manual_seed(0))
    seen = set()
    for i in range(masked.shape[0]):
        per_frame = masked[i].flatten(1).any(1)
        first_masked = int(per_frame.float().argmax())
        assert per_frame.any() and first_masked < int(frames[i])  # something real is left to predict
        if int(frames[i]) > 1:
            k = int(given[i].sum())
            assert 1 <= k <= int(frames[i]) - 1
            assert not per_frame[:k].any()  # the first K latent frames are never masked
            assert per_frame[k:].any()
            seen.add(k)
    assert seen == {1, 2, 3, 4}  # K ranges over 1..t-1


def test_prefix_prob_zero_masks_as_before(parts):
    """prefix_prob 0 draws nothing extra: the masks for a seed are the plain random_mask's."""
    m, spy = module(parts), Spy()
    data = batch(b=8)
    m.masked_loss(spy, data, generator=torch.Generator().manual_seed(3), prefix_prob=0.0)
    valid = torch.ones(8, 5 * 16, dtype=torch.bool)
    expected = m.random_mask(valid, torch.Generator().manual_seed(3))
    assert torch.equal(spy.inputs.flatten(1) == MASK, expected)


def test_prefix_prob_fraction_and_training_step_uses_it(parts):
    given = MaskedVideoModule.prefix_mask(torch.ones(4000, 5, dtype=torch.bool), 0.3, torch.Generator().manual_seed(0))
    assert given[:, 0].float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert not given[:, -1].any()
    m = module(parts, prefix_prob=1.0)
    assert m.hparams.prefix_prob == 1.0
    seen = {}
    original = m.masked_loss

    def capture(*args, **kw):
        seen.update(kw)
        return original(*args, **kw)

    m.masked_loss = capture
    m.backbone = Spy()
    m.log, m.log_dict = (lambda *a, **k: None), (lambda *a, **k: None)
    m.training_step(batch(b=4), 0)
    assert seen["prefix_prob"] == 1.0
    assert not (m.backbone.inputs[:, 0] == MASK).any()


def test_prefix_prob_out_of_range_is_refused(parts):
    with pytest.raises(ModelOptionError, match="prefix_prob"):
        module(parts, prefix_prob=1.5)
