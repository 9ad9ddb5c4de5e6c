"""Layers both stage-2 backbones (MaskGITBackbone, MeBT) build from: the text conditioning, the
local-mixing convolution over the token grid, the token and position embeddings, and the padding
mask's layout.

Module attribute names here are what the backbones' state_dict keys are made of: renaming one
breaks every saved checkpoint.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

# Every learned embedding starts at this std, so that no one of them (token identity, a position
# axis, the time projection) drowns the others in the sum a token starts as.
EMBED_STD = 0.02


def token_embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """An nn.Embedding at the position tables' scale: its default N(0, 1) would drown position
    (EMBED_STD) by 50x, and the model would learn where tokens are only after hundreds of steps."""
    emb = nn.Embedding(num_embeddings, dim)
    nn.init.normal_(emb.weight, std=EMBED_STD)
    return emb


def position_table(length: int, dim: int) -> nn.Parameter:
    """A learned [length, dim] position table (one axis of the token grid)."""
    return nn.Parameter(torch.randn(length, dim) * EMBED_STD)


def token_valid(valid: torch.Tensor | None, grid: tuple[int, int, int]) -> torch.Tensor | None:
    """A padding mask as the backbones take it -> bool [B, t * h * w] in (t h w) order, or None.

    valid: bool [B, t] (per latent frame: a short clip's or an image's padded frames) or
    [B, t, h, w] (per token); True = a real position, False = padding the model must not see.
    A clip with no real position at all is treated as all real, so that attention always has a
    key (such a clip contributes nothing: the loss and the sampler skip padded positions)."""
    if valid is None:
        return None
    t, h, w = grid
    valid = valid.bool()
    if valid.dim() == 2 and valid.shape[1] == t:
        valid = valid[:, :, None, None].expand(-1, t, h, w)
    if tuple(valid.shape[1:]) != (t, h, w):
        raise ValueError(f"valid mask of shape {tuple(valid.shape)} does not fit the token grid {grid}")
    valid = rearrange(valid, "b t h w -> b (t h w)")
    return valid | ~valid.any(dim=1, keepdim=True)


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
        # In its weights' dtype, not autocast's, on every device: a small memory-bound op whose
        # half-precision CPU backward is much slower than its fp32 one.
        with torch.autocast(y.device.type, enabled=False):
            return rearrange(self.conv(y.to(self.conv.weight.dtype)), "b d t h w -> b (t h w) d")


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
        self.null = nn.Parameter(torch.randn(1, 1, dim) * EMBED_STD)
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
