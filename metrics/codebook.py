"""Codebook usage as a torchmetrics Metric: which codes a set of videos uses, across ranks."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class CodebookUsage(Metric):
    """Accumulates a code histogram; `compute()` gives usage (fraction of codes used) and
    perplexity (exp of the code entropy: the number of equally used codes it amounts to)."""

    full_state_update = False

    def __init__(self, codebook_size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.codebook_size = codebook_size
        self.add_state("counts", default=torch.zeros(codebook_size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, indices: torch.Tensor) -> None:
        flat = indices.flatten().long()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.codebook_size):
            raise ValueError(f"code index out of range [0, {self.codebook_size})")
        self.counts += torch.bincount(flat, minlength=self.codebook_size).to(self.counts)

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.counts.sum().clamp(min=1)
        probs = self.counts / total
        entropy = -(probs * torch.log(probs.clamp(min=1e-30))).sum()
        return {"usage": (self.counts > 0).double().mean(), "perplexity": entropy.exp()}
