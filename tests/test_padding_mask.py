"""Padded positions are never seen (issue 35, item 1): a short clip or an image is padded by
repeating its last frame, and those copies of the answer must reach no real position, in either
backbone, in training (logits and loss) and in sampling.

Every check has a control: the same change with the mask switched off inside the backbone does
change real logits, so the checks would fail without it.
"""

from __future__ import annotations

import pytest
import torch

import maskvid.models.maskgit as maskgit_module
import maskvid.models.mebt as mebt_module
from maskvid.models.maskgit import MaskGITBackbone
from maskvid.models.mebt import MeBT
from maskvid.models.sampling import SamplingOptions, mask_ratio, maskgit_sample

VOCAB, GRID, TEXT_DIM = 12, (4, 2, 3), 8
# Row 0: a whole clip; row 1: a short clip (2 of 4 latent frames real); row 2: an image (1).
VALID = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)


def network(kind: str) -> torch.nn.Module:
    """A tiny backbone with every locality/text option on, and every weight random: the
    zero-initialised convolutions and pooled projections would otherwise hide a leak."""
    torch.manual_seed(0)
    if kind == "maskgit":
        net = MaskGITBackbone(vocab_size=VOCAB, grid=GRID, dim=16, depth=2, heads=2, text_dim=TEXT_DIM,
                              pooled_text=True, local_mixing=True)
    else:
        net = MeBT(vocab_size=VOCAB, grid=GRID, dim=16, depth=2, heads=2, num_latents=4, text_dim=TEXT_DIM,
                   pooled_text=True, local_context=True, query_text=True)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    return net.eval()


