"""The masked tokens' cross-entropy (models/losses.py): F.cross_entropy's value and gradient, with a
backward that writes the gradient into its own saved log-probabilities."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskvid.models.losses import token_cross_entropy


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
def test_matches_f_cross_entropy_value_and_gradients_through_a_head(label_smoothing):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50)
    target = torch.randint(0, 50, (37,))
    target[:5] = 3  # repeated targets: the one-hot part must accumulate per row, not per class

    def run(loss_fn):
        hidden.grad = None
        head.zero_grad(set_to_none=True)
        loss = loss_fn(head(hidden), target) * 2.5  # an upstream gradient other than 1
        loss.backward()
        return loss.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()

    ours = run(lambda z, t: token_cross_entropy(z, t, label_smoothing))
    ref = run(lambda z, t: F.cross_entropy(z, t, label_smoothing=label_smoothing))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_half_precision_logits_are_computed_in_fp32_and_get_their_dtype_back():
    torch.manual_seed(1)
    logits = torch.randn(20, 30).bfloat16().requires_grad_()
    target = torch.randint(0, 30, (20,))
    loss = token_cross_entropy(logits, target, 0.1)
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.float(), target, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_under_cpu_autocast_the_loss_stays_fp32_and_equal_to_f_cross_entropy():
    torch.manual_seed(2)
    logits = torch.randn(16, 40).bfloat16().requires_grad_()
    target = torch.randint(0, 40, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = token_cross_entropy(logits, target)
        ref = F.cross_entropy(logits.float(), target)
    assert loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref)


def test_the_gradient_is_written_into_the_saved_log_probabilities():
    """No [N, V] tensor is allocated in backward: the gradient reaching the logits is the buffer
    the forward saved (F.cross_entropy allocates two)."""
    logits = torch.randn(8, 64, requires_grad=True)
    target = torch.randint(0, 64, (8,))
    saved: list[int] = []

    def pack(t):
        if t.shape == logits.shape:
            saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = token_cross_entropy(logits, target)
    grads: list[int] = []
    logits.register_hook(lambda g: grads.append(g.untyped_storage().data_ptr()))
    loss.backward()
    assert saved and grads == saved[-1:]


def test_a_second_backward_through_the_same_graph_fails_loudly():
    logits = torch.randn(4, 10, requires_grad=True)
    loss = token_cross_entropy(logits, torch.randint(0, 10, (4,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_bad_shapes_and_smoothing_are_refused():
    with pytest.raises(ValueError, match=r"expected logits \[N, V\] and target \[N\]"):
        token_cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected logits \[N, V\] and target \[N\]"):
        token_cross_entropy(torch.randn(5, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        token_cross_entropy(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), 1.5)
