"""Gradient clipping (lightning_modules/optim.py): the plain-CPU fast path clips exactly as
torch.nn.utils.clip_grad_norm_ does, and a real Lightning step steps on clipped gradients."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_modules.optim import adamw, clip_grad_norm, clip_plain_cpu_grads, plain_cpu_grads


def grads(seed: int, scale: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale for shape in [(64, 32), (32,), (7, 5, 3), (1,)]]


@pytest.mark.parametrize("scale", [10.0, 1e-3])
def test_fast_clip_matches_torch_clip_grad_norm(scale):
    ours, ref = grads(0, scale), grads(0, scale)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in ref]
    for p, g in zip(params, ref):
        p.grad = g
    total_ref = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
    total = clip_plain_cpu_grads(ours, 1.0)
    torch.testing.assert_close(total, total_ref)
    for a, p in zip(ours, params):
        torch.testing.assert_close(a, p.grad)
    if scale < 1:  # under the norm: left exactly as they were (torch multiplies by 1)
        for a, b in zip(ours, grads(0, scale)):
            assert torch.equal(a, b)


def test_fast_clip_with_a_nan_gradient_poisons_like_torch():
    ours = grads(1, 1.0)
    ours[1][3] = float("nan")
    clip_plain_cpu_grads(ours, 1.0)
    assert all(torch.isnan(g).all() for g in ours)


def test_only_plain_fp32_contiguous_cpu_gradients_take_the_fast_path():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    p.grad = torch.ones(4, 4)
    assert [g is p.grad for g in plain_cpu_grads([p])] == [True]
    p.grad = torch.ones(4, 4).t()  # non-contiguous
    assert plain_cpu_grads([p]) is None
    q = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))
    q.grad = torch.ones(4, 4, dtype=torch.bfloat16)
    assert plain_cpu_grads([q]) is None


class _Tiny(LightningModule):
    def __init__(self, max_norm: float) -> None:
        super().__init__()
        self.max_norm = max_norm
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        self.update_norms: list[float] = []

    def training_step(self, batch, batch_idx):
        return (self.net(batch) * 100).square().mean()  # gradients far over max_norm

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_grad_norm(self, optimizer, self.max_norm)

    def configure_optimizers(self):
        # Plain SGD with lr 1: each update is minus the gradient the optimizer stepped on.
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def on_train_batch_start(self, batch, batch_idx):
        self._before = [p.detach().clone() for p in self.parameters()]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        delta = [p.detach() - b for p, b in zip(self.parameters(), self._before)]
        self.update_norms.append(math.sqrt(sum(float(d.square().sum()) for d in delta)))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_lightning_step_steps_on_gradients_clipped_to_max_norm(precision, monkeypatch):
    import lightning_modules.optim as optim

    fast_calls = []
    real = optim.clip_plain_cpu_grads
    monkeypatch.setattr(optim, "clip_plain_cpu_grads", lambda g, m: fast_calls.append(m) or real(g, m))
    torch.manual_seed(0)
    module = _Tiny(max_norm=0.5)
    data = torch.utils.data.DataLoader(torch.randn(12, 8), batch_size=4)
    Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=3, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False).fit(module, data)
    assert len(module.update_norms) == 3 and fast_calls == [0.5] * 3  # the fast path, not Lightning's
    assert all(n == pytest.approx(0.5, rel=1e-4) for n in module.update_norms), module.update_norms


def test_adamw_is_fused_for_plain_cpu_parameters():
    trainer = Trainer(accelerator="cpu", devices=1, logger=False)
    optimizer = adamw([{"params": [torch.nn.Parameter(torch.zeros(3))]}], trainer, lr=1e-3)
    assert optimizer.defaults["fused"]
