"""MeBT: a memory-efficient bidirectional transformer for video tokens (Yoo et al., CVPR 2023),
text-conditioned (our extension: the paper is unconditional).

Observed tokens and the text are projected into M learned latents (encoder: latents cross-attend
to the context, alternating with latent self-attention); masked positions are decoded by
cross-attending to the latents only (decoder: queries read the latents, latents read
[latents, queries]). No N x N attention anywhere: time and memory are O((N_ctx + N_mask) * M).

Same interface as MaskGITBackbone, so MaskedVideoModule, the sampler and `maskvid generate` take
either:
    forward(tokens [B, t, h, w] (mask id = vocab_size), text, text_mask, drop_text, masked_only=False)
        -> logits [B, t, h, w, V], or [num_masked, V] with masked_only
Time positions are sinusoids through a learned projection, so a model trained on T latent frames
can be asked for more.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention import CrossAttention, FeedForward, SelfAttention, sinusoidal_embedding
from models.config import module_config
from models.maskgit import LocalMixing, TextConditioning


class TextRead(nn.Module):
    """Tokens read the caption alone: cross-attention with its own softmax over the caption's
    tokens (the null token alone for CFG's unconditional pass)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q, self.norm_text = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, heads)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm_q(x), self.norm_text(text), text_mask)


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

    def forward(self, latents: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        latents = latents + self.cross(self.norm_q(latents), self.norm_ctx(context), context_mask)
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

    def forward(
        self, queries: torch.Tensor, query_mask: torch.Tensor, latents: torch.Tensor, text: tuple | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """text: (caption [B, L, D], mask [B, L]), read by the queries with query_text."""
        queries = queries + self.read(self.norm_q(queries), self.norm_l(latents))
        if self.query_text is not None:
            queries = self.query_text(queries, *text)
        queries = queries + self.ff_q(self.norm_ff_q(queries))
        if not self.write_latents:
            return queries, latents
        both = torch.cat([latents, queries], dim=1)
        both_mask = torch.cat([torch.ones(latents.shape[:2], dtype=torch.bool, device=latents.device), query_mask], 1)
        latents = latents + self.write(self.norm_l2(latents), self.norm_kv(both), both_mask)
        latents = latents + self.ff_l(self.norm_ff_l(latents))
        return queries, latents


def gather_sets(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, N] -> (indices [B, K], valid [B, K]): each row's selected positions first, padded
    to the largest count K in the batch (padding entries point at position 0 and are invalid)."""
    counts = selected.sum(dim=1)
    k = int(counts.max()) if selected.numel() else 0
    order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :k]
    valid = torch.arange(k, device=selected.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


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
        text_dim: int = 384,
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
            text_dim: Width of the text encoder's embeddings.
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
                demo MeBT never used the direction word (`python -m metrics.caption_sensitivity`:
                swapping "left" for "right" changed its loss by < 0.005 nats).
        """
        super().__init__()
        self.config = module_config(self, locals())
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.grid = tuple(grid)
        self.text_dim = text_dim
        self.dim = dim
        self.token_emb = nn.Embedding(vocab_size, dim)
        # The same scale as the position tables: nn.Embedding's N(0, 1) would drown position
        # (0.02) by 50x, and the model would learn where tokens are only after hundreds of steps.
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.mask_emb = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_h = nn.Parameter(torch.randn(self.grid[1], dim) * 0.02)
        self.pos_w = nn.Parameter(torch.randn(self.grid[2], dim) * 0.02)
        # Time: sinusoids (defined for any t, so longer videos can be asked for) through a learned
        # projection that starts at the scale of the other embeddings (std 0.02). Raw sin/cos
        # (|x| ~ 0.7) drowned token identity and the (h, w) positions by ~35x, and the model
        # learned where objects are, i.e. shape and direction, only slowly.
        self.time_proj = nn.Linear(dim, dim, bias=False)
        nn.init.normal_(self.time_proj.weight, std=0.02 / math.sqrt(dim / 2))
        # Unit scale, unlike the embeddings: the pooled caption (rms ~0.4 once trained) is added to
        # every latent, and at std 0.02 it made all M latents nearly the same vector after the first
        # norm (pairwise cosine 0.997 in a trained demo model), so they all asked the context the
        # same question. (On the demo's budget this changed neither val loss nor caption accuracy
        # measurably: README, "MeBT".)
        self.latents = nn.Parameter(torch.randn(1, num_latents, dim))
        self.text = TextConditioning(text_dim, dim, pooled=pooled_text)
        self.local = LocalMixing(dim) if local_context else None
        self.encoder = nn.ModuleList(EncoderLayer(dim, heads, ff_mult) for _ in range(depth))
        n_dec = decoder_depth or depth
        self.decoder = nn.ModuleList(
            DecoderLayer(dim, heads, ff_mult, write_latents=i < n_dec - 1, query_text=query_text) for i in range(n_dec)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        self.activation_checkpointing = False

    @property
    def blocks(self) -> list[nn.Module]:
        """Every layer (for per-block FSDP wrapping and activation checkpointing)."""
        return [*self.encoder, *self.decoder]

    def check_grid(self, grid: tuple[int, int, int]) -> None:
        if grid[1] > self.grid[1] or grid[2] > self.grid[2]:
            raise ValueError(f"token grid {tuple(grid)} exceeds the backbone's spatial grid {self.grid[1:]}")

    def positions(self, t: int, h: int, w: int, device) -> torch.Tensor:
        time = self.time_proj(sinusoidal_embedding(torch.arange(t, device=device), self.dim).to(self.pos_h.dtype))
        pos = time[:, None, None] + self.pos_h[None, :h, None] + self.pos_w[None, None, :w]
        return rearrange(pos, "t h w d -> (t h w) d")

    def _run(self, layer: nn.Module, *args):
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward(
        self,
        tokens: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
        masked_only: bool = False,
    ) -> torch.Tensor:
        """masked_only: logits [num_masked, V] of the masked positions in row-major order (what
        the loss needs): only the queries go through the head, and no [B, N, V] tensor is built."""
        b, t, h, w = tokens.shape
        self.check_grid((t, h, w))
        flat = rearrange(tokens, "b t h w -> b (t h w)")
        pos = self.positions(t, h, w, tokens.device).to(self.latents.dtype)
        masked = flat == self.mask_id

        ctx_idx, ctx_valid = gather_sets(~masked)
        ctx = self.token_emb(flat.gather(1, ctx_idx).clamp(max=self.vocab_size - 1)) + pos[ctx_idx]
        local = None
        if self.local is not None:
            # Masked positions enter as zeros: what a position learns is its observed neighbourhood.
            observed = self.token_emb(flat.clamp(max=self.vocab_size - 1))
            local = self.local(observed, (t, h, w), keep=~masked)  # [B, N, D]
            ctx = ctx + local.gather(1, ctx_idx[..., None].expand(-1, -1, self.dim))
        text_ctx, text_ctx_mask = self.text(text, text_mask, b, drop_text)
        context = torch.cat([ctx, text_ctx], dim=1)
        context_mask = torch.cat([ctx_valid, text_ctx_mask], dim=1)

        # repeat, not expand: under no_grad an expanded parameter view still "requires grad" with no
        # grad_fn, which breaks module hooks (torch.utils.flop_counter's module tracker).
        latents = self.latents.repeat(b, 1, 1)
        pooled = self.text.pooled(text_ctx, text_ctx_mask)
        if pooled is not None:
            latents = latents + pooled
        for layer in self.encoder:
            latents = self._run(layer, latents, context, context_mask)

        q_idx, q_valid = gather_sets(masked)
        queries = self.mask_emb + pos[q_idx]
        if local is not None:
            queries = queries + local.gather(1, q_idx[..., None].expand(-1, -1, self.dim))
        if pooled is not None:
            queries = queries + pooled
        for layer in self.decoder:
            queries, latents = self._run(layer, queries, q_valid, latents, (text_ctx, text_ctx_mask))
        if masked_only:
            # gather_sets keeps each row's positions ascending, so this is row-major order.
            return self.head(self.norm(queries[q_valid]))
        q_logits = self.head(self.norm(queries))  # [B, Nm, V]

        # Observed positions are given: their "prediction" is their own token, with certainty.
        logits = torch.full((b, flat.shape[1], self.vocab_size), -1e4, dtype=q_logits.dtype, device=tokens.device)
        logits.scatter_(2, flat.clamp(max=self.vocab_size - 1)[..., None], 0.0)
        scatter_idx = torch.where(q_valid, q_idx, torch.full_like(q_idx, flat.shape[1]))
        padded = torch.cat([logits, logits.new_zeros(b, 1, self.vocab_size)], dim=1)
        padded.scatter_(1, scatter_idx[..., None].expand(-1, -1, self.vocab_size), q_logits)
        return rearrange(padded[:, :-1], "b (t h w) v -> b t h w v", t=t, h=h)
