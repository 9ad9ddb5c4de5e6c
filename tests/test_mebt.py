"""MeBT: the backbone interface, set gathering, no N x N attention, batch independence, sampling
and frame extrapolation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.mebt import MeBT, gather_sets
from models.sampling import SamplingOptions, maskgit_sample


def net(**kw) -> MeBT:
    torch.manual_seed(0)
    args = dict(vocab_size=64, grid=(3, 4, 4), dim=32, depth=2, heads=2, num_latents=8, text_dim=16)
    return MeBT(**(args | kw)).eval()


def test_gather_sets_pads_variable_sizes():
    selected = torch.tensor([[True, False, True, False], [False, False, False, True]])
    idx, valid = gather_sets(selected)
    assert idx.shape == (2, 2)
    assert idx[0].tolist() == [0, 2] and valid[0].tolist() == [True, True]
    assert idx[1, 0].item() == 3 and valid[1].tolist() == [True, False]


def test_observed_positions_keep_their_tokens_and_rows_are_independent():
    m = net()
    tokens = torch.randint(0, 64, (2, 3, 4, 4))
    tokens[0, 1:] = m.mask_id
    tokens[1, :, :2] = m.mask_id
    text, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    logits = m(tokens, text, mask)
    assert logits.shape == (2, 3, 4, 4, 64) and torch.isfinite(logits).all()
    observed = tokens != m.mask_id
    assert torch.equal(logits.argmax(-1)[observed], tokens[observed])
    # Changing clip 0 (even how many of its tokens are masked) leaves clip 1's logits unchanged.
    other = tokens.clone()
    other[0, 0] = m.mask_id
    torch.testing.assert_close(m(other, text, mask)[1], logits[1])
    # ...and the context does reach the masked predictions.
    changed = tokens.clone()
    changed[0, 0, 0, 0] = (tokens[0, 0, 0, 0] + 1) % 64
    assert not torch.allclose(m(changed, text, mask)[0][~observed[0]], logits[0][~observed[0]])


def test_no_attention_is_quadratic_in_the_number_of_tokens(monkeypatch):
    """Every attention call has M latents on one side: its score matrix is at most N x M."""
    m = net(num_latents=8)
    shapes = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        shapes.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    tokens = torch.randint(0, 65, (1, 3, 4, 4))  # 48 positions
    m(tokens, torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool))
    assert shapes
    n_latents = 8
    for q_len, k_len in shapes:
        assert n_latents in (q_len, k_len) or q_len == k_len == n_latents, (q_len, k_len)
        assert min(q_len, k_len) <= n_latents + 48  # latents + queries at most, never 48 x 48 alone


def test_samples_past_the_trained_length():
    m = net()
    text, mask = torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool)
    out = maskgit_sample(m, (6, 4, 4), text, mask, SamplingOptions(steps=3), torch.Generator().manual_seed(0))
    assert out.shape == (1, 6, 4, 4) and int(out.max()) < 64
    with pytest.raises(ValueError, match="spatial grid"):
        m(torch.zeros(1, 3, 5, 4, dtype=torch.long))
