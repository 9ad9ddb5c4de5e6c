"""MeBT: the backbone interface, set packing, variable-length attention equal to a per-clip
reference, no N x N attention, batch independence, sampling and frame extrapolation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import maskvid.models.attention as attention
from maskvid.models.attention import uniform
from maskvid.models.mebt import MeBT, join, pack_caption, pack_sets
from maskvid.models.sampling import SamplingOptions, maskgit_sample


def net(**kw) -> MeBT:
    torch.manual_seed(0)
    args = dict(vocab_size=64, grid=(3, 4, 4), dim=32, depth=2, heads=2, num_latents=8, text_dim=16)
    return MeBT(**(args | kw)).eval()


def test_pack_sets_packs_variable_sizes_clip_by_clip():
    selected = torch.tensor([[True, False, True, False], [False, False, False, True]])
    sets = pack_sets(selected)
    assert sets.index.tolist() == [0, 2, 7]  # row-major positions in the flattened [B * N]
    assert sets.clip.tolist() == [0, 0, 1]
    assert sets.seqs.cu.tolist() == [0, 2, 3] and sets.seqs.cu.dtype == torch.int32
    assert sets.seqs.max_len == 4  # a static bound (N), not the batch's largest count
    empty = pack_sets(torch.zeros(2, 4, dtype=torch.bool))
    assert empty.index.numel() == 0 and empty.seqs.cu.tolist() == [0, 0, 0]


def test_join_and_caption_packing_put_each_clip_s_rows_together():
    # Context: clip 0 has observed rows a0 a1, clip 1 has b0; captions: clip 0 keeps 1 token,
    # clip 1 keeps 2, and one padded place is left over (it belongs to no clip and goes last).
    observed = pack_sets(torch.tensor([[True, True, False], [False, True, False]]))
    text = torch.arange(6.0).view(2, 3, 1)
    caption = pack_caption(text, torch.tensor([[False, True, False], [True, True, False]]))
    assert caption.rows.flatten().tolist()[:3] == [1.0, 3.0, 4.0] and caption.seqs.cu.tolist() == [0, 1, 3]
    assert caption.clip.tolist() == [0, 1, 1, 2, 2, 2]
    keys = join(observed.clip, observed.seqs, caption.clip, caption.seqs)
    ctx = torch.tensor([[10.0], [11.0], [20.0]])
    joined = keys(ctx, caption.rows).flatten().tolist()
    assert joined[:6] == [10.0, 11.0, 1.0, 20.0, 3.0, 4.0]
    assert keys.seqs.cu.tolist() == [0, 3, 6] and keys.seqs.max_len == 3 + 3


def per_clip_attention(q, k, v, cu_q, cu_k, max_q, max_k):
    """The reference: every clip's queries read exactly its own keys, one plain SDPA per clip."""
    out = torch.zeros_like(q)
    for b in range(cu_q.numel() - 1):
        (q0, q1), (k0, k1) = cu_q[b:b + 2].tolist(), cu_k[b:b + 2].tolist()
        assert q1 - q0 <= max_q and k1 - k0 <= max_k
        if q1 > q0:
            read = F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (q[q0:q1], k[k0:k1], v[k0:k1])))
            out[q0:q1] = read[0].transpose(0, 1)
    return out


def test_varlen_attention_gives_the_per_clip_reference_s_logits_and_gradients(monkeypatch):
    """Every variable-length read (latents <- observed tokens + caption, queries <- latents,
    latents <- [latents, queries], queries <- caption) through `varlen_attention` gives the logits
    and gradients of exact per-clip attention, with every packed path on, a clip with only masked
    and one with no masked token, a dropped and a short caption."""
    m = net(local_context=True, pooled_text=True, query_text=True).train()
    for p in m.parameters():  # zero-initialised parts would hide a difference
        torch.nn.init.normal_(p, std=0.1)
    torch.manual_seed(2)
    tokens = torch.randint(0, 64, (4, 3, 4, 4))
    tokens[0] = m.mask_id  # all masked: the encoder reads the caption alone
    tokens[1, :, :, ::2] = m.mask_id
    tokens[3, 0, 0, :3] = m.mask_id  # clip 2 has no masked token at all
    text = torch.randn(4, 5, 16)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]).bool()
    drop = torch.tensor([False, False, True, False])
    calls = []
    real = attention.varlen_attention
    seen = {}
    for name, impl in (("varlen", real), ("reference", per_clip_attention)):
        monkeypatch.setattr(attention, "varlen_attention", lambda *a, impl=impl: calls.append(a[3].numel()) or impl(*a))
        m.zero_grad()
        out = m(tokens, text, text_mask, drop, masked_only=True)
        out.square().mean().backward()
        seen[name] = (out.detach(), [p.grad.clone() for p in m.parameters()])
    # Per layer: encoder 1 read; decoder: queries <- latents, <- caption, latents <- [latents, queries] (not the last).
    assert len(calls) == 2 * (2 + 2 * 2 + 1)
    torch.testing.assert_close(seen["varlen"][0], seen["reference"][0])
    for g, ref in zip(seen["varlen"][1], seen["reference"][1]):
        torch.testing.assert_close(g, ref)


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


