"""Skip steps with a non-finite loss or gradient, stop after too many, never save a broken model.

One bad batch (an overflow, a degenerate clip) must not end a run that has trained for a week,
and must not poison the weights either. So before every optimizer step:

- the loss of the backward just run and every local gradient shard are checked for NaN/Inf, and
  all ranks agree (one all-reduce of a flag; under DDP a NaN on one rank has reached every rank's
  gradients anyway, under FSDP2 each rank holds only its own shards);
- a bad step drops every gradient, so the optimizer skips all parameters: weights and optimizer
  state stay as they were (a skipped step still counts as a step, like a no-op update);
- skipped steps are counted in `train/skipped_steps` (kept in checkpoints), and
  `max_consecutive` bad steps in a row stop the run with NonFiniteError;
- a checkpoint whose weights are not all finite is refused with NonFiniteError, so the last one
  written stays the last good one.

Works with automatic and manual optimization (the GAN tokenizer's two optimizers are checked each
at its own step). Under DeepSpeed the engine owns the (partitioned) gradients: there a non-finite
loss is still counted and stops the run, but the engine's step is not skipped.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from maskvid.lightning_modules.local_shard import local_shard

log = logging.getLogger("maskvid.nonfinite")


class NonFiniteError(RuntimeError):
    """Training produced non-finite values it cannot step past."""

    # Every rank agrees before raising it, so the CLI reports it once (rank 0).
    raised_on_every_rank = True


def _all_finite(tensors) -> torch.Tensor:
    """One bool tensor: every float tensor's local part is finite (one host sync per device).

    Checked through one fp32 sum per tensor: NaN and inf propagate through a sum, and a sum is a
    single read with no temporaries, where `isfinite(t).all()` writes a bool copy of every gradient
    first. A finite gradient whose sum
    overflows fp32 (|sum| > 3e38) also reads as non-finite: such a step is broken anyway."""
    per_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None and t.is_floating_point():
            local = local_shard(t).detach()
            per_device.setdefault(local.device, []).append(torch.sum(local, dtype=torch.float32))
    results = [torch.isfinite(torch.stack(sums)).all().cpu() for sums in per_device.values()]
    return torch.stack(results).all() if results else torch.tensor(True)


def _agree(trainer: Trainer, bad: torch.Tensor) -> bool:
    """True when any rank saw a bad value."""
    flag = bad.to(dtype=torch.float32, device=trainer.strategy.root_device)
    if trainer.world_size > 1:
        flag = trainer.strategy.reduce(flag, reduce_op="sum")
    return bool(flag.item() > 0)


class NonFiniteGuard(Callback):
    """Skips and counts optimizer steps with a NaN/Inf loss or gradient; stops after
    `max_consecutive` in a row; refuses to checkpoint non-finite weights."""

    def __init__(self, max_consecutive: int = 10) -> None:
        """
        Args:
            max_consecutive: Training steps in a row with a non-finite loss or gradient after
                which the run stops with an error (the weights are then still the last good ones).
        """
        if max_consecutive < 1:
            raise ValueError(f"NonFiniteGuard max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0  # steps skipped over the whole run (restored on resume)
        self.consecutive = 0
        self._loss_finite: torch.Tensor | None = None  # over the backwards since the last step
        self._batch_bad = False

    # -- detection ------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_bad = False

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        # Kept as a tensor: turning it into a bool here would add a device sync per backward.
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        device = trainer.strategy.root_device
        params = [p for group in optimizer.param_groups for p in group["params"]]
        finite = _all_finite(p.grad for p in params).to(device)
        if self._loss_finite is not None:
            finite = finite & self._loss_finite.to(device)
        self._loss_finite = None
        if not _agree(trainer, ~finite):
            return
        # No gradient: the optimizer leaves every parameter and its state untouched.
        for p in params:
            p.grad = None
        self._batch_bad = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step - 1  # the step just taken
        if self._batch_bad:
            self.skipped += 1
            self.consecutive += 1
            if trainer.is_global_zero:
                log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row, %d in all)",
                            step, self.consecutive, self.skipped)
        else:
            self.consecutive = 0
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, sync_dist=False)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} training steps in a row (to step {step}) had a non-finite loss or gradient; "
                f"stopping with the last good weights (lower model.init_args.lr, check the data, or raise "
                f"NonFiniteGuard max_consecutive={self.max_consecutive})"
            )

    # -- checkpoints ----------------------------------------------------------------------------

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # Every rank runs this (Trainer.save_checkpoint dumps on all ranks), so it may all-reduce.
        tensors = [*pl_module.parameters(), *pl_module.buffers()]
        finite = _all_finite(tensors)
        if not _agree(trainer, ~finite):
            return
        bad = next((name for name, t in [*pl_module.named_parameters(), *pl_module.named_buffers()]
                    if t.is_floating_point() and not bool(torch.isfinite(local_shard(t).detach()).all())), "(another rank's shard)")
        raise NonFiniteError(
            f"refusing to save a checkpoint at step {trainer.global_step}: {bad} holds NaN/Inf; "
            "the last checkpoint written is the last good one"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
