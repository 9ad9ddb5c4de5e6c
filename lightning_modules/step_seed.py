"""The global RNGs as a function of (seed, rank, step), so a resumed run draws what the
uninterrupted one drew.

Anything in a training step that uses torch's, numpy's or Python's global generator (dead-code
restarts in the quantizer, dropout, user code) would otherwise continue from whatever state the
new process starts in. Saving RNG states does not work under sharded checkpoints, where Lightning
keeps only rank 0's non-tensor state; deriving them does, at any world size. The base seed is
stored in checkpoints, so a resume keeps it even when the command line does not fix one.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed, decorrelated across (seed, rank, step)."""
    return int(np.random.SeedSequence([seed, rank, step, 0x5EED]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class StepSeed(Callback):
    """Reseeds torch, numpy and random before every training batch from (seed, rank, step)."""

    def __init__(self, seed: int | None = None) -> None:
        """
        Args:
            seed: Base seed; null takes the run's `seed_everything` (PL_GLOBAL_SEED), else 0.
        """
        self.seed = seed

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.seed is None:  # a checkpoint's value (load_state_dict) came first if resuming
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        value = step_seed(int(self.seed or 0), trainer.global_rank, trainer.global_step)
        torch.manual_seed(value)  # every device's generator too
        np.random.seed(value % 2**32)
        random.seed(value)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])
