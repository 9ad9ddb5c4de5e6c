"""Draft-and-revise sampling (models/draft_revise.py) on both backbones, instrumented."""

from __future__ import annotations

import pytest
import torch

from maskvid.models.draft_revise import commit_one, draft_revise_sample, random_partition
from maskvid.models.maskgit import MaskGITBackbone
from maskvid.models.mebt import MeBT
from maskvid.models.sampling import SamplingOptions, sample_tokens

GRID = (3, 4, 4)
N = 48


def make(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "maskgit":
        return MaskGITBackbone(vocab_size=32, grid=(5, 4, 4), dim=32, depth=1, heads=2, text_dim=16).eval()
    return MeBT(vocab_size=32, grid=(5, 4, 4), dim=32, depth=1, heads=2, num_latents=8, text_dim=16).eval()


def record_inputs(backbone: torch.nn.Module) -> list[torch.Tensor]:
    """Every forward's input tokens [B, N], in call order (the backbone still computes)."""
    calls: list[torch.Tensor] = []
    real = backbone.forward

    def spy(tokens, *args, **kwargs):
        calls.append(tokens.reshape(tokens.shape[0], -1).clone())
        return real(tokens, *args, **kwargs)

    backbone.forward = spy
    return calls


OPTS = SamplingOptions(sampler="draft_revise", steps=3, cfg_scale=1.0, bootstrap_steps=2, revise_sweeps=2,
                       revise_partitions=3, revise_temperature=0.5)


@pytest.mark.parametrize("kind", ["maskgit", "mebt"])
def test_every_generated_token_is_re_predicted_once_per_sweep_and_primed_ones_never(kind):
    net = make(kind)
    calls = record_inputs(net)
    text, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    prime = torch.randint(0, 32, (2, 1, 4, 4))
    out = draft_revise_sample(net, GRID, text, mask, OPTS, torch.Generator().manual_seed(0), prime=prime)
    assert out.shape == (2, *GRID) and int(out.max()) < 32
    assert torch.equal(out[:, :1], prime)
    assert len(calls) == OPTS.forwards() == 2 + 3 + 2 * 3
    primed = torch.zeros(N, dtype=torch.bool)
    primed[:16] = True
    masked = [c == net.mask_id for c in calls]
    # Bootstrap: before step k, exactly k generated tokens are known (one committed per step).
    for k in range(OPTS.bootstrap_steps):
        assert (~masked[k][:, ~primed]).sum(dim=1).tolist() == [k, k]
    # Revise: per sweep, the parts are disjoint and cover every generated position exactly once.
    revise = masked[OPTS.bootstrap_steps + OPTS.steps:]
    for sweep in range(OPTS.revise_sweeps):
        parts = torch.stack(revise[sweep * 3:(sweep + 1) * 3]).long()  # [parts, B, N]
        assert torch.equal(parts.sum(dim=0), (~primed).long().expand(2, N))
        sizes = parts.sum(dim=2)
        assert int(sizes.max() - sizes.min()) <= 1  # 32 tokens into 3 parts: 10 or 11
    for m in masked:
        assert not m[:, primed].any()  # primed frames are only ever context


@pytest.mark.parametrize("kind", ["maskgit", "mebt"])
def test_draft_revise_is_deterministic_per_seed(kind):
    net = make(kind)
    text, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    opts = SamplingOptions(sampler="draft_revise", steps=3, cfg_scale=2.0, revise_sweeps=1, revise_partitions=2)
    a = sample_tokens(net, GRID, text, mask, opts, torch.Generator().manual_seed(5))
    b = sample_tokens(net, GRID, text, mask, opts, torch.Generator().manual_seed(5))
    c = sample_tokens(net, GRID, text, mask, opts, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Per-video generators: a video is the same alone or in a batch.
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    both = sample_tokens(net, GRID, text, mask, opts, gens())
    alone = sample_tokens(net, GRID, text[1:], mask[1:], opts, gens()[1:])
    assert torch.equal(both[1:], alone)


class _ModeOfObserved(torch.nn.Module):
    """Predicts, everywhere, the commonest observed token of its clip (uniform if none)."""

    mask_id = 8

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens, text=None, text_mask=None, drop_text=None, masked_only=False, valid=None):
        b, t, h, w = tokens.shape
        flat = tokens.reshape(b, -1)
        logits = torch.zeros(b, flat.shape[1], self.mask_id)
        for row in range(b):
            seen = flat[row][flat[row] != self.mask_id]
            if seen.numel():
                logits[row, :, int(seen.mode().values)] = 20.0
        return logits.reshape(b, t, h, w, self.mask_id)


def test_revise_sweeps_redraw_the_draft_from_the_rest():
    """The draft's first step draws its tokens with nothing observed, and MaskGIT never revisits
    them; two revise sweeps re-predict each of them given the rest, which agrees."""
    net = _ModeOfObserved()
    draft_only = SamplingOptions(sampler="draft_revise", steps=6, cfg_scale=1.0, noise=0.0, revise_sweeps=0)
    revised = SamplingOptions(sampler="draft_revise", steps=6, cfg_scale=1.0, noise=0.0, revise_sweeps=2,
                              revise_partitions=4)
    before = draft_revise_sample(net, GRID, None, None, draft_only, torch.Generator().manual_seed(3), batch_size=4)
    after = draft_revise_sample(net, GRID, None, None, revised, torch.Generator().manual_seed(3), batch_size=4)
    assert any(len(row.unique()) > 1 for row in before.reshape(4, -1))
    assert all(len(row.unique()) == 1 for row in after.reshape(4, -1))


def test_padding_is_never_drafted_nor_revised():
    net = make("maskgit")
    calls = record_inputs(net)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    opts = SamplingOptions(sampler="draft_revise", steps=2, cfg_scale=1.0, revise_sweeps=1, revise_partitions=2)
    out = draft_revise_sample(net, GRID, torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool), opts,
                              torch.Generator().manual_seed(0), valid=valid)
    assert (out[0, 2] == net.mask_id).all() and (out[0, :2] < 32).all() and (out[1] < 32).all()
    revised = torch.stack([c == net.mask_id for c in calls[2:]]).sum(dim=0)  # [B, N]
    assert revised[0, :32].eq(1).all() and revised[1].eq(1).all()
    assert revised[0, 32:].eq(len(calls) - 2).all()  # padding is mask_id in every input, never filled