@pytest.mark.parametrize("query_text", [False, True])
def test_no_attention_is_quadratic_in_the_number_of_tokens(monkeypatch, query_text):
    """Every attention call has M latents or the caption (L tokens) on one side: its score matrix
    is at most N x M or N x L."""
    m = net(num_latents=8, query_text=query_text)
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
    caption = 5 + 1  # the text tokens and the null token
    for q_len, k_len in shapes:
        assert n_latents in (q_len, k_len) or k_len == caption, (q_len, k_len)
        assert min(q_len, k_len) <= n_latents + 48  # latents + queries at most, never 48 x 48 alone


def test_samples_past_the_trained_length():
    m = net()
    text, mask = torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool)
    out = maskgit_sample(m, (6, 4, 4), text, mask, SamplingOptions(steps=3), torch.Generator().manual_seed(0))
    assert out.shape == (1, 6, 4, 4) and int(out.max()) < 64
    with pytest.raises(ValueError, match="spatial grid"):
        m(torch.zeros(1, 3, 5, 4, dtype=torch.long))


def test_forward_flops_grow_linearly_with_video_length():
    """Same model and latents: 129 frames (65 latent frames) cost at most 8.5x 17 frames (9)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = MeBT(vocab_size=64, grid=(65, 8, 8), dim=64, depth=2, heads=4, num_latents=32, text_dim=16).eval()

    def flops(t: int) -> int:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 64, (1, t, 8, 8), generator=g)
        tokens[torch.rand(tokens.shape, generator=g) < 0.5] = m.mask_id  # half masked, as in training
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(tokens, torch.randn(1, 16, 16), torch.ones(1, 16, dtype=torch.bool))
        return counter.get_total_flops()

    ratio = flops(65) / flops(9)
    assert ratio <= 8.5, ratio
    assert ratio > 65 / 9 * 0.8  # and it does grow with the number of tokens


def decoder_inputs(selected: torch.Tensor, latents: torch.Tensor):
    """The packed layouts a DecoderLayer reads: (query seqs, latent seqs, join of latents and queries)."""
    sets = pack_sets(selected)
    b, m = latents.shape[:2]
    latent_seqs = uniform(b, m, "cpu")
    keys = join(torch.arange(b).repeat_interleave(m), latent_seqs, sets.clip, sets.seqs)
    return sets.seqs, latent_seqs, keys


def test_a_masked_query_does_not_depend_on_another_masked_query():
    from maskvid.models.mebt import DecoderLayer

    torch.manual_seed(0)
    layer = DecoderLayer(32, 2, 4.0).eval()
    # Two clips with 5 and 2 masked queries, packed: [T=7, D].
    latents, queries = torch.randn(2, 8, 32), torch.randn(7, 32)
    seqs, latent_seqs, keys = decoder_inputs(torch.tensor([[True] * 5 + [False], [True, True] + [False] * 4]), latents)
    assert seqs.cu.tolist() == [0, 5, 7]
    out, new_latents = layer(queries, seqs, latents, latent_seqs, keys)
    changed = queries.clone()
    changed[3] = torch.randn(32)
    out2, new_latents2 = layer(changed, seqs, latents, latent_seqs, keys)
    torch.testing.assert_close(out2[[0, 1, 2, 4, 5, 6]], out[[0, 1, 2, 4, 5, 6]])
    assert not torch.allclose(out2[3], out[3])
    # The latents do read the queries (of their own clip only).
    assert not torch.allclose(new_latents2[0], new_latents[0])
    torch.testing.assert_close(new_latents2[1], new_latents[1])


def test_sampling_fills_every_masked_position_with_partial_context():
    m = net()
    text, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    prime = torch.randint(0, 64, (2, 1, 4, 4))
    out = maskgit_sample(m, (3, 4, 4), text, mask, SamplingOptions(steps=4), torch.Generator().manual_seed(0),
                         prime=prime)
    assert not (out == m.mask_id).any() and torch.equal(out[:, :1], prime)


def test_local_context_reads_only_observed_neighbours_and_starts_as_a_no_op():
    from maskvid.models.layers import LocalMixing

    plain, local = net(), net(local_context=True)
    local.load_state_dict(plain.state_dict(), strict=False)
    tokens = torch.randint(0, 64, (2, 3, 4, 4))
    tokens[:, 1:] = plain.mask_id
    text, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(local(tokens, text, mask), plain(tokens, text, mask))

    # Masked positions enter the convolution as zeros: their (embedding) content never leaks.
    mix = LocalMixing(8)
    with torch.no_grad():
        mix.conv.weight.normal_()
    x, keep = torch.randn(1, 48, 8), torch.rand(1, 48) < 0.5
    changed = x.clone()
    changed[~keep] = torch.randn(int((~keep).sum()), 8)
    torch.testing.assert_close(mix(changed, (3, 4, 4), keep=keep), mix(x, (3, 4, 4), keep=keep))

    # With a trained (non-zero) convolution, a masked position's prediction sees its observed
    # neighbour through it.
    with torch.no_grad():
        local.local.conv.weight.normal_(0, 0.5)
    neighbour = tokens.clone()
    neighbour[0, 0, 0, 0] = (tokens[0, 0, 0, 0] + 1) % 64
    before, after = local(tokens, text, mask), local(neighbour, text, mask)
    assert not torch.allclose(before[0, 1, 0, 0], after[0, 1, 0, 0])


def test_time_positions_start_at_the_scale_of_the_other_embeddings():
    # Raw sin/cos time embeddings (|x| ~ 0.7) drowned token identity and (h, w) positions
    # (std 0.02) by ~35x; the learned projection starts them at the same scale, for any length.
    m = net(dim=64)
    spatial = m.pos_h.std().item()
    for t in (3, 33):
        time = m.positions(t, 1, 1, "cpu") - m.pos_h[0] - m.pos_w[0]  # [t, D]: the time part alone
        assert 0.5 * spatial < time.std().item() < 2 * spatial


def test_latents_stay_distinct_when_the_pooled_caption_is_added():
    # Every latent gets the same pooled caption vector; the latents must still differ after the
    # encoder's first norm, or they all ask the context the same question. Here the pooled vector
    # is at the scale a trained demo model reached (rms ~0.5); with latents initialised at std 0.02
    # their pairwise cosine was 0.997.
    torch.manual_seed(0)
    m = net(dim=64, num_latents=16, pooled_text=True)
    with torch.no_grad():
        m.text.global_proj.weight.normal_(0, 0.5 / 64**0.5)
    text = torch.randn(2, 5, m.text_dim)
    context, mask = m.text(text, torch.ones(2, 5, dtype=torch.bool), 2)
    pooled = m.text.pooled(context, mask)
    pooled = pooled * 0.5 / pooled.pow(2).mean().sqrt()
    latents = F.normalize(F.layer_norm(m.latents + pooled, (64,)), dim=-1)  # [2, M, D]
    cos = latents @ latents.transpose(1, 2)
    off_diagonal = cos[:, ~torch.eye(16, dtype=torch.bool)]
    assert off_diagonal.mean().item() < 0.5



def test_query_text_lets_every_masked_query_read_the_caption_and_keeps_cfg_text_free():
    # Through the latents and the pooled vector alone, the demo MeBT never used the direction
    # word (maskvid.metrics.caption_sensitivity); query_text gives every query its own read of the caption.
    from maskvid.models.mebt import TextRead

    m = net(query_text=True)
    assert all(isinstance(layer.query_text, TextRead) for layer in m.decoder)
    tokens = torch.randint(0, 64, (2, 3, 4, 4))
    tokens[:, 1:] = m.mask_id
    text, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    logits = m(tokens, text, mask)
    # A changed caption word changes the masked logits, and the queries' own read sees it directly.
    changed = text.clone()
    changed[:, 2] = torch.randn(2, 16)
    assert not torch.allclose(m(tokens, changed, mask)[:, 1:], logits[:, 1:])
    read = m.decoder[0].query_text
    queries, latents = torch.randn(6, 32), torch.randn(1, 8, 32)
    seqs, latent_seqs, keys = decoder_inputs(torch.ones(1, 6, dtype=torch.bool), latents)
    caption = pack_caption(*m.text(text[:1], mask[:1], 1))
    other = pack_caption(*m.text(changed[:1], mask[:1], 1))
    assert not torch.allclose(read(queries, seqs, caption), read(queries, seqs, other))
    # Padding is not read...
    padded = torch.cat([text, torch.randn(2, 3, 16)], 1)
    pad_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    torch.testing.assert_close(m(tokens, padded, pad_mask), logits)
    # ...and a dropped caption leaves only the null token: CFG's unconditional pass.
    dropped = m(tokens, text, mask, drop_text=torch.tensor([True, True]))
    torch.testing.assert_close(dropped, m(tokens))
    torch.testing.assert_close(m(tokens, changed, mask, drop_text=torch.tensor([True, True])), dropped)
    # Masked queries still never see each other.
    from maskvid.models.mebt import DecoderLayer

    layer = DecoderLayer(32, 2, 4.0, query_text=True).eval()
    out, _ = layer(queries, seqs, latents, latent_seqs, keys, caption)
    moved = queries.clone()
    moved[3] = torch.randn(32)
    out2, _ = layer(moved, seqs, latents, latent_seqs, keys, caption)
    torch.testing.assert_close(out2[[0, 1, 2, 4, 5]], out[[0, 1, 2, 4, 5]])
