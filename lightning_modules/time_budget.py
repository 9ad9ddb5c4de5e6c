"""End the learning-rate schedule within trainer.max_time instead of being cut off by it.

`trainer.max_time` stops a fit wherever it happens to be. With a warmup + cosine schedule sized to
`max_steps`, a slower machine than the one the steps were sized on is then stopped part-way, at a
high learning rate, and the weights it ends with are worse than a shorter but complete schedule
would give. This callback measures the fit's own pace (wall time per step since it started,
validation and checkpoints included) every `check_every` steps, and when `max_steps` would not be
reached in the time left it lowers `max_steps` to what fits, and shortens the schedule with it: the
learning rate then decays to its floor by the end of the budget. It only ever shortens.

It does nothing without max_time. The shortened length is kept in checkpoints: a resumed fit
continues the same schedule, unless it was restarted with a different max_steps (then that wins).
How many steps fit depends on the machine's speed, so a budgeted fit is not bit-reproducible
across machines; with no max_time, or a budget that max_steps fits in, nothing changes.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Timer

log = logging.getLogger("maskvid.time_budget")


class FitScheduleToTime(Callback):
    def __init__(self, first_check: int = 50, check_every: int = 100, margin: float = 0.97) -> None:
        """
        Args:
            first_check: Steps this run takes before the first estimate (the first steps also
                build kernels and fill caches, so they overstate the pace).
            check_every: Re-estimate every this many steps after that; a machine that slows down
                later (load from other jobs, validation) shortens the schedule again.
            margin: Fraction of the remaining time the steps are planned to fill; the rest absorbs
                noise and the final validation and checkpoint.
        """
        if first_check < 1 or check_every < 1:
            raise ValueError(f"first_check and check_every must be >= 1, got {first_check} and {check_every}")
        if not 0.0 < margin <= 1.0:
            raise ValueError(f"margin must be in (0, 1], got {margin}")
        self.first_check = first_check
        self.check_every = check_every
        self.margin = margin
        self.original_max_steps: Optional[int] = None  # the max_steps the fit was started with
        self.max_steps: Optional[int] = None  # what it was lowered to, if it was
        self._start: tuple[float, int] | None = None

    # -- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"original_max_steps": self.original_max_steps, "max_steps": self.max_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_max_steps = state_dict.get("original_max_steps")
        self.max_steps = state_dict.get("max_steps")

    # -- hooks ---------------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.max_steps is not None:
            if trainer.max_steps == self.original_max_steps:
                # Resumed: continue the schedule the interrupted run had shortened.
                self._apply(trainer, self.max_steps)
            else:
                log.info("max_steps changed from %s to %s since the schedule was fitted to the time budget: "
                         "using %s", self.original_max_steps, trainer.max_steps, trainer.max_steps)
                self.max_steps = None
        if self.max_steps is None:  # not resuming a shortened schedule
            self.original_max_steps = trainer.max_steps
        self._start = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if self._start is None or trainer.max_steps is None or trainer.max_steps < 0:
            return
        started, start_step = self._start
        done = trainer.global_step - start_step
        if done < self.first_check or (done - self.first_check) % self.check_every:
            return
        timer = _timer(trainer)  # looked up on check steps only: this hook runs every batch
        if timer is None:
            return
        pace = (time.monotonic() - started) / done  # seconds per step, everything included
        remaining = max(0.0, timer.time_remaining() or 0.0)
        affordable = trainer.global_step + int(self.margin * remaining / pace)
        # Every rank must stop at the same step: rank 0's measurement decides.
        affordable = trainer.strategy.broadcast(affordable, src=0)
        if affordable >= trainer.max_steps:
            return
        new = max(affordable, trainer.global_step + 1)
        log.warning("at step %d a step takes %.3f s and %.0f s of max_time are left: max_steps %d -> %d, "
                    "so the learning-rate schedule ends within the budget", trainer.global_step, pace, remaining,
                    trainer.max_steps, new)
        self.max_steps = new
        self._apply(trainer, new)

    # -- helpers -------------------------------------------------------------------------------------

    @staticmethod
    def _apply(trainer: Trainer, max_steps: int) -> None:
        trainer.fit_loop.epoch_loop.max_steps = max_steps
        for config in trainer.lr_scheduler_configs:
            for fn in getattr(config.scheduler, "lr_lambdas", []):
                # Schedules from maskvid.lightning_modules.schedules read their length from this attribute.
                if hasattr(fn, "total_steps"):
                    fn.total_steps = max_steps
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # every one: the CSV beside TensorBoard too
                logger.log_metrics({"train/max_steps": float(max_steps)}, step=trainer.global_step)


def _timer(trainer: Trainer) -> Optional[Timer]:
    """The trainer's max_time Timer, if max_time was set."""
    for callback in trainer.callbacks:
        if isinstance(callback, Timer) and callback.time_remaining() is not None:
            return callback
    return None
