"""A tiny LightningModule over video batches, for exercising the data pipeline through the CLI.

It records which samples each step saw (per rank, as JSON lines) so tests can compare streams
across runs, resumes and ranks.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from einops import reduce


class TinyVideoModel(pl.LightningModule):
    """Predicts each clip's mean colour from its first frame; logs the keys it was fed."""

    def __init__(self, record_dir: Optional[str] = None, lr: float = 1e-2) -> None:
        """
        Args:
            record_dir: Where to write per-rank JSONL records of the samples seen.
            lr: SGD learning rate.
        """
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(3, 3)

    def _record(self, stage: str, batch: dict[str, Any], loss: torch.Tensor) -> None:
        # The env var wins because LightningCLI restores hparams from a resumed checkpoint.
        record_dir = os.environ.get("MASKVID_RECORD_DIR") or self.hparams.record_dir
        if not record_dir:
            return
        os.makedirs(record_dir, exist_ok=True)
        path = os.path.join(record_dir, f"{stage}-rank{self.global_rank}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps({"step": self.global_step, "keys": batch["meta"]["key"], "loss": loss.item()}) + "\n")

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        video = batch["video"]
        first = reduce(video[:, :, 0], "b c h w -> b c", "mean")
        target = reduce(video, "b c t h w -> b c", "mean")
        return torch.nn.functional.mse_loss(self.net(first), target)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self._record("train", batch, loss)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self._loss(batch)
        self._record("val", batch, loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
