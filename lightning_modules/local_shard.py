"""This rank's part of a possibly sharded tensor, for code that works shard by shard."""

from __future__ import annotations

import torch


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """An FSDP2 DTensor's local shard, a DeepSpeed ZeRO-3 parameter's partition, else `t` itself.

    Call it before `detach`: a detached ZeRO-3 parameter loses its partition."""
    to_local = getattr(t, "to_local", None)  # DTensor
    if to_local is not None:
        return to_local()
    partition = getattr(t, "ds_tensor", None)  # ZeRO-3
    return partition if partition is not None else t
