"""Gradient clipping (lightning_modules/optim.py): torch's clip under every precision plugin,
including bf16 autocast with a fused optimizer (which Lightning's mixed-precision plugin refuses),
and a real Lightning step steps on clipped gradients; the weight-decay split both modules share."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from maskvid.lightning_modules.optim import adamw, clip_grad_norm, weight_decay_groups


class _Tiny(LightningModule):
    def __init__(self, max_norm: float, fused: bool = False) -> None:
        super().__init__()
        self.max_norm, self.fused = max_norm, fused
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        self.update_norms: list[float] = []

    def training_step(self, batch, batch_idx):
        return (self.net(batch) * 100).square().mean()  # gradients far over max_norm

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_grad_norm(self, optimizer, self.max_norm)

    def configure_optimizers(self):
        # Plain SGD with lr 1: each update is minus the gradient the optimizer stepped on. fused:
        # Lightning's bf16 plugin refuses to clip for a fused optimizer; ours must clip anyway.
        return torch.optim.SGD(self.parameters(), lr=1.0, fused=self.fused)

    def on_train_batch_start(self, batch, batch_idx):
        self._before = [p.detach().clone() for p in self.parameters()]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        delta = [p.detach() - b for p, b in zip(self.parameters(), self._before)]
        self.update_norms.append(math.sqrt(sum(float(d.square().sum()) for d in delta)))


def fit(module: LightningModule, precision: str) -> None:
    data = torch.utils.data.DataLoader(torch.randn(12, 8), batch_size=4)
    Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=3, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False).fit(module, data)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_lightning_step_steps_on_gradients_clipped_to_max_norm(precision, fused, monkeypatch):
    calls = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m, *a, **k: calls.append(m) or real(p, m, *a, **k))
    torch.manual_seed(0)
    module = _Tiny(max_norm=0.5, fused=fused)
    fit(module, precision)
    assert len(module.update_norms) == 3 and calls == [0.5] * 3  # torch's clip, once a step
    assert all(n == pytest.approx(0.5, rel=1e-4) for n in module.update_norms), module.update_norms


def test_a_nan_gradient_poisons_every_gradient_as_torch_does():
    """A non-finite norm is not hidden by the clip: the step's gradients all become NaN, which the
    non-finite step guard (lightning_modules/nonfinite.py) then skips."""

    class Poisoned(_Tiny):
        def on_after_backward(self):
            self.net[0].bias.grad[0] = float("nan")

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            super().configure_gradient_clipping(optimizer)
            self.clipped = [p.grad.clone() for p in self.parameters()]

    module = Poisoned(max_norm=0.5)
    fit(module, "32-true")
    assert all(torch.isnan(g).all() for g in module.clipped)


def test_adamw_is_fused_for_plain_cpu_parameters():
    trainer = Trainer(accelerator="cpu", devices=1, logger=False)
    optimizer = adamw([{"params": [torch.nn.Parameter(torch.zeros(3))]}], trainer, lr=1e-3)
    assert optimizer.defaults["fused"]


def _no_decay_names(network: torch.nn.Module, no_decay: tuple[str, ...]) -> set[str]:
    decay, keep = weight_decay_groups(network, 0.05, no_decay)
    assert decay["weight_decay"] == 0.05 and keep["weight_decay"] == 0.0
    ids = {id(p) for p in keep["params"]}
    assert len(decay["params"]) + len(keep["params"]) == sum(1 for p in network.parameters() if p.requires_grad)
    return {name for name, p in network.named_parameters() if id(p) in ids}


def test_both_modules_decay_matrices_only_and_not_embeddings_positions_or_codebooks():
    """The one no-decay split (lightning_modules/optim.py) with each module's own names."""
    from maskvid.lightning_modules import masked_video_module, tokenizer_module
    from maskvid.models.cvivit import CViViT
    from maskvid.models.maskgit import MaskGITBackbone
    from maskvid.models.mebt import MeBT
    from maskvid.models.quantizer import VectorQuantizer

    def vectors(net):
        return {name for name, p in net.named_parameters() if p.ndim < 2}

    maskgit = MaskGITBackbone(vocab_size=16, grid=(2, 2, 2), dim=16, depth=1, heads=2, text_dim=8, pooled_text=True,
                              local_mixing=True)
    expected = {"token_emb.weight", "pos_t", "pos_h", "pos_w", "text.null"}
    assert _no_decay_names(maskgit, masked_video_module._NO_DECAY) == vectors(maskgit) | expected

    mebt = MeBT(vocab_size=16, grid=(2, 2, 2), dim=16, depth=1, heads=2, num_latents=4, text_dim=8)
    expected = {"token_emb.weight", "pos_h", "pos_w", "text.null", "latents"}
    assert _no_decay_names(mebt, masked_video_module._NO_DECAY) == vectors(mebt) | expected

    cvivit = CViViT(image_size=16, patch_size=4, dim=16, spatial_depth=1, temporal_depth=1, heads=2,
                    quantizer=VectorQuantizer(codebook_size=8, dim=4))
    expected = {"pos_h", "pos_w", "dec_pos_h", "dec_pos_w", "quantizer.codebook"}
    assert _no_decay_names(cvivit, tokenizer_module._NO_DECAY) == vectors(cvivit) | expected
    # A frozen parameter is in no group.
    cvivit.pos_h.requires_grad_(False)
    assert "pos_h" not in _no_decay_names(cvivit, tokenizer_module._NO_DECAY)
