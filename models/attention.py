"""Transformer building blocks shared by every maskvid network, and the one place in `models/` that
knows which device it runs on.

Dense attention goes through `F.scaled_dot_product_attention` (flash / memory-efficient kernels on
GPU, the fused CPU kernel elsewhere) with one fused QKV projection: one larger matmul is faster
than three small ones on a CPU, and launches one kernel instead of three on a GPU.

Attention over variable-length sets (MeBT's observed and masked tokens, captions with padding)
goes through `varlen_attention` on packed sequences: FlashAttention's varlen kernel on CUDA (no
boolean mask, no padding), a padded SDPA with a key mask elsewhere.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

HALF = (torch.bfloat16, torch.float16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              is_causal: bool = False) -> torch.Tensor:
    """`F.scaled_dot_product_attention` on [B, H, N, D], except that off CUDA, for bf16/fp16 inputs
    (autocast or a half-precision model), it runs in fp32 and hands back the input dtype: PyTorch's
    CPU flash-attention backward in half precision is several times slower than its fp32 one,
    while the half-precision matmuls around it are faster. CUDA keeps its half-precision kernels."""
    if q.device.type != "cuda" and q.dtype in HALF:
        with torch.autocast(q.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                 is_causal=is_causal)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


class Varlen(NamedTuple):
    """Where sequences sit in a packed [T, ...] tensor: sequence b is rows cu[b]:cu[b + 1], one
    sequence after another; rows past cu[-1] belong to none (left over by `pack_rows`)."""

    cu: torch.Tensor  # int32 [B + 1], cumulative lengths
    max_len: int  # an upper bound on every sequence's length (static: no .item(), no graph break)


def uniform(batch: int, length: int, device: torch.device | str) -> Varlen:
    """B sequences of `length` rows each (a dense [B, length, ...] tensor, flattened)."""
    return Varlen(torch.arange(0, (batch + 1) * length, length, device=device, dtype=torch.int32), length)


def pack_rows(keep: torch.Tensor) -> tuple[torch.Tensor, Varlen]:
    """bool [B, L] -> (order [B * L], Varlen): indices into the flattened [B * L] that put every
    row's kept places first, row by row in order, then all the others (which belong to no
    sequence). Static shapes (a sort, no nonzero): packing a caption's padding away compiles
    without a graph break."""
    b, length = keep.shape
    flat = torch.arange(b * length, device=keep.device)
    order = torch.argsort(torch.where(keep.flatten(), flat, flat + b * length))
    cu = F.pad(keep.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    return order, Varlen(cu, length)


def members(x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """x [T, ...] with its rows past cu[-1] zeroed (values and gradients)."""
    inside = torch.arange(x.shape[0], device=x.device) < cu[-1]
    return torch.where(inside.view(-1, *([1] * (x.dim() - 1))), x, 0)


def on_cuda(x: torch.Tensor) -> bool:
    """Whether FlashAttention's CUDA kernels can take x (a function, so tests can reach that path)."""
    return x.device.type == "cuda"


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_q: int, max_k: int) -> torch.Tensor:
    """Attention of every packed query sequence to its own key sequence.

    q [Tq, H, D], k and v [Tk, H, D], packed sequence after sequence; cu_seqlens_q/k: int32 [B + 1]
    cumulative lengths; max_q/max_k: upper bounds on the lengths. Rows past cu[-1] belong to no
    sequence: such keys are never read, such queries come back as zeros. Every sequence that has
    queries must have at least one key. -> [Tq, H, D].

    On CUDA in half precision: FlashAttention's varlen kernel (no mask, no padding). Elsewhere:
    SDPA on the sequences padded to [B, max, H, D] with a key mask (the same function)."""
    if on_cuda(q):
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
        if dtype in HALF:
            from torch.nn.attention.varlen import varlen_attn

            # Left-over rows are outside every sequence, so the kernel would leave their outputs
            # and gradients unwritten: zero both.
            q, k, v = members(q, cu_seqlens_q), members(k, cu_seqlens_k), members(v, cu_seqlens_k)
            out = varlen_attn(q.to(dtype), k.to(dtype), v.to(dtype), cu_seqlens_q, cu_seqlens_k, max_q, max_k)
            return members(out, cu_seqlens_q)
    return padded_attention(q, k, v, Varlen(cu_seqlens_q, max_q), Varlen(cu_seqlens_k, max_k))


def _slots(seqs: Varlen, rows: int) -> torch.Tensor:
    """Each packed row's place in the flattened [B * max_len] padding; rows of no sequence go to
    the scratch place B * max_len."""
    cu = seqs.cu
    index = torch.arange(rows, device=cu.device, dtype=cu.dtype)
    seq = torch.searchsorted(cu[1:], index, right=True)  # B for rows past cu[-1]
    b = cu.numel() - 1
    return torch.where(seq < b, seq * seqs.max_len + (index - cu[seq]), b * seqs.max_len)


