"""The shared attention blocks: heads split from fused projections give the same results as the
textbook layout, and their gradients reach the projection without an extra copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils._python_dispatch import TorchDispatchMode

from models.attention import CrossAttention, SelfAttention, split_heads


class FullSizeOps(TorchDispatchMode):
    """Records the aten ops whose output has `numel` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() == self.numel and out.data_ptr() not in {
                a.data_ptr() for a in args if isinstance(a, torch.Tensor)}:
            self.ops.append(func.__name__)
        return out


def reference_self_attention(attn: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    q, k, v = rearrange(attn.qkv(x), "b n (three h d) -> three b h n d", three=3, h=attn.heads)
    return attn.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


def test_split_heads_matches_the_textbook_layout():
    fused = torch.randn(2, 5, 3 * 4 * 6)
    for part, ref in zip(split_heads(fused, 3, 4), rearrange(fused, "b n (three h d) -> three b h n d", three=3, h=4)):
        assert part.shape == (2, 4, 5, 6)
        assert torch.equal(part, ref)
        assert part.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()  # views, no copy


def test_self_attention_output_and_gradients_equal_the_textbook_layout():
    torch.manual_seed(0)
    attn = SelfAttention(32, 4)
    x = torch.randn(2, 7, 32, requires_grad=True)
    grad = torch.randn(2, 7, 32)
    out = attn(x)
    out.backward(grad)
    got = (out.detach(), x.grad.clone(), attn.qkv.weight.grad.clone())
    x.grad = None
    attn.zero_grad()
    ref = reference_self_attention(attn, x)
    ref.backward(grad)
    for a, b in zip(got, (ref.detach(), x.grad, attn.qkv.weight.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_qkv_gradient_is_assembled_once_in_the_projection_layout():
    """Backward stacks q, k and v's gradients straight into [B, N, 3D]; the leading-axis split
    stacked them to [3, B, H, N, D] and copied that again (a second full-size tensor)."""
    torch.manual_seed(0)
    b, n, dim = 2, 9, 32
    attn = SelfAttention(dim, 4)
    x = torch.randn(b, n, dim, requires_grad=True)
    out = attn(x)
    recorder = FullSizeOps(b * n * 3 * dim)
    with recorder:
        out.backward(torch.randn_like(out))
    assert len(recorder.ops) == 1, recorder.ops


def test_cross_attention_kv_gradient_is_assembled_once():
    torch.manual_seed(0)
    b, n, m, dim = 2, 9, 5, 32
    attn = CrossAttention(dim, 4, context_dim=16)
    x, context = torch.randn(b, n, dim), torch.randn(b, m, 16)
    mask = torch.ones(b, m, dtype=torch.bool)
    mask[0, 3:] = False
    out = attn(x, context, mask)
    recorder = FullSizeOps(b * m * 2 * dim)
    with recorder:
        out.backward(torch.randn_like(out))
    assert len(recorder.ops) == 1, recorder.ops
