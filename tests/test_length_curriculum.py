"""The length curriculum's random temporal windows (lightning_modules/length_curriculum.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from maskvid.lightning_modules import length_curriculum as lc

SCHEDULE = [[0, 3], [100, 6]]


def test_prefix_mode_is_the_scheduled_prefix():
    assert [lc.window(SCHEDULE, s, 9) for s in (0, 99, 100, 5000)] == [(0, 3), (0, 3), (0, 6), (0, 6)]
    assert lc.window(None, 10, 9) is None
    assert lc.window([[0, 20]], 0, 9) == (0, 9)  # never past the clip


def test_windows_vary_in_start_and_length_as_the_prior_says():
    total, spread = 9, 1.5
    draws = [lc.window(SCHEDULE, step, total, "random", spread, seed=0) for step in range(100, 4100)]
    lengths = Counter(length for _, length in draws)
    prior = lc.length_prior(total, 6, spread)
    for length in range(1, total + 1):
        assert lengths[length] / len(draws) == pytest.approx(prior[length - 1], abs=0.025)
    assert lengths.most_common(1)[0][0] == 6  # centred on the scheduled length
    # The start is uniform over the positions that fit the window.
    for length in (5, 6, 7):
        starts = Counter(start for start, n in draws if n == length)
        assert set(starts) == set(range(total - length + 1))
        share = np.array([starts[s] for s in sorted(starts)]) / sum(starts.values())
        assert np.abs(share - 1 / len(starts)).max() < 0.06
    assert all(0 <= s and s + n <= total for s, n in draws)
    # Spread 0: always the scheduled length, still at random starts; before step 100, length 3.
    fixed = {lc.window(SCHEDULE, step, total, "random", 0.0) for step in range(200)}
    assert {n for _, n in fixed} == {3, 6} and len({s for s, n in fixed if n == 6}) == 4


def test_the_same_step_seed_gives_the_same_window():
    a = [lc.window(SCHEDULE, s, 9, "random", 2.0, seed=7, rank=1) for s in range(50)]
    assert a == [lc.window(SCHEDULE, s, 9, "random", 2.0, seed=7, rank=1) for s in range(50)]
    assert a != [lc.window(SCHEDULE, s, 9, "random", 2.0, seed=8, rank=1) for s in range(50)]
    assert a != [lc.window(SCHEDULE, s, 9, "random", 2.0, seed=7, rank=0) for s in range(50)]
    np.random.seed(0)  # the global generators play no part
    torch.manual_seed(0)
    assert lc.window(SCHEDULE, 3, 9, "random", 2.0, seed=7, rank=1) == a[3]


def test_bad_curricula_are_refused():
    with pytest.raises(ValueError, match="ascending"):
        lc.check([[10, 3], [0, 2]])
    with pytest.raises(ValueError, match="curriculum_window"):
        lc.check(SCHEDULE, "suffix")
    with pytest.raises(ValueError, match="curriculum_spread"):
        lc.check(SCHEDULE, "random", -1.0)


def test_the_module_trains_on_the_step_s_window(tmp_path):
    from maskvid.lightning_modules.masked_video_module import MaskedVideoModule
    from maskvid.models.maskgit import MaskGITBackbone
    from tests.stage2_fixtures import tiny_t5_dir, tiny_tokenizer, write_tokenizer_checkpoint

    torch.manual_seed(0)
    backbone = MaskGITBackbone(vocab_size=64, grid=(5, 4, 4), dim=32, depth=1, heads=2, text_dim=32)
    m = MaskedVideoModule(backbone, str(write_tokenizer_checkpoint(tmp_path / "tok.ckpt", tiny_tokenizer())),
                          text_encoder=str(tiny_t5_dir(tmp_path / "t5")), text_max_length=8,
                          length_curriculum=[[0, 2], [10, 3]], curriculum_window="random", curriculum_spread=1.0,
                          mask_seed=3)
    seen = []
    real_forward = backbone.forward
    backbone.forward = lambda tokens, *a, **k: seen.append(tokens.clone()) or real_forward(tokens, *a, **k)
    # Each latent frame holds its own index, so the backbone's input shows which frames were kept.
    frames = torch.arange(5)[None, :, None, None].expand(2, 5, 4, 4).contiguous()
    batch = {"tokens": frames, "latent_mask": torch.ones(2, 5, dtype=torch.bool),
             "text_emb": torch.randn(2, 8, 32), "text_mask": torch.ones(2, 8, dtype=torch.bool), "caption": ["a", "b"]}
    for step in range(12):
        m.masked_loss(backbone, batch, curriculum_step=step)
    for step, tokens in enumerate(seen):
        start, length = lc.window([[0, 2], [10, 3]], step, 5, "random", 1.0, seed=3, rank=0)
        kept = tokens[0, :, 0, 0]
        visible = kept != backbone.mask_id
        assert tokens.shape[1] == length
        assert torch.equal(kept[visible], torch.arange(start, start + length)[visible])
    assert len({tuple(t[0, :, 0, 0].tolist()) for t in seen}) > 1
