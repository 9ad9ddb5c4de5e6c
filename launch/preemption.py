"""Checkpoint and stop cleanly on a signal: the mechanics behind SLURM requeue and SIGTERM.

A signal handler only sets a flag. Saving from inside the handler (what Lightning does) would start
a checkpoint's collectives wherever each rank happens to be, which deadlocks sharded saves. At the
next batch boundary every rank agrees on the flag (one all-reduce, so a signal that reached one
rank is enough), saves `{prefix}{step}.ckpt` in `default_root_dir` together (a sharded directory
under FSDP2/DeepSpeed) and the run stops as if it had finished; `--ckpt_path auto` resumes there.

- `SlurmRequeue` (launch/requeue.py): SIGUSR1, SLURM's time-limit warning, then requeue.
- `TerminationCheckpoint`: SIGTERM outside SLURM (Kubernetes pod eviction, spot-instance
  reclaim, `docker stop`, systemd): save and exit with status 0 within the grace period.

DataLoader workers ignore both signals (datamodules/loader.py), so a signal sent to the whole
process group does not kill the workers before the main process has saved. A signal that reaches a
rank late (after the others agreed to stop, during the save or the shutdown), or again, leaves its
exit status 0 (tests/test_faults_sharded.py).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

log = logging.getLogger("maskvid.preemption")


class SignalCheckpoint(Callback):
    """On `signum`: at the next batch boundary every rank saves `{prefix}{step}.ckpt`, then stop."""

    prefix = "signal-step="
    what = "signal"

    def __init__(self, signum: int) -> None:
        """
        Args:
            signum: The signal to checkpoint and stop on.
        """
        self.signum = signum
        self.requested = False
        self.saved: Path | None = None

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        # Only a flag: saving here would start collectives at a different point on each rank.
        self.requested = True

    def setup(self, trainer: Trainer, pl_module, stage: str) -> None:
        # Before Lightning records the handlers it puts back at its teardown: a signal that
        # reaches a rank late, while it shuts down after the save, then only sets the flag
        # instead of killing it (the default action) with a nonzero exit status.
        if stage == "fit":
            signal.signal(self.signum, self._handler)

    def on_train_start(self, trainer: Trainer, pl_module) -> None:
        # After Lightning registered its own handlers (in Trainer._run), so this one wins.
        signal.signal(self.signum, self._handler)

    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx) -> None:
        flag = torch.tensor(int(self.requested), device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="sum")
        if int(flag) == 0:
            return
        self.requested = True  # on every rank, whichever of them got the signal
        path = Path(trainer.default_root_dir) / f"{self.prefix}{trainer.global_step}.ckpt"
        path = Path(trainer.strategy.broadcast(str(path)))
        trainer.save_checkpoint(path)
        self.saved = path
        if trainer.is_global_zero:
            log.warning("%s: saved %s", self.what, path)
            print(f"maskvid: {self.what}: saved {path}", flush=True)
        self.after_save(trainer, path)
        trainer.should_stop = True

    def teardown(self, trainer: Trainer, pl_module, stage: str) -> None:
        if self.requested:
            # Saved and stopping: a repeated or late signal must not turn the clean exit into a
            # kill. Ignored rather than flagged, because Python puts back the default action of
            # its own handlers when the interpreter finalizes, before the process is gone.
            signal.signal(self.signum, signal.SIG_IGN)

    def after_save(self, trainer: Trainer, path: Path) -> None:
        """What to do once the checkpoint is written (every rank), before the run stops."""


class TerminationCheckpoint(SignalCheckpoint):
    """SIGTERM (outside SLURM): checkpoint at the next step and exit cleanly (status 0)."""

    prefix = "sigterm-step="
    what = "SIGTERM"

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        """
        Args:
            signum: The termination signal the platform sends before it kills the process
                (SIGTERM on Kubernetes, spot instances, docker stop and systemd).
        """
        super().__init__(signum)

    def after_save(self, trainer: Trainer, path: Path) -> None:
        if trainer.is_global_zero:
            print("maskvid: stopping cleanly; rerun the same command with --ckpt_path auto to resume", flush=True)
