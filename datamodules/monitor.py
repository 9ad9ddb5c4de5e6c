"""Logs data health (`data/skipped`, `data/val_skipped`) so bad shards show up on the dashboard."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch


class DataMonitor(pl.Callback):
    """Logs bad samples skipped by the train stream (all ranks summed) and by the val stream."""

    def __init__(self) -> None:
        self._val_skipped: dict[int, int] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        skipped = getattr(trainer.datamodule, "skipped", None)
        if skipped is None or trainer.global_step % max(1, trainer.log_every_n_steps) != 0:
            return
        pl_module.log("data/skipped", torch.tensor(float(skipped)), reduce_fx="sum", sync_dist=True, on_step=True, on_epoch=False)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_skipped = {}

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        meta = batch.get("meta", {}) if isinstance(batch, dict) else {}
        if "worker" in meta and "skipped" in meta:
            self._val_skipped[int(meta["worker"])] = int(meta["skipped"])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        total = torch.tensor(float(sum(self._val_skipped.values())))
        pl_module.log("data/val_skipped", total, reduce_fx="sum", sync_dist=True)
