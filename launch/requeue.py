"""Preemption: checkpoint on SLURM's warning signal, requeue, and resume with the same command.

The scheme (one, documented in the README):
- sbatch templates ask for `--signal=USR1@90` and run `maskvid fit ... --ckpt_path auto`.
- `SlurmRequeue` replaces Lightning's USR1 handler. Lightning's saves from inside the signal
  handler, at whatever point each rank happens to be; with sharded strategies that is a collective
  started at different places on different ranks. Here the handler only sets a flag; at the next
  batch boundary every rank agrees on it (one all-reduce), saves `requeue-step=N.ckpt` together
  (a sharded directory under FSDP2/DeepSpeed) and the run stops cleanly; the sbatch body
  (launch/slurm/srun_fit.sh) then runs `scontrol requeue` (rank 0 does it itself when started
  some other way inside a SLURM job).
- `--ckpt_path auto` resumes from the newest complete checkpoint under the run's
  `default_root_dir` and checkpoint directories (requeue, last or periodic), or starts fresh when
  there is none. The requeued job runs the identical command and continues.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger("maskvid.requeue")

REQUEUE_PREFIX = "requeue-step="
# Set by launch/slurm/srun_fit.sh: rank 0 writes this file instead of requeueing itself.
REQUEUE_FILE_ENV = "MASKVID_REQUEUE_FILE"


class SlurmRequeue(Callback):
    """On `signum` (SLURM's `--signal=USR1@T`): checkpoint at the next step, requeue, stop."""

    def __init__(self, signum: int = signal.SIGUSR1, requeue: bool = True) -> None:
        """
        Args:
            signum: The signal SLURM sends before the time limit (`#SBATCH --signal=USR1@90`).
            requeue: Run `scontrol requeue $SLURM_JOB_ID` after saving (only inside a SLURM job).
        """
        self.signum = signum
        self.requeue = requeue
        self.requested = False
        self.saved: Path | None = None

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        # Only a flag: saving here would start collectives at a different point on each rank.
        self.requested = True

    def on_train_start(self, trainer: Trainer, pl_module) -> None:
        # After Lightning registered its own handler (in Trainer._run), so this one wins.
        signal.signal(self.signum, self._handler)

    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx) -> None:
        flag = torch.tensor(int(self.requested), device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="sum")
        if int(flag) == 0:
            return
        path = Path(trainer.default_root_dir) / f"{REQUEUE_PREFIX}{trainer.global_step}.ckpt"
        path = Path(trainer.strategy.broadcast(str(path)))
        trainer.save_checkpoint(path)
        self.saved = path
        if trainer.is_global_zero:
            log.warning("preemption signal: saved %s", path)
            print(f"maskvid: preemption signal: saved {path}", flush=True)
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
            marker = os.environ.get(REQUEUE_FILE_ENV)
            if self.requeue and marker:
                # launch/slurm/srun_fit.sh requeues once every rank has exited cleanly: a requeue
                # from here would have SLURM kill the ranks while they are still shutting down.
                Path(marker).write_text(f"{job}\n")
                print(f"maskvid: requeue requested ({marker})", flush=True)
            elif self.requeue and job:
                result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                print(f"maskvid: scontrol requeue {job}: exit {result.returncode} {result.stderr.strip()}", flush=True)
        trainer.should_stop = True


def _complete(path: Path) -> bool:
    """A checkpoint that finished writing: a file, a DCP directory with its metadata, or a
    DeepSpeed directory with its `latest` tag."""
    if path.is_file():
        return path.stat().st_size > 0
    if path.is_dir():
        return (path / "meta.pt").is_file() and (path / ".metadata").is_file() or (path / "latest").is_file()
    return False


def _mtime(path: Path) -> float:
    if path.is_file():
        return path.stat().st_mtime
    return max((p.stat().st_mtime for p in path.rglob("*") if p.is_file()), default=0.0)


def find_resume_checkpoint(trainer: Trainer) -> str | None:
    """The newest complete checkpoint of this run, or None (a fresh start)."""
    roots = {Path(trainer.default_root_dir)}
    roots |= {Path(cb.dirpath) for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath}
    found: set[Path] = set()
    for root in roots:
        if not root.is_dir():
            continue
        for path in root.rglob("*.ckpt"):
            # Files inside a sharded checkpoint directory are not checkpoints themselves.
            if not any(parent.suffix == ".ckpt" for parent in path.parents) and _complete(path):
                found.add(path)
    if not found:
        return None
    return str(max(found, key=_mtime))
