"""The Phenaki / MaskGIT stage-2 backbone: a bidirectional transformer over video tokens with
cross-attention to text in every block.

Backbones share one interface, so MaskedVideoModule and the sampler work with any of them:

    forward(tokens [B, t, h, w] (mask id = vocab_size), text [B, L, Dt], text_mask [B, L])
        -> logits [B, t, h, w, vocab_size]
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention import CrossAttention, FeedForward, SelfAttention
from models.config import module_config


class CrossBlock(nn.Module):
    """Pre-norm block: self-attention over video tokens, cross-attention to text, MLP."""

    def __init__(self, dim: int, heads: int, ff_mult: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross(self.norm2(x), text, text_mask)
        return x + self.ff(self.norm3(x))


class TextConditioning(nn.Module):
    """Projects text embeddings to the model width and supplies the learned null condition."""

    def __init__(self, text_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, dim))
        self.null = nn.Parameter(torch.randn(1, 1, dim) * 0.02)

    def forward(
        self, text: torch.Tensor | None, text_mask: torch.Tensor | None, batch: int, drop: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (context [B, L, D], mask [B, L]). Dropped rows (drop[b] True, or text None) see only
        the null token: the unconditional model classifier-free guidance needs."""
        if text is None:
            # repeat, not expand (see MeBT.forward): a parameter view breaks module hooks under no_grad.
            return self.null.repeat(batch, 1, 1), torch.ones(batch, 1, dtype=torch.bool, device=self.null.device)
        context = self.proj(text.to(self.null.dtype))
        mask = text_mask.bool() if text_mask is not None else torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        if drop is not None:
            mask = mask & ~drop.bool()[:, None]
        # Position 0 holds the null token, visible only to rows left with no text at all.
        context = torch.cat([self.null.expand(batch, 1, -1), context], dim=1)
        mask = torch.cat([~mask.any(dim=1, keepdim=True), mask], dim=1)
        return context, mask


class MaskGITBackbone(nn.Module):
    """Bidirectional masked-token transformer (Phenaki's stage 2)."""

    def __init__(
        self,
        vocab_size: int = 8192,
        grid: tuple[int, int, int] = (9, 8, 8),
        dim: int = 512,
        depth: int = 8,
        heads: int = 8,
        text_dim: int = 384,
        ff_mult: float = 4.0,
    ) -> None:
        """
        Args:
            vocab_size: Tokenizer vocabulary (must match the stage-1 tokenizer).
            grid: Largest token grid (t, h, w) the position tables cover.
            dim: Transformer width.
            depth: Blocks.
            heads: Attention heads.
            text_dim: Width of the text encoder's embeddings.
            ff_mult: MLP hidden width as a multiple of dim.
        """
        super().__init__()
        self.config = module_config(self, locals())
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.grid = tuple(grid)
        self.text_dim = text_dim
        self.token_emb = nn.Embedding(vocab_size + 1, dim)
        # The same scale as the position tables: nn.Embedding's N(0, 1) would drown position
        # (0.02) by 50x, and the model would learn where tokens are only after hundreds of steps.
        nn.init.normal_(self.token_emb.weight, std=0.02)
        t, h, w = self.grid
        self.pos_t = nn.Parameter(torch.randn(t, dim) * 0.02)
        self.pos_h = nn.Parameter(torch.randn(h, dim) * 0.02)
        self.pos_w = nn.Parameter(torch.randn(w, dim) * 0.02)
        self.text = TextConditioning(text_dim, dim)
        self.blocks = nn.ModuleList(CrossBlock(dim, heads, ff_mult) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        self.activation_checkpointing = False

    def check_grid(self, grid: tuple[int, int, int]) -> None:
        if any(g > m for g, m in zip(grid, self.grid)):
            raise ValueError(f"token grid {tuple(grid)} exceeds the backbone's grid {self.grid}")

    def forward(
        self,
        tokens: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, h, w = tokens.shape
        self.check_grid((t, h, w))
        pos = self.pos_t[:t, None, None] + self.pos_h[None, :h, None] + self.pos_w[None, None, :w]
        x = self.token_emb(tokens) + pos
        x = rearrange(x, "b t h w d -> b (t h w) d")
        context, context_mask = self.text(text, text_mask, b, drop_text)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, context, context_mask, use_reentrant=False)
            else:
                x = block(x, context, context_mask)
        logits = self.head(self.norm(x))
        return rearrange(logits, "b (t h w) v -> b t h w v", t=t, h=h)
