"""Exponential moving average of a network's weights, kept as a frozen copy.

The copy is a submodule of the LightningModule, so it is saved and restored with every checkpoint
(resume continues the same average), but its parameters never require grad and never enter an
optimizer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from maskvid.lightning_modules.local_shard import local_shard


class EMA(nn.Module):
    """`self.module` tracks `decay`-averaged weights of the network it was made from."""

    def __init__(self, network: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        # Only ever evaluated (Lightning puts it in eval mode for validation); left in train mode
        # otherwise so Lightning does not warn about eval-mode modules at the start of fit.
        self.module = copy.deepcopy(network).requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        reshard = getattr(self.module, "reshard", None)
        if reshard is not None:
            # Sharded (FSDP2) copy: a forward (validation samples) leaves its root gathered.
            reshard()
        self.updates += 1
        n = float(self.updates)
        # Early on the average would be dominated by the random init; ramp the decay up.
        decay = min(self.decay, (1 + n) / (10 + n))
        # Under FSDP2 and ZeRO-3 both are sharded alike, so averaging each rank's own shards
        # averages the whole.
        ema_params = [local_shard(p) for p in self.module.parameters()]
        params = [local_shard(p).detach() for p in network.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        # Buffers (codebook usage counters, ...) are copied: they are state, not weights.
        for e, b in zip(self.module.buffers(), network.buffers()):
            e.copy_(b)

