"""ModelCheckpoint that also writes `last` when training stops between periodic saves.

Lightning's ModelCheckpoint writes `last.ckpt` only next to a periodic save. A run stopped by
`trainer.max_time` (every time-budgeted run: the demo, the benchmarks) or by `should_stop` ends
between two saves, so `last.ckpt` silently lags by up to `every_n_train_steps` steps and whatever
reads it next (generate, the next stage) gets an older model than the one that finished.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (same options) whose `last` checkpoint is also written when training ends,
    if the final step has not been saved yet."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not self.save_last or trainer.fast_dev_run or trainer.sanity_checking:
            return
        if self._last_global_step_saved >= trainer.global_step:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