def _pad(x: torch.Tensor, slots: torch.Tensor, b: int, max_len: int) -> torch.Tensor:
    """Packed [T, H, D] -> [B, H, max_len, D], zeros in the padding. index_put_, not index_copy:
    index_copy's backward keeps its whole source alive, index_put_ only the slots."""
    out = x.new_zeros(b * max_len + 1, *x.shape[1:]).index_put_((slots,), x)
    return rearrange(out[: b * max_len], "(b n) h d -> b h n d", b=b)


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qs: Varlen, ks: Varlen) -> torch.Tensor:
    """`varlen_attention` as one dense SDPA: the sequences padded to their upper bounds, the
    padded keys masked out."""
    b = qs.cu.numel() - 1
    q_slots, k_slots = _slots(qs, q.shape[0]), _slots(ks, k.shape[0])
    lengths = ks.cu[1:] - ks.cu[:-1]
    valid = torch.arange(ks.max_len, device=k.device) < lengths[:, None]
    out = attention(_pad(q, q_slots, b, qs.max_len), _pad(k, k_slots, b, ks.max_len),
                    _pad(v, k_slots, b, ks.max_len), attn_mask=rearrange(valid, "b m -> b 1 1 m"))
    out = F.pad(rearrange(out, "b h n d -> (b n) h d"), (0, 0, 0, 0, 0, 1))  # + the scratch place, zeros
    return out.index_select(0, q_slots)


def split_heads(fused: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """A fused projection [B, N, parts*H*D] -> `parts` views [B, H, N, D] (q, k, v or k, v).

    Unbinding along the `parts` axis of a [B, N, parts, H, D] view, rather than a leading one,
    makes autograd's stack of the parts' gradients land directly in the projection's layout: the
    leading-axis form stacked them to [parts, B, H, N, D] and then copied that again into
    [B, N, parts*H*D] (bit-identical results)."""
    split = rearrange(fused, "b n (parts h d) -> b n parts h d", parts=parts, h=heads)
    return tuple(part.transpose(1, 2) for part in split.unbind(2))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection."""

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D]. key_mask: optional bool [B, N], True = may be attended to
        (every row must keep at least one key); None keeps SDPA's unmasked (flash) kernels."""
        q, k, v = split_heads(self.qkv(x), 3, self.heads)
        mask = None if key_mask is None else rearrange(key_mask, "b n -> b 1 1 n")
        out = attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    """Multi-head attention from queries x to a context (text, latents), fused KV projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, D]; context: [B, M, D]; mask: optional bool [B, M], True = attend (every row
        must keep at least one place). With a mask the padding is packed away and the attention
        is `varlen_attention`'s."""
        if mask is None:
            return self.proj(self.attend(self.q(x), self.kv(context)))
        b, n = x.shape[:2]
        order, keys = pack_rows(mask)
        kv = self.kv(rearrange(context, "b m c -> (b m) c").index_select(0, order))
        read = self.attend_varlen(rearrange(self.q(x), "b n d -> (b n) d"), kv, uniform(b, n, x.device), keys)
        return self.proj(rearrange(read, "(b n) d -> b n d", b=b))

    def attend(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """The attention alone, on projected inputs: q [B, N, D], kv [B, M, 2D] -> [B, N, D] before
        `proj`."""
        q = rearrange(q, "b n (h d) -> b h n d", h=self.heads)
        k, v = split_heads(kv, 2, self.heads)
        return rearrange(attention(q, k, v), "b h n d -> b n (h d)")

    def attend_varlen(self, q: torch.Tensor, kv: torch.Tensor, qs: Varlen, ks: Varlen) -> torch.Tensor:
        """The attention alone, on packed projected inputs: q [Tq, D], kv [Tk, 2D] -> [Tq, D]
        before `proj` (`varlen_attention`). Callers with variable-length sets run the per-token
        projections on packed tokens and hand the attention their layout."""
        q = rearrange(q, "t (h d) -> t h d", h=self.heads)
        # Unbound along the parts axis, so that backward stacks the gradients in kv's layout.
        k, v = rearrange(kv, "t (parts h d) -> t parts h d", parts=2, h=self.heads).unbind(1)
        out = varlen_attention(q, k, v, qs.cu, ks.cu, qs.max_len, ks.max_len)
        return rearrange(out, "t h d -> t (h d)")


class FeedForward(nn.Module):
    """Position-wise MLP with exact (erf) GELU: on CPU it is much faster than the tanh form."""

    def __init__(self, dim: int, mult: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mult)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, ff_mult: float = 4.0, causal: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, causal=causal)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class Transformer(nn.Module):
    """A stack of blocks with a final norm.

    The blocks live in a ModuleList, which is where the strategies (launch/strategies.py) look for
    the blocks they checkpoint, compile and shard one by one.
    """

    def __init__(
        self, dim: int, depth: int, heads: int, ff_mult: float = 4.0, causal: bool = False
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, ff_mult, causal) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def sinusoidal_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin/cos embedding of integer positions [N] -> [N, dim].

    Used for time, so that a model trained on k latent frames can encode any number of them.
    """
    half = dim // 2
    freqs = torch.exp(
        -torch.arange(half, device=positions.device, dtype=torch.float32) * (math.log(10000.0) / half)
    )
    angles = positions.float()[:, None] * freqs[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))