def test_random_partition_and_commit_one():
    g = torch.Generator().manual_seed(0)
    revisable = torch.rand(6, 50, generator=g) < 0.7
    part = random_partition(revisable, 4, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(part >= 0, revisable)
    for row in range(6):
        sizes = torch.bincount(part[row][revisable[row]], minlength=4)
        assert int(sizes.sum()) == int(revisable[row].sum()) and int(sizes.max() - sizes.min()) <= 1
    one = commit_one(revisable, torch.Generator().manual_seed(2), "cpu")
    assert one.sum(dim=1).tolist() == [1] * 6 and not (one & ~revisable).any()
    assert not commit_one(torch.zeros(2, 5, dtype=torch.bool), None, "cpu").any()


def test_options_are_checked_and_count_forwards():
    assert SamplingOptions(steps=10, refine_steps=8).forwards() == 18
    assert SamplingOptions(sampler="draft_revise", steps=10, bootstrap_steps=1, revise_sweeps=2,
                           revise_partitions=4).forwards() == 19
    for bad, field in ((dict(sampler="gibbs"), "sampler"), (dict(revise_partitions=0), "revise_partitions"),
                       (dict(revise_temperature=0.0), "revise_temperature"), (dict(revise_sweeps=-1), "revise_sweeps"),
                       (dict(bootstrap_steps=-1), "bootstrap_steps"), (dict(revise_top_k=0), "revise_top_k"),
                       (dict(schedule="power:-1"), "schedule"), (dict(schedule="exp"), "schedule")):
        with pytest.raises(ValueError, match=field):
            SamplingOptions(**bad).check()


def test_generate_flags_name_every_sampling_option():
    import argparse
    from dataclasses import fields

    from maskvid.launch.cmd_generate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--ckpt", "x", "--prompt", "p", "--out", "o", "--sampler", "draft_revise",
                              "--schedule", "power:2", "--bootstrap-steps", "1", "--revise-sweeps", "3",
                              "--revise-partitions", "5", "--revise-temperature", "0.5", "--revise-top-k", "7"])
    # cmd_generate.run hands each SamplingOptions field its same-named flag.
    assert {f.name for f in fields(SamplingOptions)} <= set(vars(args))
    given = {f.name: getattr(args, f.name) for f in fields(SamplingOptions) if getattr(args, f.name) is not None}
    assert given == dict(sampler="draft_revise", schedule="power:2", bootstrap_steps=1, revise_sweeps=3,
                         revise_partitions=5, revise_temperature=0.5, revise_top_k=7)


def test_the_api_and_the_module_sample_with_draft_and_revise(tmp_path):
    from maskvid.lightning_modules.masked_video_module import MaskedVideoModule
    from maskvid.models.text_encoder import TextEncoder
    from maskvid.text_to_video import TextToVideo
    from tests.stage2_fixtures import tiny_t5_dir, tiny_tokenizer, write_tokenizer_checkpoint

    t5 = str(tiny_t5_dir(tmp_path / "t5"))
    torch.manual_seed(0)
    net = MaskGITBackbone(vocab_size=64, grid=(3, 4, 4), dim=32, depth=1, heads=2, text_dim=32).eval()
    calls = record_inputs(net)
    model = TextToVideo(net, tiny_tokenizer().eval(), TextEncoder(t5, 8), grid=(3, 4, 4))
    options = model.options(sampler="draft_revise", steps=2, cfg_scale=1.0, revise_sweeps=2, revise_partitions=3)
    tokens = model.tokens(["a red circle"], (3, 4, 4), options, torch.Generator().manual_seed(0))
    assert tokens.shape == (1, 3, 4, 4) and len(calls) == options.forwards() == 8
    # The stage-2 module's options configure it too, and travel in its checkpoint.
    m = MaskedVideoModule(net, str(write_tokenizer_checkpoint(tmp_path / "tok.ckpt", tiny_tokenizer())),
                          text_encoder=t5, text_max_length=8, sampler="draft_revise", sample_schedule="linear",
                          revise_sweeps=3, bootstrap_steps=1)
    opts = m.sampling_options()
    assert (opts.sampler, opts.schedule, opts.revise_sweeps, opts.bootstrap_steps) == ("draft_revise", "linear", 3, 1)
    from maskvid.lightning_modules.config_errors import ModelOptionError

    with pytest.raises(ModelOptionError, match="sample_schedule"):
        MaskedVideoModule(net, str(tmp_path / "tok.ckpt"), text_encoder=t5, text_max_length=8, sample_schedule="exp")
