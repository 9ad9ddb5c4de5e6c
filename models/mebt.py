"""MeBT: a memory-efficient bidirectional transformer for video tokens (Yoo et al., CVPR 2023),
text-conditioned (our extension), or unconditional as in the paper with text_dim None.

Observed tokens and the text are projected into M learned latents (encoder: latents cross-attend
to the context, alternating with latent self-attention); masked positions are decoded by
cross-attending to the latents only (decoder: queries read the latents, latents read
[latents, queries]). No N x N attention anywhere: time and memory are O((N_ctx + N_mask) * M).

Same interface as MaskGITBackbone, so MaskedVideoModule, the sampler and `maskvid generate` take
either:
    forward(tokens [B, t, h, w] (mask id = vocab_size), text, text_mask, drop_text, masked_only=False,
            valid [B, t] or [B, t, h, w] = None)
        -> logits [B, t, h, w, V], or [num_masked, V] with masked_only
Padded positions (valid False) are in neither set: not context, not queried, not local-mixing input.
Time positions are sinusoids through a learned projection, so a model trained on T latent frames
can be asked for more.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from einops import rearrange
from torch import nn

from maskvid.models.attention import (CrossAttention, FeedForward, SelfAttention, Varlen, pack_rows, sinusoidal_embedding,
                              uniform)
from maskvid.models.config import module_config
from maskvid.models.layers import EMBED_STD, LocalMixing, TextConditioning, position_table, token_embedding, token_valid


class Sets(NamedTuple):
    """Variable-length sets of positions (each clip's observed or masked tokens), packed clip by
    clip: every per-token layer (norms, projections, MLPs) runs on the packed members [T, D] with
    no padding, and the attention reads them as packed sequences (`varlen_attention`). With a mask
    ratio drawn per clip, padding every set to the batch's largest one would compute the padding
    in every projection and MLP too."""

    index: torch.Tensor  # [T] the members' positions in the flattened [B * N], row-major
    clip: torch.Tensor  # [T] the clip of each member
    seqs: Varlen  # where each clip's members sit in the packed [T]; max_len N


def pack_sets(selected: torch.Tensor) -> Sets:
    """bool [B, N] -> the selected positions of every row, packed as Sets."""
    n = selected.shape[1]
    index = selected.flatten().nonzero().squeeze(1)
    cu = torch.nn.functional.pad(selected.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    return Sets(index, index // n, Varlen(cu, n))


class Joined(NamedTuple):
    """Two packed tensors joined clip by clip (clip b's rows of the first, then of the second)."""

    order: torch.Tensor  # [T1 + T2] rows of cat([first, second]) in joined order
    seqs: Varlen

    def __call__(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return torch.cat([first, second]).index_select(0, self.order)


def join(first: torch.Tensor, first_seqs: Varlen, second: torch.Tensor, second_seqs: Varlen) -> Joined:
    """first/second: [T1] / [T2] the clip of each row (B for a row of no clip, which goes last)."""
    order = torch.argsort(torch.cat([first, second]), stable=True)
    return Joined(order, Varlen(first_seqs.cu + second_seqs.cu, first_seqs.max_len + second_seqs.max_len))


class Caption(NamedTuple):
    """The text context packed without its padding (`pack_rows`): [B * L, D] rows, each clip's kept
    tokens first, then left-over rows that belong to no clip."""

    rows: torch.Tensor  # [B * L, D]
    clip: torch.Tensor  # [B * L] the clip of each row, B for left-over rows
    seqs: Varlen


def pack_caption(text: torch.Tensor, text_mask: torch.Tensor) -> Caption:
    """text [B, L, D], text_mask [B, L] -> Caption."""
    b, length = text_mask.shape
    order, seqs = pack_rows(text_mask)
    inside = torch.arange(b * length, device=order.device) < seqs.cu[-1]
    clip = torch.where(inside, order // length, b)
    return Caption(rearrange(text, "b l d -> (b l) d").index_select(0, order), clip, seqs)


class TextRead(nn.Module):
    """Tokens read the caption alone: cross-attention with its own softmax over the caption's
    tokens (the null token alone for CFG's unconditional pass)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q, self.norm_text = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, heads)

    def forward(self, x: torch.Tensor, seqs: Varlen, caption: Caption) -> torch.Tensor:
        """x: packed [T, D] in the layout `seqs`; caption: the packed text."""
        kv = self.attn.kv(self.norm_text(caption.rows))
        return x + self.attn.proj(self.attn.attend_varlen(self.attn.q(self.norm_q(x)), kv, seqs, caption.seqs))


class EncoderLayer(nn.Module):
    """Latents read the context (observed tokens + text), then attend among themselves."""

    def __init__(self, dim: int, heads: int, ff_mult: float) -> None:
        super().__init__()
        self.norm_q, self.norm_ctx = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads)
        self.norm_self = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, latent_seqs: Varlen, context_seqs: Varlen
                ) -> torch.Tensor:
        """latents [B, M, D]; context: the observed tokens and the caption joined clip by clip,
        packed [T, D] in the layout `context_seqs`."""
        b = latents.shape[0]
        q = self.cross.q(rearrange(self.norm_q(latents), "b m d -> (b m) d"))
        read = self.cross.attend_varlen(q, self.cross.kv(self.norm_ctx(context)), latent_seqs, context_seqs)
        latents = latents + rearrange(self.cross.proj(read), "(b m) d -> b m d", b=b)
        latents = latents + self.attn(self.norm_self(latents))
        return latents + self.ff(self.norm_ff(latents))


class DecoderLayer(nn.Module):
    """Masked queries read the latents (and, with query_text, the caption); latents read
    [latents, queries]. Queries never read each other."""

    def __init__(
        self, dim: int, heads: int, ff_mult: float, write_latents: bool = True, query_text: bool = False
    ) -> None:
        super().__init__()
        self.norm_q, self.norm_l = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.read = CrossAttention(dim, heads)
        self.query_text = TextRead(dim, heads) if query_text else None
        self.norm_ff_q = nn.LayerNorm(dim)
        self.ff_q = FeedForward(dim, ff_mult)
        # The last layer's latent update would feed nothing (only queries are read out): it has
        # none, which saves its compute and leaves no unused parameters for DDP to trip on.
        self.write_latents = write_latents
        if write_latents:
            self.norm_l2, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.write = CrossAttention(dim, heads)
            self.norm_ff_l = nn.LayerNorm(dim)
            self.ff_l = FeedForward(dim, ff_mult)

    def forward(self, queries: torch.Tensor, query_seqs: Varlen, latents: torch.Tensor, latent_seqs: Varlen,
                keys: Joined, caption: Caption | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """queries: the masked positions, packed [T, D] in the layout `query_seqs`; latents
        [B, M, D] (packed: `latent_seqs`); keys: how latents and queries join clip by clip for the
        latents' read; caption: read by the queries with query_text."""
        b = latents.shape[0]
        flat = rearrange(latents, "b m d -> (b m) d")
        read = self.read.attend_varlen(self.read.q(self.norm_q(queries)), self.read.kv(self.norm_l(flat)),
                                       query_seqs, latent_seqs)
        queries = queries + self.read.proj(read)
        if self.query_text is not None:
            queries = self.query_text(queries, query_seqs, caption)
        queries = queries + self.ff_q(self.norm_ff_q(queries))
        if not self.write_latents:
            return queries, latents
        q = self.write.q(self.norm_l2(flat))
        kv = keys(self.write.kv(self.norm_kv(flat)), self.write.kv(self.norm_kv(queries)))
        read = self.write.attend_varlen(q, kv, latent_seqs, keys.seqs)
        latents = latents + rearrange(self.write.proj(read), "(b m) d -> b m d", b=b)
        latents = latents + self.ff_l(self.norm_ff_l(latents))
        return queries, latents


class MeBT(nn.Module):
    """Linear-cost bidirectional masked-token transformer."""

    def __init__(
        self,
        vocab_size: int = 8192,
        grid: tuple[int, int, int] = (9, 8, 8),
        dim: int = 512,
        depth: int = 8,
        decoder_depth: int | None = None,
        heads: int = 8,
        num_latents: int = 256,
        text_dim: int | None = 384,
        ff_mult: float = 4.0,
        pooled_text: bool = False,
        local_context: bool = False,
        query_text: bool = False,
    ) -> None:
        """
        Args:
            vocab_size: Tokenizer vocabulary (must match the stage-1 tokenizer).
            grid: Token grid (t, h, w) of training clips; h and w are limits, t is not (time
                positions are sinusoidal, for extrapolation).
            dim: Width.
            depth: Encoder layers (latents <- context, latent self-attention).
            decoder_depth: Decoder layers (queries <- latents, latents <- [latents, queries]);
                default: depth.
            heads: Attention heads.
            num_latents: M, the number of latent tokens (the paper uses 256).
            text_dim: Width of the text encoder's embeddings; null builds the paper's unconditional
                model (no text parameters; it takes no text).
            ff_mult: MLP hidden width as a multiple of dim.
            pooled_text: Also add a pooled caption vector to the latents and to every masked
                query (besides the text in the encoder's context), so that the decoder sees the
                caption directly rather than only through the latents.
            local_context: Give every position (observed and masked) a zero-initialised depthwise
                3x3x3 convolution of the *observed* tokens around it (masked ones are zeros in
                its input): a locality prior that keeps masked queries independent of each other
                and the cost linear.
            query_text: In every decoder layer, the masked queries also read the caption (their
                own softmax over its tokens; cost O(N_mask * L), still linear). Without it the
                caption reaches a query only through the latents and the pooled vector, and the
                demo MeBT never used the direction word (`python -m maskvid.metrics.caption_sensitivity`).
        """
        super().__init__()
        self.config = module_config(self, locals())
        if text_dim is None:
            for name, on in (("pooled_text", pooled_text), ("query_text", query_text)):
                if on:
                    raise ValueError(f"{name} needs a text path: an unconditional backbone (text_dim null) has none")
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.grid = tuple(grid)
        self.text_dim = text_dim
        self.dim = dim
        self.token_emb = token_embedding(vocab_size, dim)
        self.mask_emb = nn.Parameter(torch.randn(1, 1, dim) * EMBED_STD)
        self.pos_h, self.pos_w = position_table(self.grid[1], dim), position_table(self.grid[2], dim)
        # Time: sinusoids (defined for any t, for longer videos) through a learned projection at the
        # embeddings' scale: raw sin/cos drowned token identity and (h, w), slowing shape and motion.
        self.time_proj = nn.Linear(dim, dim, bias=False)
        nn.init.normal_(self.time_proj.weight, std=EMBED_STD / math.sqrt(dim / 2))
        # Unit scale: at the embeddings' scale, the pooled caption added to every latent made all M
        # nearly one vector after the first norm, all asking the context the same question.
        self.latents = nn.Parameter(torch.randn(1, num_latents, dim))
        self.text = TextConditioning(text_dim, dim, pooled=pooled_text) if text_dim is not None else None
        # Unconditional: one learned token in every clip's context, so that a clip with nothing
        # observed (sampling's first step) still gives the latents a key (the caption does otherwise).
        self.context_start = nn.Parameter(torch.randn(1, dim) * EMBED_STD) if text_dim is None else None
        self.local = LocalMixing(dim) if local_context else None
        self.encoder = nn.ModuleList(EncoderLayer(dim, heads, ff_mult) for _ in range(depth))
        n_dec = decoder_depth or depth
        self.decoder = nn.ModuleList(
            DecoderLayer(dim, heads, ff_mult, write_latents=i < n_dec - 1, query_text=query_text) for i in range(n_dec)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def check_grid(self, grid: tuple[int, int, int]) -> None:
        if grid[1] > self.grid[1] or grid[2] > self.grid[2]:
            raise ValueError(f"token grid {tuple(grid)} exceeds the backbone's spatial grid {self.grid[1:]}")

    def positions(self, t: int, h: int, w: int, device) -> torch.Tensor:
        time = self.time_proj(sinusoidal_embedding(torch.arange(t, device=device), self.dim).to(self.pos_h.dtype))
        pos = time[:, None, None] + self.pos_h[None, :h, None] + self.pos_w[None, None, :w]
        return rearrange(pos, "t h w d -> (t h w) d")

    def forward(
        self,
        tokens: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
        masked_only: bool = False,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """masked_only: logits [num_masked, V] of the masked real positions in row-major order (what
        the loss needs): only the queries go through the head, and no [B, N, V] tensor is built.
        valid: optional bool [B, t] (latent frames) or [B, t, h, w]; False = padding, which is
        simply not selected into the context or the queries (its full logits mean nothing)."""
        b, t, h, w = tokens.shape
        self.check_grid((t, h, w))
        flat = rearrange(tokens, "b t h w -> b (t h w)")
        n = flat.shape[1]
        pos = self.positions(t, h, w, tokens.device).to(self.latents.dtype)
        masked = flat == self.mask_id
        ids = flat.flatten().clamp(max=self.vocab_size - 1)
        seen = ~masked
        real = token_valid(valid, (t, h, w))
        if real is not None:
            masked, seen = masked & real, seen & real
        observed, queried = pack_sets(seen), pack_sets(masked)

        ctx = self.token_emb(ids[observed.index]) + pos[observed.index % n]  # packed [T_obs, D]
        local = None
        if self.local is not None:
            # Masked positions enter as zeros: what a position learns is its observed neighbourhood.
            local = self.local(self.token_emb(ids).view(b, n, self.dim), (t, h, w), keep=seen)
            local = rearrange(local, "b n d -> (b n) d")
            ctx = ctx + local[observed.index]
        if self.text is not None:
            text_ctx, text_ctx_mask = self.text(text, text_mask, b, drop_text)
            caption = pack_caption(text_ctx, text_ctx_mask)
        elif text is not None:
            raise ValueError("this backbone is unconditional (text_dim null): it takes no text")
        else:
            text_ctx = text_ctx_mask = None
            start = self.context_start.repeat(b, 1)  # repeat, not expand: see the latents below
            caption = Caption(start, torch.arange(b, device=tokens.device), uniform(b, 1, tokens.device))
        # The encoder's context: each clip's observed tokens, then its caption (unconditional: its
        # start token), packed clip by clip.
        context_keys = join(observed.clip, observed.seqs, caption.clip, caption.seqs)
        context = context_keys(ctx, caption.rows)

        # repeat, not expand: under no_grad an expanded parameter view still "requires grad" with no
        # grad_fn, which breaks module hooks (torch.utils.flop_counter's module tracker).
        latents = self.latents.repeat(b, 1, 1)
        m = latents.shape[1]
        latent_seqs = uniform(b, m, tokens.device)
        pooled = self.text.pooled(text_ctx, text_ctx_mask) if self.text is not None else None
        if pooled is not None:
            latents = latents + pooled
        for layer in self.encoder:
            latents = layer(latents, context, latent_seqs, context_keys.seqs)

        queries = self.mask_emb.view(1, self.dim) + pos[queried.index % n]  # packed [T_mask, D]
        if local is not None:
            queries = queries + local[queried.index]
        if pooled is not None:
            queries = queries + pooled.view(b, self.dim)[queried.clip]
        # The latents' read in the decoder: each clip's latents, then its masked queries.
        latent_clip = torch.arange(b, device=tokens.device).repeat_interleave(m)
        write_keys = join(latent_clip, latent_seqs, queried.clip, queried.seqs)
        for layer in self.decoder:
            queries, latents = layer(queries, queried.seqs, latents, latent_seqs, write_keys, caption)
        q_logits = self.head(self.norm(queries))  # [T_mask, V], row-major
        if masked_only:
            return q_logits

        # Observed positions are given: their "prediction" is their own token, with certainty.
        logits = torch.full((b * n, self.vocab_size), -1e4, dtype=q_logits.dtype, device=tokens.device)
        logits = logits.scatter_(1, ids[:, None], 0.0).index_copy(0, queried.index, q_logits)
        return rearrange(logits, "(b t h w) v -> b t h w v", b=b, t=t, h=h)
