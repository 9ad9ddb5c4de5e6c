"""Stage 2 units: mask schedule, masked-only loss, CFG null conditioning, the sampler, mismatches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maskvid.lightning_modules.masked_video_module import ConfigMismatchError, MaskedVideoModule
from maskvid.models.maskgit import MaskGITBackbone
from maskvid.models.sampling import SamplingOptions, guided_logits, mask_ratio, maskgit_sample
from tests.stage2_fixtures import tiny_t5_dir, tiny_tokenizer, write_tokenizer_checkpoint


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    return {"t5": str(tiny_t5_dir(root / "t5")), "tok": str(write_tokenizer_checkpoint(root / "tok.ckpt", tiny_tokenizer()))}


def backbone(vocab: int = 64, text_dim: int = 32) -> MaskGITBackbone:
    torch.manual_seed(0)
    return MaskGITBackbone(vocab_size=vocab, grid=(5, 4, 4), dim=32, depth=2, heads=2, text_dim=text_dim)


def module(parts, **kw) -> MaskedVideoModule:
    return MaskedVideoModule(kw.pop("backbone", None) or backbone(), parts["tok"], text_encoder=parts["t5"],
                             text_max_length=8, **kw)


def test_cosine_mask_schedule():
    assert mask_ratio(0.0) == 1.0 and mask_ratio(1.0) == pytest.approx(0.0, abs=1e-12)
    assert mask_ratio(0.5) == pytest.approx(math.cos(math.pi / 4))
    xs = torch.linspace(0, 1, 11)
    assert bool((mask_ratio(xs)[1:] <= mask_ratio(xs)[:-1]).all())


def test_random_mask_follows_the_schedule_and_respects_valid_positions(parts):
    m = module(parts)
    valid = torch.ones(4000, 20, dtype=torch.bool)
    valid[:, 15:] = False
    masked = m.random_mask(valid, torch.Generator().manual_seed(0))
    assert not masked[:, 15:].any()  # padded positions never masked
    counts = masked.sum(1)
    assert int(counts.min()) >= 1 and int(counts.max()) <= 15
    # count = max(1, ceil(15 cos(pi/2 u))), u ~ U(0,1): its mean, integrated numerically.
    u = torch.linspace(0, 1, 100001)
    expected = torch.ceil(15 * torch.cos(u * math.pi / 2)).clamp(min=1).mean().item()
    assert counts.float().mean().item() == pytest.approx(expected, abs=0.15)


def test_loss_counts_only_masked_positions(parts):
    m = module(parts)
    tokens = torch.randint(0, 64, (2, 3, 4, 4))
    text = torch.randn(2, 8, 32)
    batch = {"tokens": tokens, "text_emb": text, "text_mask": torch.ones(2, 8, dtype=torch.bool),
             "latent_mask": torch.ones(2, 3, dtype=torch.bool), "caption": ["a", "b"]}
    captured = {}

    class Spy(torch.nn.Module):
        mask_id, vocab_size = 64, 64

        def forward(self, inputs, text, text_mask, drop_text=None, masked_only=False, valid=None):
            captured["inputs"] = inputs.clone()
            # Perfect at unmasked positions, uniform at masked ones: only masked ones may count.
            logits = torch.zeros(*inputs.shape, 64)
            logits = logits.scatter(-1, tokens[..., None], 50.0 * (inputs != 64)[..., None].float())
            return logits[inputs == 64] if masked_only else logits

    out = m.masked_loss(Spy(), batch, generator=torch.Generator().manual_seed(0))
    assert out["loss"].item() == pytest.approx(math.log(64), rel=1e-4)
    assert out["accuracy"].item() < 0.5
    assert (captured["inputs"] == 64).any()


def test_null_conditioning_is_what_cfg_subtracts():
    net = backbone().eval()
    tokens = torch.randint(0, 65, (2, 3, 4, 4))
    text, mask = torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.bool)
    uncond = net(tokens)  # no text at all
    dropped = net(tokens, text, mask, drop_text=torch.tensor([True, True]))
    torch.testing.assert_close(dropped, uncond)
    cond = net(tokens, text, mask)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(guided_logits(net, tokens, text, mask, 1.0), cond)
    torch.testing.assert_close(guided_logits(net, tokens, text, mask, 3.0), uncond + 3.0 * (cond - uncond),
                               rtol=1e-4, atol=1e-4)


def test_sampler_fills_every_position_and_is_deterministic():
    net = backbone().eval()
    text, mask = torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.bool)
    opts = SamplingOptions(steps=5, cfg_scale=2.0, top_k=10)
    a = maskgit_sample(net, (3, 4, 4), text, mask, opts, torch.Generator().manual_seed(7))
    b = maskgit_sample(net, (3, 4, 4), text, mask, opts, torch.Generator().manual_seed(7))
    c = maskgit_sample(net, (3, 4, 4), text, mask, opts, torch.Generator().manual_seed(8))
    assert a.shape == (2, 3, 4, 4) and int(a.max()) < 64 and int(a.min()) >= 0
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Story mode: primed latent frames are kept as given.
    primed = maskgit_sample(net, (3, 4, 4), text, mask, opts, torch.Generator().manual_seed(1), prime=a[:, -1:])
    assert torch.equal(primed[:, :1], a[:, -1:]) and int(primed.max()) < 64
    with pytest.raises(ValueError, match="steps"):
        maskgit_sample(net, (3, 4, 4), text, mask, SamplingOptions(steps=0))


def test_vocabulary_mismatch_is_a_clear_error(parts):
    with pytest.raises(ConfigMismatchError, match="vocabulary mismatch.*predicts 100.*has 64 codes"):
        module(parts, backbone=backbone(vocab=100))
    with pytest.raises(ConfigMismatchError, match="text width mismatch"):
        module(parts, backbone=backbone(text_dim=48))
    m = module(parts)
    with pytest.raises(ConfigMismatchError, match=r"1 \+ k\*2 frames"):
        m.token_grid(8, 32)
    with pytest.raises(ConfigMismatchError, match="exceeds the backbone's grid"):
        m.token_grid(17, 32)
    bad = {"tokens": torch.full((1, 3, 4, 4), 70), "text_emb": torch.randn(1, 8, 32),
           "text_mask": torch.ones(1, 8, dtype=torch.bool), "caption": ["x"]}
    with pytest.raises(ConfigMismatchError, match="another tokenizer"):
        m.batch_tokens(bad)


def test_video_batches_are_tokenized_on_the_fly(parts):
    m = module(parts)
    video = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    frame_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    tokens, text, text_mask, latent = m.batch_tokens({"video": video, "frame_mask": frame_mask, "caption": ["a b", "c"]})
    assert torch.equal(tokens, m.tokenizer.encode(video))
    assert text.shape == (2, 8, 32) and text_mask.dtype == torch.bool
    assert latent.tolist() == [[True, True, True], [True, True, False]]
    # The loss of the video batch is the loss of the token batch it encodes to (same masking draw),
    # and the clip's padded latent frame is never masked (its tokens are not predicted).
    seen = {}

    def spy(inputs, *args, **kwargs):
        seen["inputs"] = inputs.clone()
        return m.backbone(inputs, *args, **kwargs)

    spy.mask_id = m.backbone.mask_id
    loss = m.masked_loss(spy, {"video": video, "frame_mask": frame_mask, "caption": ["a b", "c"]},
                         generator=torch.Generator().manual_seed(3))["loss"]
    from_tokens = m.masked_loss(m.backbone, {"tokens": tokens, "text_emb": text, "text_mask": text_mask,
                                             "latent_mask": latent}, generator=torch.Generator().manual_seed(3))["loss"]
    assert loss.requires_grad and (seen["inputs"] == m.backbone.mask_id).any()
    torch.testing.assert_close(loss, from_tokens)
    assert torch.equal(seen["inputs"][1, 2], tokens[1, 2])


@pytest.mark.parametrize("kind", ["maskgit", "mebt"])
def test_pooled_text_starts_as_a_no_op_and_keeps_the_null_condition_text_free(kind):
    from maskvid.models.mebt import MeBT

    def build(pooled: bool):
        torch.manual_seed(0)
        if kind == "maskgit":
            return MaskGITBackbone(vocab_size=64, grid=(3, 4, 4), dim=32, depth=2, heads=2, text_dim=32,
                                   pooled_text=pooled).eval()
        return MeBT(vocab_size=64, grid=(3, 4, 4), dim=32, depth=2, heads=2, num_latents=8, text_dim=32,
                    pooled_text=pooled).eval()

    plain, pooled = build(False), build(True)
    pooled.load_state_dict(plain.state_dict(), strict=False)  # same weights; global_proj stays zero
    tokens = torch.randint(0, 64, (2, 3, 4, 4))
    tokens[:, 1:] = plain.mask_id
    text, mask = torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.bool)
    torch.testing.assert_close(pooled(tokens, text, mask), plain(tokens, text, mask))
    with torch.no_grad():
        pooled.text.global_proj.weight.normal_(0, 0.5)
    # Now the pooled vector carries the caption to every masked position...
    with_pool = pooled(tokens, text, mask)
    assert not torch.allclose(with_pool, plain(tokens, text, mask))
    # ...and a dropped caption still pools to the null token alone: CFG's unconditional pass.
    dropped = pooled(tokens, text, mask, drop_text=torch.tensor([True, True]))
    torch.testing.assert_close(dropped, pooled(tokens))
    torch.testing.assert_close(pooled(tokens, torch.randn(2, 6, 32), mask, drop_text=torch.tensor([True, True])),
                               dropped)


@pytest.mark.parametrize("kind", ["maskgit", "mebt"])
def test_masked_only_logits_are_the_full_logits_at_the_masked_positions_in_order(kind):
    from maskvid.models.mebt import MeBT

    torch.manual_seed(0)
    if kind == "maskgit":
        net = MaskGITBackbone(vocab_size=64, grid=(3, 4, 4), dim=32, depth=2, heads=2, text_dim=32).eval()
    else:
        net = MeBT(vocab_size=64, grid=(3, 4, 4), dim=32, depth=2, heads=2, num_latents=8, text_dim=32).eval()
    tokens = torch.randint(0, 64, (3, 3, 4, 4))
    # Different masked counts per row: MeBT pads its query sets, which must not leak into the result.
    for row, ratio in enumerate((0.2, 0.6, 0.9)):
        tokens[row][torch.rand(3, 4, 4) < ratio] = net.mask_id
    text, mask = torch.randn(3, 6, 32), torch.ones(3, 6, dtype=torch.bool)
    drop = torch.tensor([False, True, False])
    full = net(tokens, text, mask, drop_text=drop)
    only = net(tokens, text, mask, drop_text=drop, masked_only=True)
    torch.testing.assert_close(only, full[tokens == net.mask_id], rtol=1e-5, atol=1e-5)


def test_linear_cfg_schedule_ramps_from_one_to_the_scale(monkeypatch):
    import maskvid.models.sampling as sampling

    options = SamplingOptions(steps=4, cfg_scale=3.0, cfg_schedule="linear")
    assert [options.guidance(k) for k in range(4)] == [1.5, 2.0, 2.5, 3.0]
    assert SamplingOptions(steps=4, cfg_scale=3.0).guidance(0) == 3.0
    with pytest.raises(ValueError, match="cfg_schedule"):
        SamplingOptions(cfg_schedule="cosine").check()
    # The sampler asks for exactly those scales, step by step.
    seen = []
    real = sampling.guided_logits
    monkeypatch.setattr(sampling, "guided_logits", lambda *a: seen.append(a[4]) or real(*a))  # a[4]: cfg_scale
    text, mask = torch.randn(1, 6, 32), torch.ones(1, 6, dtype=torch.bool)
    out = maskgit_sample(backbone().eval(), (3, 4, 4), text, mask, options, torch.Generator().manual_seed(0))
    assert seen == [1.5, 2.0, 2.5, 3.0] and not (out == 64).any()


def test_local_mixing_starts_as_a_no_op_and_reads_only_the_3x3x3_neighbourhood():
    from maskvid.models.layers import LocalMixing

    torch.manual_seed(0)
    plain = backbone()
    torch.manual_seed(0)
    local = MaskGITBackbone(vocab_size=64, grid=(5, 4, 4), dim=32, depth=2, heads=2, text_dim=32, local_mixing=True)
    local.load_state_dict(plain.state_dict(), strict=False)
    tokens = torch.randint(0, 65, (2, 3, 4, 4))
    text, mask = torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.bool)
    torch.testing.assert_close(local.eval()(tokens, text, mask), plain.eval()(tokens, text, mask))

    mix = LocalMixing(8)
    with torch.no_grad():
        mix.conv.weight.normal_()
    grid = (3, 4, 4)
    x = torch.randn(1, 48, 8)
    changed = x.clone()
    changed[0, 0] += torch.randn(8)  # token (t=0, h=0, w=0)
    diff = (mix(changed, grid) - mix(x, grid)).abs().sum(-1).reshape(grid)
    near = torch.zeros(grid, dtype=torch.bool)
    near[:2, :2, :2] = True
    assert (diff[near] > 0).all() and (diff[~near] == 0).all()


class _ModeOfObserved(torch.nn.Module):
    """A stand-in backbone that predicts, at every position, the commonest observed token of its
    clip (uniform logits while nothing is observed): the model a refinement round should obey."""

    mask_id = 8

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the sampler a device

    def forward(self, tokens, text=None, text_mask=None, drop_text=None, masked_only=False, valid=None):
        b, t, h, w = tokens.shape
        flat = tokens.reshape(b, -1)
        logits = torch.zeros(b, flat.shape[1], self.mask_id)
        for row in range(b):
            seen = flat[row][flat[row] != self.mask_id]
            if seen.numel():
                logits[row, :, int(seen.mode().values)] = 20.0
        return logits.reshape(b, t, h, w, self.mask_id)


def test_refinement_redraws_generated_tokens_from_the_rest_and_keeps_primed_ones():
    net = _ModeOfObserved()
    grid = (3, 4, 4)
    plain = SamplingOptions(steps=6, cfg_scale=1.0, noise=0.0)
    refined = SamplingOptions(steps=6, cfg_scale=1.0, noise=0.0, refine_steps=30, refine_ratio=0.25)
    # The first step commits one token drawn with nothing observed; the loop never revisits it.
    # Refinement rounds re-mask it and predict it from the rest.
    before = maskgit_sample(net, grid, None, None, plain, torch.Generator().manual_seed(3), batch_size=4)
    after = maskgit_sample(net, grid, None, None, refined, torch.Generator().manual_seed(3), batch_size=4)
    assert any(len(row.unique()) > 1 for row in before.reshape(4, -1))
    assert all(len(row.unique()) == 1 for row in after.reshape(4, -1))
    assert torch.equal(after, maskgit_sample(net, grid, None, None, refined, torch.Generator().manual_seed(3), batch_size=4))
    # Story mode: the primed latent frame is context, never re-masked.
    prime = torch.tensor([0, 1, 2, 3] * 4).reshape(1, 1, 4, 4)
    story = maskgit_sample(net, grid, None, None, refined, torch.Generator().manual_seed(0), prime=prime, batch_size=1)
    assert torch.equal(story[:, :1], prime)
    for bad in (dict(refine_steps=-1), dict(refine_ratio=0.0), dict(refine_ratio=1.5)):
        with pytest.raises(ValueError, match="refine"):
            SamplingOptions(**bad).check()


def test_configured_sampler_is_validated_and_travels_in_the_checkpoint(parts):
    from maskvid.lightning_modules.config_errors import ModelOptionError

    with pytest.raises(ModelOptionError, match="model.init_args.temperature"):
        module(parts, temperature=0.0)
    with pytest.raises(ModelOptionError, match="model.init_args.refine_ratio"):
        module(parts, refine_ratio=2.0)
    m = module(parts, temperature=0.25, top_k=5, refine_steps=3, cfg_scale=2.0)
    checkpoint: dict = {}
    m.grid = (3, 4, 4)
    m.on_save_checkpoint(checkpoint)
    from maskvid.models.stage2_checkpoint import STAGE2_KEY

    sampling = checkpoint[STAGE2_KEY]["sampling"]
    assert sampling["temperature"] == 0.25 and sampling["top_k"] == 5 and sampling["refine_steps"] == 3
    assert SamplingOptions(**sampling) == m.sampling_options()


def test_training_masks_are_drawn_from_the_step_seed_of_mask_seed_rank_and_step(parts, monkeypatch):
    """One seeding scheme (lightning_modules/step_seed.py) for the global RNGs and the masks."""
    from types import SimpleNamespace

    from maskvid.lightning_modules.step_seed import step_seed

    m = module(parts, mask_seed=7)
    seeds = []

    def masked_loss(backbone, batch, generator=None, **kwargs):
        seeds.append(generator.initial_seed())
        return {"loss": torch.zeros(()), "accuracy": torch.zeros(()), "mask_ratio": torch.zeros(()), "latent_frames": 1}

    monkeypatch.setattr(m, "masked_loss", masked_loss)
    monkeypatch.setattr(m, "log", lambda *a, **k: None)
    monkeypatch.setattr(m, "log_dict", lambda *a, **k: None)
    for rank, step in [(0, 0), (1, 0), (1, 5)]:
        m._trainer = SimpleNamespace(global_rank=rank, global_step=step)
        m.training_step({"caption": ["a red square"]}, 0)
    m._trainer = None
    assert seeds == [step_seed(7, 0, 0), step_seed(7, 1, 0), step_seed(7, 1, 5)]
    assert len(set(seeds)) == 3


def test_validation_samples_are_seeded_from_the_step_seed_of_rank_and_chunk(parts, monkeypatch):
    from types import SimpleNamespace

    from maskvid.lightning_modules.step_seed import step_seed

    m = module(parts, val_prompts=["a red square", "a blue circle", "a green triangle"], num_val_videos=3,
               val_sample_batch_size=2, num_log_videos=0)
    m.grid = (2, 4, 4)
    seeds = []
    monkeypatch.setattr(m, "generate", lambda prompts, grid, seed=0, options=None: seeds.append(seed) or torch.zeros(1))
    monkeypatch.setattr(m.val_video, "update_generated", lambda *a, **k: None)
    monkeypatch.setattr(m.val_video, "compute", lambda prefix: {})
    m._trainer = SimpleNamespace(sanity_checking=False, world_size=2, global_rank=1, is_global_zero=False)
    m.on_validation_epoch_end()
    m._trainer = None
    assert seeds == [step_seed(0, 1, 0), step_seed(0, 1, 1)]  # rank 1's two chunks