def inputs(seed: int = 0):
    """(tokens with some real positions masked, text, text_mask)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (3, *GRID), generator=g)
    tokens = tokens.masked_fill(torch.rand(tokens.shape, generator=g) < 0.4, VOCAB)
    text = torch.randn(3, 5, TEXT_DIM, generator=g)
    text_mask = torch.ones(3, 5, dtype=torch.bool)
    text_mask[1, 3:] = False
    return tokens, text, text_mask


def repad(tokens: torch.Tensor, valid: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """tokens with every padded position replaced by a random id (the mask id included)."""
    noise = torch.randint(0, VOCAB + 1, tokens.shape, generator=generator)
    return torch.where(valid[:, :, None, None], tokens, noise)


def real(x: torch.Tensor, valid: torch.Tensor = VALID) -> torch.Tensor:
    """The rows of x [B, t, h, w, ...] at real positions."""
    return x[valid[:, :, None, None].expand(-1, *GRID)]


def mask_off(monkeypatch) -> None:
    """The control: the backbones ignore their valid argument (what they did before issue 35)."""
    for module in (maskgit_module, mebt_module):
        monkeypatch.setattr(module, "token_valid", lambda valid, grid: None)


@pytest.mark.parametrize("kind", ["maskgit", "mebt"])
def test_padded_tokens_change_no_real_logit(kind, monkeypatch):
    net = network(kind)
    tokens, text, text_mask = inputs()
    other = repad(tokens, VALID, torch.Generator().manual_seed(1))
    assert not torch.equal(tokens, other)
    with torch.no_grad():
        full = [net(t, text, text_mask, valid=VALID) for t in (tokens, other)]
        torch.testing.assert_close(real(full[0]), real(full[1]), rtol=0, atol=1e-6)
        # masked_only: the masked real positions, whatever the padding holds (mask ids included).
        only = [net(t, text, text_mask, masked_only=True, valid=VALID) for t in (tokens, other)]
        queried = real(tokens == VOCAB)
        assert only[0].shape[0] == only[1].shape[0] == int(queried.sum())
        torch.testing.assert_close(only[0], only[1], rtol=0, atol=1e-6)
        torch.testing.assert_close(only[0], real(full[0])[queried], rtol=0, atol=1e-5)
        # A per-token mask is the same mask.
        per_token = VALID[:, :, None, None].expand(-1, *GRID)
        torch.testing.assert_close(net(other, text, text_mask, valid=per_token), full[1], rtol=0, atol=0)
        # The whole clip (row 0) is unaffected by its neighbours' padding.
        torch.testing.assert_close(full[0][:1], net(tokens[:1], text[:1], text_mask[:1]), rtol=0, atol=1e-5)
    mask_off(monkeypatch)
    with torch.no_grad():
        leaky = [net(t, text, text_mask, valid=VALID) for t in (tokens, other)]
    assert (real(leaky[0]) - real(leaky[1])).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["maskgit", "mebt"])
def test_a_padded_clip_is_its_real_frames_alone(kind):
    """Padding hidden entirely: each clip's real logits are those of the clip cut to its real
    latent frames (no key, no convolution input, no context beyond them)."""
    net = network(kind).double()
    tokens, text, text_mask = inputs(2)
    with torch.no_grad():
        padded = net(tokens, text.double(), text_mask, valid=VALID)
        for row, frames in enumerate(VALID.sum(1).tolist()):
            alone = net(tokens[row : row + 1, :frames], text[row : row + 1].double(), text_mask[row : row + 1])
            torch.testing.assert_close(padded[row : row + 1, :frames], alone, rtol=0, atol=1e-9)


def test_all_real_batches_stay_on_the_unmasked_attention_path(monkeypatch):
    import maskvid.models.attention as attention_module

    seen = []  # the masks of the self-attention calls (keys: the 24 tokens, not the caption)
    dense = attention_module.attention

    def spy(q, k, v, attn_mask=None, is_causal=False):
        if k.shape[2] == 24:
            seen.append(attn_mask)
        return dense(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    monkeypatch.setattr(attention_module, "attention", spy)
    net = network("maskgit")
    tokens, text, text_mask = inputs()
    with torch.no_grad():
        all_real = net(tokens, text, text_mask, valid=torch.ones(3, GRID[0], dtype=torch.bool))
        assert seen and all(m is None for m in seen)
        torch.testing.assert_close(all_real, net(tokens, text, text_mask), rtol=0, atol=0)
        seen.clear()
        net(tokens, text, text_mask, valid=VALID)
    # Each block's self-attention gets a key mask: [B, 1, 1, N], the padding False.
    masks = [m for m in seen if m is not None]
    assert len(masks) == 2 and torch.equal(masks[0][:, 0, 0], VALID[:, :, None].expand(-1, -1, 6).flatten(1))


class Repadding(torch.nn.Module):
    """Wraps a backbone; with `repad`, puts fresh random tokens at the padded positions of every
    call: what the sampler's real tokens must not depend on. Records each call's tokens and
    logits."""

    def __init__(self, net: torch.nn.Module, repad: bool = True) -> None:
        super().__init__()
        self.net, self.repad = net, repad
        self.mask_id, self.vocab_size = net.mask_id, net.vocab_size
        self.generator = torch.Generator().manual_seed(123)
        self.calls: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []

    def forward(self, tokens, text=None, text_mask=None, drop_text=None, masked_only=False, valid=None):
        self.calls.append(tokens.clone())
        if self.repad:
            tokens = repad(tokens, VALID.repeat(tokens.shape[0] // len(VALID), 1), self.generator)
        out = self.net(tokens, text, text_mask, drop_text=drop_text, masked_only=masked_only, valid=valid)
        self.logits.append(out)
        return out


def real_logits(spy: Repadding) -> list[torch.Tensor]:
    """Each call's logits at the real positions (conditional and unconditional rows)."""
    return [real(out, VALID.repeat(len(out) // len(VALID), 1)) for out in spy.logits]


@pytest.mark.parametrize("kind", ["maskgit", "mebt"])
def test_the_sampler_never_fills_scores_or_counts_padded_positions(kind, monkeypatch):
    net = network(kind)
    _, text, text_mask = inputs()
    options = SamplingOptions(steps=4, cfg_scale=2.0, refine_steps=1)

    def sample(backbone):
        return maskgit_sample(backbone, GRID, text, text_mask, options, torch.Generator().manual_seed(5), valid=VALID)

    plain, spy = Repadding(net, repad=False), Repadding(net)
    tokens, repadded = sample(plain), sample(spy)
    # Same seed, same real logits at every call and the same real tokens, whatever the padding
    # held; the padding comes back unfilled.
    assert len(spy.logits) == options.steps + options.refine_steps
    for a, b in zip(real_logits(plain), real_logits(spy)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.equal(real(tokens), real(repadded))
    assert not (real(tokens) == VOCAB).any()
    assert (tokens[~VALID] == VOCAB).all() and (repadded[~VALID] == VOCAB).all()
    # The schedule counts real positions only: before step s, floor(real * cos(pi/2 * s/steps)) of
    # each clip's real positions are masked (all of them before the first step).
    per_clip = VALID.sum(1) * GRID[1] * GRID[2]
    for step, call in enumerate(spy.calls[: options.steps]):
        masked = (call[:3] == VOCAB) & VALID[:, :, None, None]
        expected = per_clip if step == 0 else torch.floor(per_clip.float() * mask_ratio(step / options.steps)).long()
        assert torch.equal(masked.flatten(1).sum(1), expected), (step, masked.flatten(1).sum(1), expected)
        assert (call[:3][~VALID] == VOCAB).all()  # the sampler never writes into the padding
    # Control: with the backbone ignoring the mask, the padding reaches the real logits (the
    # first call's inputs are the same in both runs: every real position masked).
    mask_off(monkeypatch)
    plain, spy = Repadding(net, repad=False), Repadding(net)
    sample(plain), sample(spy)
    assert (real_logits(plain)[0] - real_logits(spy)[0]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from tests.stage2_fixtures import tiny_t5_dir, tiny_tokenizer, write_tokenizer_checkpoint

    root = tmp_path_factory.mktemp("padding")
    return {"t5": str(tiny_t5_dir(root / "t5")), "tok": str(write_tokenizer_checkpoint(root / "tok.ckpt", tiny_tokenizer()))}


@pytest.mark.parametrize("kind", ["maskgit", "mebt"])
def test_the_training_loss_ignores_what_the_padded_frames_hold(kind, parts, monkeypatch):
    """Video batches as the datamodule makes them: a short clip and an image padded by repeating
    their last frame. Replacing the padding with noise leaves the loss unchanged."""
    from maskvid.lightning_modules.masked_video_module import MaskedVideoModule

    torch.manual_seed(0)
    if kind == "maskgit":
        net = MaskGITBackbone(vocab_size=64, grid=(3, 4, 4), dim=16, depth=2, heads=2, text_dim=32, local_mixing=True)
    else:
        net = MeBT(vocab_size=64, grid=(3, 4, 4), dim=16, depth=1, heads=2, num_latents=4, text_dim=32,
                   local_context=True)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    m = MaskedVideoModule(net, parts["tok"], text_encoder=parts["t5"], text_max_length=8, ema_decay=None)
    clip = torch.rand(3, 3, 5, 32, 32) * 2 - 1
    frame_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    last = frame_mask.sum(1) - 1
    padded = clip.clone()
    for row, end in enumerate(last.tolist()):
        padded[row, :, end + 1 :] = clip[row, :, end : end + 1]  # the datamodule's padding
    noisy = torch.where(frame_mask[:, None, :, None, None], clip, torch.rand_like(clip) * 2 - 1)

    def loss(video):
        batch = {"video": video, "frame_mask": frame_mask, "caption": ["a red ball", "a cat", "a dog"]}
        return m.masked_loss(m.backbone, batch, generator=torch.Generator().manual_seed(4))["loss"]

    tokens = [m.tokenizer.encode(v) for v in (padded, noisy)]
    assert not torch.equal(tokens[0], tokens[1])  # the padded latent frames' tokens differ
    torch.testing.assert_close(loss(padded), loss(noisy), rtol=0, atol=1e-6)
    mask_off(monkeypatch)
    assert (loss(padded) - loss(noisy)).abs() > 1e-4
