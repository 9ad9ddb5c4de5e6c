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
from typing import NamedTuple

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention import CrossAttention, FeedForward, SelfAttention, sinusoidal_embedding
from models.config import module_config
from models.maskgit import LocalMixing, TextConditioning


class Sets(NamedTuple):
    """Variable-length sets of positions (each clip's observed or masked tokens), packed.

    Every per-token layer (norms, projections, MLPs) runs on the packed members [T, D], with no
    padding; only the attention itself pads to [B, K] (`pad`), since SDPA wants a rectangle. With a
    mask ratio drawn per clip, padding every set to the batch's largest one made the decoder
    compute ~1.5x and the encoder's context projections ~2.5x the real token count.

    With `ragged` (on a CPU, when the clips' counts differ: `ragged_attention`), the attention
    does not pad either: it runs clip by clip on each clip's exact members (`split_rows`).

    Under CPU autocast, T is rounded up to a multiple of PACK_MULTIPLE with filler members after
    the real ones (`pack_multiple`): they read position 0, are written to scratch places that `pad`
    drops (or pass through the ragged attention untouched), and are cut off the logits.
    """

    index: torch.Tensor  # [T] the members' positions in the flattened [B * N], row-major; fillers 0
    slots: torch.Tensor  # [T] their places in the flattened [B * K] padding; fillers B * K + i
    valid: torch.Tensor  # bool [B, K]: which padded places hold a member
    count: int  # real members (the first `count` of the T)
    lengths: tuple[int, ...] = ()  # members per clip (sum = count)
    ragged: bool = False  # attention clip by clip instead of on the [B, K] padding


PACK_MULTIPLE = 64


def pack_multiple(device: torch.device) -> int:
    """How many members packed sets are rounded up to on `device`. oneDNN builds its bf16 (AMX)
    matmul kernels per shape, and the packed T changes every step: the demo MeBT's bf16 step took
    0.30 s with a new T each step and 0.27 s with T rounded to 64 (fp32 0.38 s). fp32 and GPU
    kernels take any shape at no cost, so there the sets stay exact (no filler is computed)."""
    return PACK_MULTIPLE if device.type == "cpu" and torch.is_autocast_enabled("cpu") else 1


def ragged_attention(device: torch.device) -> bool:
    """Whether attention over variable-length sets runs clip by clip (exact sizes) rather than on
    sets padded to the batch's largest. With a mask ratio drawn per clip the largest set is ~1.5x
    the mean (masked) and ~2x (observed), and the padded attention computed all of it: on a CPU
    the M1 MeBT's attention took 1.3 s of a 6.3 s step, and clip by clip it takes 0.9 s
    (`benchmarks/mfu.py --top-ops`, README "Ragged attention in MeBT"). A CPU runs one clip's
    attention about as efficiently as the batch's; a GPU would launch B small kernels per layer
    instead of one, so there the padded batch stays."""
    return device.type == "cpu"


def pack_sets(selected: torch.Tensor, multiple: int = 1, ragged: bool = False) -> Sets:
    """bool [B, N] -> the selected positions of every row as packed Sets (K = the largest count),
    with fillers up to a multiple of `multiple` members. ragged: allow clip-by-clip attention
    (taken only when the counts differ: equal counts have no padding to save)."""
    counts = selected.sum(dim=1)
    lengths = tuple(counts.tolist())
    k = max(lengths, default=0)
    valid = torch.arange(k, device=selected.device)[None, :] < counts[:, None]
    index, slots = selected.flatten().nonzero().squeeze(1), valid.flatten().nonzero().squeeze(1)
    count = index.numel()
    fill = -count % multiple
    if fill:
        index = torch.cat([index, index.new_zeros(fill)])
        slots = torch.cat([slots, valid.numel() + torch.arange(fill, device=slots.device)])
    return Sets(index, slots, valid, count, lengths, ragged and len(set(lengths)) > 1)


