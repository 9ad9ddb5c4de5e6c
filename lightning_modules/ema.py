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
        _refresh_gathered_copies(list(self.module.parameters()))
        # Buffers (codebook usage counters, ...) are copied: they are state, not weights.
        for e, b in zip(self.module.buffers(), network.buffers()):
            e.copy_(b)



@torch.no_grad()
def _refresh_gathered_copies(params: list[nn.Parameter]) -> None:
    """ZeRO-3 keeps its small ("persistent") parameters gathered between steps, and a forward
    computes with that whole copy, not with the partition the update above wrote: rebuild each
    whole copy from every rank's partition, so a forward through the EMA sees this step's average.
    A collective: every rank holds the same parameters gathered, since all ranks run the same
    steps and forwards."""
    held = [p for p in params if hasattr(p, "ds_tensor") and p.ds_numel > 0 and p.data.numel() == p.ds_numel]
    by_group: dict[int, list[nn.Parameter]] = {}
    for p in held:
        by_group.setdefault(id(p.ds_process_group), []).append(p)
    for group_params in by_group.values():
        import torch.distributed as dist

        group = group_params[0].ds_process_group
        device = group_params[0].data.device
        # One all-gather per process group: every rank's partitions of all these parameters.
        flat = torch.cat([p.ds_tensor.reshape(-1) for p in group_params]).to(device)
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, flat, group=group)
        offset = 0
        for p in group_params:
            size = p.ds_tensor.numel()
            whole = torch.cat([part[offset:offset + size] for part in parts])[:p.ds_numel]
            p.data.copy_(whole.view_as(p.data))
            offset += size
