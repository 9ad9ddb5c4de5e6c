"""AdamW and gradient clipping that work under every precision and strategy maskvid runs.

Two Lightning behaviours make this worth one place:
- Lightning's mixed-precision plugin refuses to clip the gradients of a fused optimizer, because
  with fp16 loss scaling such an optimizer unscales inside its own step. Under bf16 autocast there
  is no scaler and nothing to unscale, so clipping is exactly the fp32 one.
- DeepSpeed clips inside its engine (from its config), and a plain clip on `p.grad` would see
  partitioned or missing gradients there; the strategy passes the module's clip into that config.
"""

from __future__ import annotations

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn


def _grad_scaler(trainer) -> object | None:
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None)


def weight_decay_groups(network: nn.Module, weight_decay: float, no_decay: tuple[str, ...] = ()) -> list[dict]:
    """AdamW parameter groups for `network`'s trainable parameters: `weight_decay` on matrices,
    none on vectors and scalars (norms, biases) nor on parameters whose name ends with one of
    `no_decay` (embeddings, position tables, codebooks: decay would pull them towards zero)."""
    decay, keep = [], []
    for name, p in network.named_parameters():
        if p.requires_grad:
            (keep if p.ndim < 2 or name.endswith(no_decay) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def adamw(param_groups: list[dict], trainer, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused where it can be: plain float parameters on CPU/CUDA (the fused kernel steps
    faster on CPU) and no fp16 grad scaler (whose unscaling a fused step takes over, which would
    put gradient clipping before the unscale)."""
    params = [p for group in param_groups for p in group["params"]]
    fused = _grad_scaler(trainer) is None and all(
        type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params
    )
    return torch.optim.AdamW(param_groups, fused=fused, **kwargs)


def clip_grad_norm(module, optimizer, max_norm: float) -> None:
    """Clip the gradient norm of `optimizer`'s parameters to `max_norm` (0 disables), through the
    precision plugin's own clipping (DeepSpeed's clips in its engine, an fp16 scaler unscales
    first). Under bf16 autocast there is no scaler and nothing to unscale, so the plugin's refusal
    of a fused optimizer does not apply: the base plugin's clip (torch's clip_grad_norm_,
    DTensor-aware under FSDP2) is exactly right."""
    if max_norm <= 0:
        return
    plugin = module.trainer.precision_plugin
    if isinstance(plugin, MixedPrecision) and _grad_scaler(module.trainer) is None:
        inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer under manual optimization
        Precision.clip_gradients(plugin, inner, max_norm, GradClipAlgorithmType.NORM)
        return
    module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm=GradClipAlgorithmType.NORM)
