"""The shared attention blocks: heads split from fused projections give the same results as the
textbook layout, and their gradients reach the projection without an extra copy; variable-length
attention on packed sequences equals dense attention with a boolean key mask, on the fallback and
(with the kernel stubbed) through FlashAttention's varlen call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils._python_dispatch import TorchDispatchMode

import maskvid.models.attention as attention
from maskvid.models.attention import CrossAttention, SelfAttention, Varlen, pack_rows, split_heads, varlen_attention


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
    attn = CrossAttention(dim, 4)
    x, context = torch.randn(b, n, dim), torch.randn(b, m, dim)
    mask = torch.ones(b, m, dtype=torch.bool)
    mask[0, 3:] = False
    out = attn(x, context, mask)
    recorder = FullSizeOps(b * m * 2 * dim)
    with recorder:
        out.backward(torch.randn_like(out))
    assert len(recorder.ops) == 1, recorder.ops


def packed_case(seed: int = 0):
    """Three sequences of queries (3, 0, 4) and keys (2, 5, 1), packed, plus two left-over key
    rows that belong to no sequence; and the same as dense [B, H, N, D] tensors with a key mask."""
    g = torch.Generator().manual_seed(seed)
    lq, lk, h, d = [3, 0, 4], [2, 5, 1], 2, 8
    q = torch.randn(sum(lq), h, d, generator=g, requires_grad=True)
    k = torch.randn(sum(lk) + 2, h, d, generator=g, requires_grad=True)
    v = torch.randn(sum(lk) + 2, h, d, generator=g, requires_grad=True)
    cu_q = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 2, 7, 8], dtype=torch.int32)
    return q, k, v, cu_q, cu_k, lq, lk


def dense_reference(q, k, v, lq, lk):
    """Dense SDPA on [B, H, N, D] padded by hand, a boolean key mask; -> packed [Tq, H, D]."""
    b, mq, mk = len(lq), max(lq), max(lk)
    qd, kd, vd = (torch.zeros(b, mq, *q.shape[1:]), torch.zeros(b, mk, *k.shape[1:]), torch.zeros(b, mk, *k.shape[1:]))
    mask = torch.zeros(b, mk, dtype=torch.bool)
    iq = ik = 0
    for i in range(b):
        qd[i, :lq[i]], kd[i, :lk[i]], vd[i, :lk[i]] = q[iq:iq + lq[i]], k[ik:ik + lk[i]], v[ik:ik + lk[i]]
        mask[i, :lk[i]] = True
        iq, ik = iq + lq[i], ik + lk[i]
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (qd, kd, vd)), attn_mask=mask[:, None, None])
    out = out.transpose(1, 2)
    return torch.cat([out[i, :lq[i]] for i in range(b)])


def test_varlen_attention_equals_dense_attention_with_a_key_mask():
    q, k, v, cu_q, cu_k, lq, lk = packed_case()
    grad = torch.randn(q.shape)
    # Upper bounds, not the exact largest lengths: what callers pass so that nothing syncs.
    out = varlen_attention(q, k, v, cu_q, cu_k, 6, 9)
    out.backward(grad)
    got = [out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()]
    for x in (q, k, v):
        x.grad = None
    ref = dense_reference(q, k, v, lq, lk)
    ref.backward(grad)
    for a, b in zip(got, (ref.detach(), q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b)
    # The left-over key rows are read by no one.
    assert torch.equal(got[2][-2:], torch.zeros(2, 2, 8)) and torch.equal(got[3][-2:], torch.zeros(2, 2, 8))


def test_masked_cross_attention_packs_the_padding_away_and_equals_the_dense_masked_one(monkeypatch):
    torch.manual_seed(0)
    attn = CrossAttention(32, 4)
    x = torch.randn(3, 5, 32, requires_grad=True)
    context = torch.randn(3, 6, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 0, 0]]).bool()
    calls = []
    real = attention.varlen_attention
    monkeypatch.setattr(attention, "varlen_attention", lambda *a: calls.append(a[3:]) or real(*a))
    out = attn(x, context, mask)
    out.sum().backward()
    got = (out.detach(), x.grad.clone(), attn.kv.weight.grad.clone())
    cu_q, cu_k, max_q, max_k = calls[0]
    assert cu_q.tolist() == [0, 5, 10, 15] and cu_k.tolist() == [0, 3, 9, 11] and (max_q, max_k) == (5, 6)
    x.grad = None
    attn.zero_grad()
    q = rearrange(attn.q(x), "b n (h d) -> b h n d", h=4)
    k, v = rearrange(attn.kv(context), "b m (two h d) -> two b h m d", two=2, h=4)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None])
    ref = attn.proj(rearrange(ref, "b h n d -> b n (h d)"))
    ref.sum().backward()
    for a, b in zip(got, (ref.detach(), x.grad, attn.kv.weight.grad)):
        torch.testing.assert_close(a, b)


def test_pack_rows_puts_each_row_s_kept_places_first_with_static_shapes():
    order, seqs = pack_rows(torch.tensor([[False, True, True], [True, False, False]]))
    assert order.tolist()[:3] == [1, 2, 3] and sorted(order.tolist()) == list(range(6))
    assert seqs.cu.tolist() == [0, 2, 3] and seqs.max_len == 3


def test_on_cuda_half_precision_goes_to_flash_attention_varlen_with_the_cumulative_lengths(monkeypatch):
    """No GPU here: the device check and the kernel are stubbed, to check what reaches the kernel."""
    import torch.nn.attention.varlen as varlen

    q, k, v, cu_q, cu_k, lq, lk = packed_case()
    calls = []

    def fake_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k):
        calls.append((q.dtype, cu_seq_q, cu_seq_k, max_q, max_k, k.detach().clone()))
        return attention.padded_attention(q, k, v, Varlen(cu_seq_q, max_q), Varlen(cu_seq_k, max_k))

    monkeypatch.setattr(varlen, "varlen_attn", fake_varlen_attn)
    # fp32 stays on the fallback (FlashAttention takes half precision only).
    monkeypatch.setattr(attention, "on_cuda", lambda x: True)
    varlen_attention(q, k, v, cu_q, cu_k, 6, 9)
    assert calls == []
    half = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    out = varlen_attention(*half, cu_q, cu_k, 6, 9)
    (dtype, got_q, got_k, max_q, max_k, keys), = calls
    assert dtype == torch.bfloat16 and (max_q, max_k) == (6, 9)
    assert got_q is cu_q and got_k is cu_k and got_q.dtype == torch.int32
    assert torch.equal(keys[-2:], torch.zeros_like(keys[-2:]))  # left-over rows zeroed for the kernel
    torch.testing.assert_close(out.float(), dense_reference(q, k, v, lq, lk), atol=0.05, rtol=0.05)
    out.float().sum().backward()
    assert torch.equal(half[1].grad[-2:], torch.zeros_like(half[1].grad[-2:]))


def test_padding_keeps_only_the_slots_for_backward():
    """index_copy's backward kept its whole source alive (every packed key/value projection, a
    large part of MeBT's saved activations at 129 frames); padding must keep no tensor of its
    input's size."""
    seqs = Varlen(torch.tensor([0, 3, 4], dtype=torch.int32), 3)
    x = torch.randn(4, 2, 8, requires_grad=True) * 2  # a non-leaf, like a projection's output
    saved = []

    def keep(t):
        saved.append(tuple(t.shape))
        return t

    slots = attention._slots(seqs, 4)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        padded = attention._pad(x, slots, 2, 3)
    assert padded.shape == (2, 2, 3, 8) and torch.equal(padded[1, :, 1:], torch.zeros(2, 2, 8))
    assert saved and all(shape != tuple(x.shape) for shape in saved), saved
    padded.sum().backward()  # and the gradient still reaches every member


def test_only_attention_py_asks_which_device_it_runs_on():
    """One code path in models/: no other file branches on the device type or on CPU/CUDA autocast."""
    import re

    from tests.conftest import REPO

    # A branch on the device, not a use of it (`torch.autocast(x.device.type, enabled=False)` is the
    # same code on every device).
    asks = re.compile(r"device\.type *([!=]=|in\b)|\.type *[!=]= *['\"](cpu|cuda)['\"]|is_autocast_enabled\(|torch\.cuda\.is_available")
    offenders = {p.name: [line.strip() for line in p.read_text().splitlines() if asks.search(line)]
                 for p in sorted((REPO / "models").glob("*.py")) if p.name != "attention.py"}
    assert not {k: v for k, v in offenders.items() if v}
    assert asks.search((REPO / "models/attention.py").read_text())  # the one place that does
