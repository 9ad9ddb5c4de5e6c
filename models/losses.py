"""Cross-entropy over the masked tokens' logits, with a backward that reuses its own buffer.

`F.cross_entropy` on [N, V] logits (N masked tokens, V = 8192 codes) makes, in backward, a
zero-filled [N, V] gradient for the NLL, then a second [N, V] tensor for the log-softmax's
backward. Here the forward keeps the log-probabilities (which the backward needs anyway) and the
backward turns them into the gradient in place: softmax - one-hot, scaled. That is faster, and the
step's peak loses two [N, V] tensors, which matters where the peak is this backward (MeBT on long
videos); figures in docs/benchmarks.md.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.autograd.function import once_differentiable


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(1, target[:, None]).squeeze(1)
        if label_smoothing:
            # PyTorch's definition: (1 - e) * NLL + e * (mean over classes of -log p).
            picked = (1 - label_smoothing) * picked + label_smoothing / logp.shape[1] * logp.sum(dim=1)
        ctx.save_for_backward(logp, target)
        ctx.label_smoothing = label_smoothing
        return -picked.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logp, target = ctx.saved_tensors
        n, v = logp.shape
        scale = grad / n
        # In place on the saved log-probabilities: a second backward through this graph (retain_graph)
        # fails autograd's saved-tensor version check instead of reading a gradient as log-probs.
        out = logp.exp_().mul_(scale)
        if ctx.label_smoothing:
            out.sub_(scale * (ctx.label_smoothing / v))
        out.scatter_add_(1, target[:, None], -(scale * (1 - ctx.label_smoothing)).expand(n, 1))
        return out, None, None


def token_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of logits [N, V] (computed in fp32) against class indices target [N]:
    the value and gradient of `F.cross_entropy(logits.float(), target, label_smoothing=...)`."""
    # guard_or_false: under torch.compile both lengths are data-dependent (the masked count), and a
    # plain comparison would break the graph; there the shapes are asserted where they are used.
    if logits.dim() != 2 or target.dim() != 1 or guard_or_false(target.shape[0] != logits.shape[0]):
        raise ValueError(f"expected logits [N, V] and target [N], got {tuple(logits.shape)} and {tuple(target.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return _TokenCrossEntropy.apply(logits.float(), target, float(label_smoothing))
