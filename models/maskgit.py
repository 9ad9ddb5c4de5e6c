"""The Phenaki / MaskGIT stage-2 backbone: a bidirectional transformer over video tokens with
cross-attention to text in every block.

Backbones share one interface, so MaskedVideoModule and the sampler work with any of them:

    forward(tokens [B, t, h, w] (mask id = vocab_size), text [B, L, Dt], text_mask [B, L],
            drop_text [B] = None, masked_only=False)
        -> logits [B, t, h, w, vocab_size], or [num_masked, vocab_size] with masked_only

masked_only goes through forward (not a second method) so that wrappers that hook forward
(FSDP2's unshard, DDP) see the training call.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from maskvid.models.attention import CrossAttention, FeedForward, SelfAttention
from maskvid.models.config import module_config


class LocalMixing(nn.Module):
    """Depthwise 3x3x3 convolution over the (t, h, w) token grid, zero-initialised.

    A locality prior that attention with learned absolute positions only acquires after many
    steps: an object is a compact group of neighbouring tokens that moves a little per latent
    frame. Zero init makes the block start as a plain transformer block."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv3d(dim, dim, kernel_size=3, padding=1, groups=dim)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int], keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, D] in (t h w) order -> [B, N, D]. keep: optional bool [B, N]; positions not
        kept enter the convolution as zeros (after the norm), so nothing of them reaches the output."""
        t, h, w = grid
        y = self.norm(x)
        if keep is not None:
            y = y * keep[..., None].to(y.dtype)
        y = rearrange(y, "b (t h w) d -> b d t h w", t=t, h=h, w=w)
        # In its weights' dtype, not autocast's, on every device: the depthwise conv is a small,
        # memory-bound part of the step, and its half-precision CPU backward is several times
        # slower than its fp32 one.
        with torch.autocast(y.device.type, enabled=False):
            return rearrange(self.conv(y.to(self.conv.weight.dtype)), "b d t h w -> b (t h w) d")


class CrossBlock(nn.Module):
    """Pre-norm block: self-attention over video tokens, cross-attention to text, MLP (and, with
    local_mixing, a depthwise convolution over the token grid after the self-attention)."""

    def __init__(self, dim: int, heads: int, ff_mult: float = 4.0, local_mixing: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.local = LocalMixing(dim) if local_mixing else None
        self.norm2 = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult)

    def forward(
        self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, grid: tuple[int, int, int] | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        if self.local is not None:
            x = x + self.local(x, grid)
        x = x + self.cross(self.norm2(x), text, text_mask)
        return x + self.ff(self.norm3(x))


class TextConditioning(nn.Module):
    """Projects text embeddings to the model width and supplies the learned null condition.

    With `pooled`, it also gives one global vector per caption (the masked mean of the context
    through a zero-initialised projection) that backbones add to every token: a direct path for
    what the whole clip must show (colour, shape, motion), which cross-attention alone learns
    slowly on a small budget. Zero init makes it a no-op at step 0.
    """

    def __init__(self, text_dim: int, dim: int, pooled: bool = False) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, dim))
        self.null = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.global_proj = nn.Linear(dim, dim) if pooled else None
        if self.global_proj is not None:
            nn.init.zeros_(self.global_proj.weight)
            nn.init.zeros_(self.global_proj.bias)

    def pooled(self, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """(context [B, L, D], mask [B, L]) from forward -> [B, 1, D], or None without `pooled`.
        A dropped caption pools to the null token alone, so CFG's unconditional pass stays text-free."""
        if self.global_proj is None:
            return None
        weight = mask.to(context.dtype)[..., None]
        mean = (context * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp(min=1)
        return self.global_proj(mean)

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
            text_dim: Width of the text encoder's embeddings.
            ff_mult: MLP hidden width as a multiple of dim.
            pooled_text: Also add a pooled caption vector to every token (besides the
                cross-attention in each block).
            local_mixing: Add a zero-initialised depthwise 3x3x3 convolution over the token grid to
                every block (a locality prior: compact objects are learned in fewer steps).
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
        self.text = TextConditioning(text_dim, dim, pooled=pooled_text)
        self.blocks = nn.ModuleList(CrossBlock(dim, heads, ff_mult, local_mixing) for _ in range(depth))
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
    ) -> torch.Tensor:
        """masked_only: return logits [num_masked, V] of the masked positions only, in row-major
        order (`logits[tokens == mask_id]`): what the training loss needs, without the head's
        matmul and the [B, N, V] tensor for the observed half."""
        b, t, h, w = tokens.shape
        self.check_grid((t, h, w))
        pos = self.pos_t[:t, None, None] + self.pos_h[None, :h, None] + self.pos_w[None, None, :w]
        x = self.token_emb(tokens) + pos
        x = rearrange(x, "b t h w d -> b (t h w) d")
        context, context_mask = self.text(text, text_mask, b, drop_text)
        pooled = self.text.pooled(context, context_mask)
        if pooled is not None:
            x = x + pooled
        for block in self.blocks:
            x = block(x, context, context_mask, (t, h, w))
        if masked_only:
            return self.head(self.norm(x[rearrange(tokens, "b t h w -> b (t h w)") == self.mask_id]))
        logits = self.head(self.norm(x))
        return rearrange(logits, "b (t h w) v -> b t h w v", t=t, h=h)
