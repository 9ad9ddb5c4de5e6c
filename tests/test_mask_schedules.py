"""Mask schedules (models/mask_schedules.py): values, the minimum rate, and their two users: the
training mask (MaskedVideoModule.random_mask) and the sampler's re-masking counts."""

from __future__ import annotations

import math

import pytest
import torch

from maskvid.models import mask_schedules
from maskvid.models.mask_schedules import mask_fraction
from maskvid.models.sampling import SamplingOptions, maskgit_sample


@pytest.mark.parametrize("spec, points", [
    ("cosine", {0.0: 1.0, 1 / 3: math.cos(math.pi / 6), 0.5: math.sqrt(0.5), 1.0: 0.0}),
    ("linear", {0.0: 1.0, 0.25: 0.75, 0.5: 0.5, 1.0: 0.0}),
    ("power:2", {0.0: 1.0, 0.5: 0.75, 0.9: 0.19, 1.0: 0.0}),
    ("power:3", {0.5: 0.875, 1.0: 0.0}),
    ("power:0.5", {0.25: 0.5, 0.04: 0.8}),
])
def test_values_at_known_points_for_floats_and_tensors(spec, points):
    for r, expected in points.items():
        assert mask_fraction(spec, r) == pytest.approx(expected, abs=1e-12)
    xs = torch.tensor(list(points), dtype=torch.float64)
    torch.testing.assert_close(mask_fraction(spec, xs), torch.tensor(list(points.values()), dtype=torch.float64))
    grid = torch.linspace(0, 1, 101)
    values = mask_fraction(spec, grid)
    assert bool((values[1:] <= values[:-1]).all())  # more progress, fewer tokens masked


def test_minimum_rate_is_honoured():
    assert mask_fraction("linear", 0.95, min_rate=0.15) == pytest.approx(0.15)
    assert mask_fraction("linear", 0.5, min_rate=0.15) == pytest.approx(0.5)  # above the floor: unchanged
    values = mask_fraction("cosine", torch.linspace(0, 1, 1001), min_rate=0.2)
    assert float(values.min()) == pytest.approx(0.2) and float(values.max()) == 1.0
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="minimum"):
            mask_schedules.check("linear", bad)


def test_bad_specs_are_refused():
    for bad in ("cos", "power", "power:0", "power:x", "linear:2", "power:inf"):
        with pytest.raises(ValueError):
            mask_schedules.parse(bad)
    assert mask_schedules.parse("power:2.5") == ("power", 2.5)


class _Uniform(torch.nn.Module):
    """Uniform logits everywhere; records how many positions each forward sees masked."""

    mask_id = 8

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.masked: list[int] = []

    def forward(self, tokens, text=None, text_mask=None, drop_text=None, masked_only=False, valid=None):
        self.masked.append(int((tokens == self.mask_id).sum()))
        return torch.zeros(*tokens.shape, self.mask_id)


@pytest.mark.parametrize("spec", ["cosine", "linear", "power:2"])
def test_the_sampler_keeps_the_schedule_s_fraction_masked_after_each_step(spec):
    net = _Uniform()
    steps, n = 6, 3 * 4 * 4
    maskgit_sample(net, (3, 4, 4), None, None, SamplingOptions(steps=steps, cfg_scale=1.0, schedule=spec),
                   torch.Generator().manual_seed(0), batch_size=1)
    # floor(n * fraction), in the sampler's float32 (1 - 5/6 of 48 is 8 there, 7.999... in float64).
    expected = [n] + [int(torch.floor(torch.tensor(float(n)) * mask_fraction(spec, k / steps))) for k in range(1, steps)]
    assert net.masked == expected


@pytest.mark.parametrize("spec, min_rate", [("linear", 0.0), ("power:2", 0.0), ("linear", 0.3)])
def test_training_masks_follow_the_module_s_schedule(spec, min_rate, tmp_path_factory):
    from maskvid.lightning_modules.masked_video_module import MaskedVideoModule
    from maskvid.models.maskgit import MaskGITBackbone
    from tests.stage2_fixtures import tiny_t5_dir, tiny_tokenizer, write_tokenizer_checkpoint

    root = tmp_path_factory.mktemp("schedules")
    torch.manual_seed(0)
    m = MaskedVideoModule(MaskGITBackbone(vocab_size=64, grid=(5, 4, 4), dim=32, depth=1, heads=2, text_dim=32),
                          str(write_tokenizer_checkpoint(root / "tok.ckpt", tiny_tokenizer())),
                          text_encoder=str(tiny_t5_dir(root / "t5")), text_max_length=8,
                          mask_schedule=spec, min_mask_rate=min_rate)
    valid = torch.ones(20000, 20, dtype=torch.bool)
    counts = m.random_mask(valid, torch.Generator().manual_seed(0)).sum(1).float()
    # count = max(1, ceil(20 * ratio(u))), u ~ U(0, 1): its mean and its floor.
    u = torch.linspace(0, 1, 200001, dtype=torch.float64)
    expected = torch.ceil(20 * mask_fraction(spec, u, min_rate)).clamp(min=1)
    assert counts.mean().item() == pytest.approx(expected.mean().item(), abs=0.1)
    assert counts.min().item() == max(1, math.ceil(20 * min_rate))
    with pytest.raises(ValueError, match="schedule"):
        MaskedVideoModule(MaskGITBackbone(vocab_size=64, grid=(5, 4, 4), dim=32, depth=1, heads=2, text_dim=32),
                          str(root / "tok.ckpt"), text_encoder=str(root / "t5"), text_max_length=8,
                          mask_schedule="quadratic")
