"""The Phenaki / MaskGIT stage-2 backbone: a bidirectional transformer over video tokens with
cross-attention to text in every block (or, with text_dim None, unconditional: no text path).

Backbones share one interface, so MaskedVideoModule and the sampler work with any of them:

    forward(tokens [B, t, h, w] (mask id = vocab_size), text [B, L, Dt], text_mask [B, L],
            drop_text [B] = None, masked_only=False, valid [B, t] or [B, t, h, w] = None)
        -> logits [B, t, h, w, vocab_size], or [num_masked, vocab_size] with masked_only

masked_only goes through forward (not a second method) so that wrappers that hook forward
(FSDP2's unshard, DDP) see the training call.

valid marks the real positions; the others are padding (a short clip's or an image's repeated
last frame) that must not be seen: copies of the answer would let the model skip the text. No
real position's output depends on a padded token; padded positions' own outputs mean nothing.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from maskvid.models.attention import CrossAttention, FeedForward, SelfAttention
from maskvid.models.config import module_config
from maskvid.models.layers import LocalMixing, TextConditioning, position_table, token_embedding, token_valid


class CrossBlock(nn.Module):
    """Pre-norm block: self-attention over video tokens, cross-attention to text (unless
    unconditional), MLP (and, with local_mixing, a depthwise convolution over the token grid after
    the self-attention)."""

    def __init__(self, dim: int, heads: int, ff_mult: float = 4.0, local_mixing: bool = False,
                 cross_attention: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.local = LocalMixing(dim) if local_mixing else None
        self.norm2 = nn.LayerNorm(dim) if cross_attention else None
        self.cross = CrossAttention(dim, heads) if cross_attention else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult)

    def forward(
        self, x: torch.Tensor, text: torch.Tensor | None, text_mask: torch.Tensor | None,
        grid: tuple[int, int, int] | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """keep: optional bool [B, N], the positions other positions may read (None: all). The
        rest are neither attention keys nor inputs of the local mixing."""
        x = x + self.attn(self.norm1(x), key_mask=keep)
        if self.local is not None:
            x = x + self.local(x, grid, keep=keep)
        if self.cross is not None:
            x = x + self.cross(self.norm2(x), text, text_mask)
        return x + self.ff(self.norm3(x))


class MaskGITBackbone(nn.Module):
    """Bidirectional masked-token transformer (Phenaki's stage 2)."""

    def __init__(
        self,
        vocab_size: int = 8192,
        grid: tuple[int, int, int] = (9, 8, 8),
        dim: int = 512,
        depth: int = 8,
        heads: int = 8,
        text_dim: int | None = 384,
        ff_mult: float = 4.0,
        pooled_text: bool = False,
        local_mixing: bool = False,
    ) -> None:
        """
        Args:
            vocab_size: Tokenizer vocabulary (must match the stage-1 tokenizer).
            grid: Largest token grid (t, h, w) the position tables cover.
            dim: Transformer width.
            depth: Blocks.
            heads: Attention heads.
            text_dim: Width of the text encoder's embeddings; null builds an unconditional model
                (no cross-attention, no text parameters; it takes no text).
            ff_mult: MLP hidden width as a multiple of dim.
            pooled_text: Also add a pooled caption vector to every token (besides the
                cross-attention in each block).
            local_mixing: Add a zero-initialised depthwise 3x3x3 convolution over the token grid to
                every block (a locality prior: compact objects are learned in fewer steps).
        """
        super().__init__()
        self.config = module_config(self, locals())
        if text_dim is None and pooled_text:
            raise ValueError("pooled_text needs a text path: an unconditional backbone (text_dim null) has none")
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.grid = tuple(grid)
        self.text_dim = text_dim
        self.token_emb = token_embedding(vocab_size + 1, dim)
        t, h, w = self.grid
        self.pos_t, self.pos_h, self.pos_w = position_table(t, dim), position_table(h, dim), position_table(w, dim)
        self.text = TextConditioning(text_dim, dim, pooled=pooled_text) if text_dim is not None else None
        self.blocks = nn.ModuleList(
            CrossBlock(dim, heads, ff_mult, local_mixing, cross_attention=text_dim is not None) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def check_grid(self, grid: tuple[int, int, int]) -> None:
        if any(g > m for g, m in zip(grid, self.grid)):
            raise ValueError(f"token grid {tuple(grid)} exceeds the backbone's grid {self.grid}")

    def forward(
        self,
        tokens: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
        masked_only: bool = False,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """masked_only: return logits [num_masked, V] of the masked real positions only, in
        row-major order (`logits[(tokens == mask_id) & valid]`): what the training loss needs,
        without the head's matmul and the [B, N, V] tensor for the observed half.
        valid: optional bool [B, t] (latent frames) or [B, t, h, w]; False = padding, never read."""
        b, t, h, w = tokens.shape
        self.check_grid((t, h, w))
        keep = token_valid(valid, (t, h, w))
        # A host sync, but it keeps all-real batches on SDPA's unmasked (flash) kernels.
        if keep is not None and bool(keep.all()):
            keep = None
        pos = self.pos_t[:t, None, None] + self.pos_h[None, :h, None] + self.pos_w[None, None, :w]
        x = self.token_emb(tokens) + pos
        x = rearrange(x, "b t h w d -> b (t h w) d")
        context = context_mask = None
        if self.text is not None:
            context, context_mask = self.text(text, text_mask, b, drop_text)
            pooled = self.text.pooled(context, context_mask)
            if pooled is not None:
                x = x + pooled
        elif text is not None:
            raise ValueError("this backbone is unconditional (text_dim null): it takes no text")
        for block in self.blocks:
            x = block(x, context, context_mask, (t, h, w), keep)
        if masked_only:
            real = True if keep is None else keep
            return self.head(self.norm(x[rearrange(tokens, "b t h w -> b (t h w)").eq(self.mask_id) & real]))
        logits = self.head(self.norm(x))
        return rearrange(logits, "b (t h w) v -> b t h w v", t=t, h=h)
