"""Interpolation and inpainting through the mask (issue 35 item 3, MaskGIT/MUSE-style): the samplers'
given/keep fix any positions of the grid to given tokens as context and generate the rest."""

from __future__ import annotations

import pytest
import torch

from maskvid.models.maskgit import MaskGITBackbone
from maskvid.models.sampling import SamplingOptions, interpolation_keep, keep_box, sample_tokens

GRID = (5, 4, 4)


def backbone() -> MaskGITBackbone:
    torch.manual_seed(0)
    return MaskGITBackbone(vocab_size=64, grid=GRID, dim=32, depth=2, heads=2, text_dim=32).eval()


class FirstInputs(torch.nn.Module):
    """Wraps a backbone and records the tokens of its first call."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.mask_id, self.vocab_size = net, net.mask_id, net.vocab_size
        self.first = None

    def forward(self, tokens, *args, **kw):
        if self.first is None:
            self.first = tokens.clone()
        return self.net(tokens, *args, **kw)


def test_keep_helpers():
    box = keep_box(GRID, (1, 3), (0, 2), (1, 4))
    assert box.shape == GRID and not box[1:3, 0:2, 1:4].any() and int((~box).sum()) == 2 * 2 * 3
    assert torch.equal(keep_box(GRID, (1, 3), (0, 2), (1, 4), inside=True), ~box)
    inter = interpolation_keep(GRID, 2, 1)
    assert inter[:2].all() and inter[4].all() and not inter[2:4].any()
    with pytest.raises(ValueError, match="leave none"):
        interpolation_keep(GRID, 3, 2)


@pytest.mark.parametrize("sampler", ["maskgit", "draft_revise"])
@pytest.mark.parametrize("kind", ["inpaint", "interpolate"])
def test_kept_tokens_are_context_and_come_back(sampler, kind):
    net = FirstInputs(backbone())
    b = 2
    given = torch.randint(0, 64, (b, *GRID), generator=torch.Generator().manual_seed(1))
    keep = (keep_box(GRID, (1, 4), (1, 3), (1, 3)) if kind == "inpaint" else interpolation_keep(GRID, 2, 1))
    keep = keep[None].expand(b, *GRID)
    options = SamplingOptions(steps=3, sampler=sampler, refine_steps=2, refine_ratio=0.5, revise_sweeps=1,
                              revise_partitions=2)
    text, text_mask = torch.randn(b, 3, 32), torch.ones(b, 3, dtype=torch.bool)
    out = sample_tokens(net, GRID, text, text_mask, options, torch.Generator().manual_seed(0), given=given, keep=keep)
    assert torch.equal(out[keep], given[keep])  # the kept tokens come back unchanged
    assert (out[~keep] < 64).all()  # everything else is generated
    # The backbone sees the kept tokens from the first step, the rest masked (the first B rows:
    # guidance doubles the batch).
    first = net.first[:b]
    assert torch.equal(first[keep], given[keep]) and (first[~keep] == net.mask_id).all()


def test_given_and_keep_must_match_the_grid():
    net = backbone()
    text, text_mask = torch.randn(1, 3, 32), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="go together"):
        sample_tokens(net, GRID, text, text_mask, SamplingOptions(steps=2), given=torch.zeros(1, *GRID, dtype=torch.long))
    with pytest.raises(ValueError, match="must be"):
        sample_tokens(net, GRID, text, text_mask, SamplingOptions(steps=2), given=torch.zeros(1, 2, 4, 4, dtype=torch.long),
                      keep=torch.ones(1, 2, 4, 4, dtype=torch.bool))