def pad(x: torch.Tensor, sets: Sets) -> torch.Tensor:
    """Packed [T, C] -> [B, K, C], zeros in the padding (fillers land past B * K and are dropped).

    index_put_, not index_copy: index_copy's backward keeps its whole source (for a shape), which
    held every packed key/value and query projection for backward: 73 of the 490 MiB MeBT saved
    at 129 frames. index_put_ keeps only the slots, and is no slower."""
    b, k = sets.valid.shape
    out = x.new_zeros(b * k + x.shape[0] - sets.count, x.shape[-1]).index_put_((sets.slots,), x)
    return out[: b * k].view(b, k, x.shape[-1])


def unpad(x: torch.Tensor, sets: Sets) -> torch.Tensor:
    """[B, K, C] -> packed [T, C] (fillers read place 0: nothing downstream uses them)."""
    flat = x.reshape(-1, x.shape[-1])
    if sets.count == sets.slots.numel():
        return flat.index_select(0, sets.slots)
    return flat.index_select(0, sets.slots.clamp(max=max(flat.shape[0] - 1, 0)))


def split_rows(x: torch.Tensor, sets: Sets) -> tuple[torch.Tensor, ...]:
    """Packed [T, C] -> every clip's members [n_b, C] (views, fillers left out). Without fillers
    there is nothing to cut: a no-op slice would still cost a zero-filled [T, C] and a copy in
    its backward (~40 ms of the M1 MeBT step)."""
    return (x if x.shape[0] == sets.count else x[: sets.count]).split(sets.lengths)


def keep_rows(x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """[B, L, C] with bool [B, L] -> every clip's kept rows [l_b, C]."""
    return [rows[keep] for rows, keep in zip(x, mask)]


def fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 if it is half precision: CPU attention runs in fp32 (models/attention.attention),
    and the ragged path converts each whole tensor once rather than every clip's part."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def attend_ragged(attn: CrossAttention, queries: list[torch.Tensor] | tuple[torch.Tensor, ...],
                  keys: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Clip by clip: projected queries [n_b, D] read projected keys/values [m_b, 2D] (no padding,
    so no mask) -> [n_b, D] each, before `proj`, in fp32 (callers cast the joined result back)."""
    with torch.autocast("cpu", enabled=False):  # inputs are fp32 already (`fp32`)
        return [attn.attend(q[None], kv[None])[0] if q.shape[0] else q for q, kv in zip(queries, keys)]


def latents_read_ragged(attn: CrossAttention, q: torch.Tensor, *parts) -> torch.Tensor:
    """Clip by clip, the latents' projected queries q [B, M, D] read keys/values joined from each
    clip's parts (per part: one [m_b, 2D] tensor per clip, in fp32) -> [B, M, D] in q's dtype."""
    keys = [torch.cat(clip_parts) for clip_parts in zip(*parts)]
    return torch.stack(attend_ragged(attn, fp32(q).unbind(0), keys)).to(q.dtype)


def attend_packed(attn: CrossAttention, x: torch.Tensor, sets: Sets, kv: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Packed queries x [T, D] (normed) read kv [B, M, 2D] of their own clip (mask [B, M]: which
    to read) -> [T, D]."""
    q = attn.q(x)
    if not sets.ragged:
        return attn.proj(unpad(attn.attend(pad(q, sets), kv, mask), sets))
    kv = fp32(kv)
    keys = kv.unbind(0) if mask is None else keep_rows(kv, mask)
    # Fillers (CPU autocast) pass through: nothing downstream reads them.
    read = torch.cat([*attend_ragged(attn, split_rows(fp32(q), sets), keys), fp32(q[sets.count:])])
    return attn.proj(read.to(q.dtype))


class TextRead(nn.Module):
    """Tokens read the caption alone: cross-attention with its own softmax over the caption's
    tokens (the null token alone for CFG's unconditional pass)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q, self.norm_text = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, heads)

    def forward(self, x: torch.Tensor, sets: Sets, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """x: packed [T, D]; text [B, L, D], text_mask [B, L]."""
        return x + attend_packed(self.attn, self.norm_q(x), sets, self.attn.kv(self.norm_text(text)), text_mask)


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

    def forward(
        self, latents: torch.Tensor, context: torch.Tensor, sets: Sets, text: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """latents [B, M, D]; context: the observed tokens, packed [T, D]; text [B, L, D], text_mask [B, L]."""
        q = self.cross.q(self.norm_q(latents))
        context_kv, text_kv = self.cross.kv(self.norm_ctx(context)), self.cross.kv(self.norm_ctx(text))
        if sets.ragged:
            context, caption = split_rows(fp32(context_kv), sets), keep_rows(fp32(text_kv), text_mask)
            read = latents_read_ragged(self.cross, q, context, caption)
        else:
            kv, mask = torch.cat([pad(context_kv, sets), text_kv], dim=1), torch.cat([sets.valid, text_mask], dim=1)
            read = self.cross.attend(q, kv, mask)
        latents = latents + self.cross.proj(read)
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
        self, queries: torch.Tensor, sets: Sets, latents: torch.Tensor, text: tuple | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries: the masked positions, packed [T, D]; latents [B, M, D]; text: (caption [B, L, D],
        mask [B, L]), read by the queries with query_text."""
        queries = queries + attend_packed(self.read, self.norm_q(queries), sets, self.read.kv(self.norm_l(latents)))
        if self.query_text is not None:
            queries = self.query_text(queries, sets, *text)
        queries = queries + self.ff_q(self.norm_ff_q(queries))
        if not self.write_latents:
            return queries, latents
        q = self.write.q(self.norm_l2(latents))
        latent_kv, query_kv = self.write.kv(self.norm_kv(latents)), self.write.kv(self.norm_kv(queries))
        if sets.ragged:
            read = latents_read_ragged(self.write, q, fp32(latent_kv).unbind(0), split_rows(fp32(query_kv), sets))
        else:
            kv = torch.cat([latent_kv, pad(query_kv, sets)], dim=1)
            mask = torch.cat([torch.ones(latents.shape[:2], dtype=torch.bool, device=latents.device), sets.valid], 1)
            read = self.write.attend(q, kv, mask)
        latents = latents + self.write.proj(read)
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
        n = flat.shape[1]
        pos = self.positions(t, h, w, tokens.device).to(self.latents.dtype)
        masked = flat == self.mask_id
        ids = flat.flatten().clamp(max=self.vocab_size - 1)
        multiple, ragged = pack_multiple(tokens.device), ragged_attention(tokens.device)
        observed, queried = pack_sets(~masked, multiple, ragged), pack_sets(masked, multiple, ragged)

        ctx = self.token_emb(ids[observed.index]) + pos[observed.index % n]  # packed [T_obs, D]
        local = None
        if self.local is not None:
            # Masked positions enter as zeros: what a position learns is its observed neighbourhood.
            local = self.local(self.token_emb(ids).view(b, n, self.dim), (t, h, w), keep=~masked)
            local = rearrange(local, "b n d -> (b n) d")
            ctx = ctx + local[observed.index]
        text_ctx, text_ctx_mask = self.text(text, text_mask, b, drop_text)

        # repeat, not expand: under no_grad an expanded parameter view still "requires grad" with no
        # grad_fn, which breaks module hooks (torch.utils.flop_counter's module tracker).
        latents = self.latents.repeat(b, 1, 1)
        pooled = self.text.pooled(text_ctx, text_ctx_mask)
        if pooled is not None:
            latents = latents + pooled
        for layer in self.encoder:
            latents = self._run(layer, latents, ctx, observed, text_ctx, text_ctx_mask)

        queries = self.mask_emb.view(1, self.dim) + pos[queried.index % n]  # packed [T_mask, D]
        if local is not None:
            queries = queries + local[queried.index]
        if pooled is not None:
            queries = queries + pooled.view(b, self.dim)[queried.index // n]
        for layer in self.decoder:
            queries, latents = self._run(layer, queries, queried, latents, (text_ctx, text_ctx_mask))
        q_logits = self.head(self.norm(queries[: queried.count]))  # [T_mask, V], row-major
        if masked_only:
            return q_logits

        # Observed positions are given: their "prediction" is their own token, with certainty.
        logits = torch.full((b * n, self.vocab_size), -1e4, dtype=q_logits.dtype, device=tokens.device)
        logits = logits.scatter_(1, ids[:, None], 0.0).index_copy(0, queried.index[: queried.count], q_logits)
        return rearrange(logits, "(b t h w) v -> b t h w v", b=b, t=t, h=h)
