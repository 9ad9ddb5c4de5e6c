"""Preemption: checkpoint on SLURM's warning signal, requeue, and resume with the same command.

The scheme (one, documented in docs/distributed.md):
- sbatch templates ask for `--signal=USR1@90` and run `maskvid fit ... --ckpt_path auto`.
- `SlurmRequeue` replaces Lightning's USR1 handler. Lightning's saves from inside the signal
  handler, at whatever point each rank happens to be; with sharded strategies that is a collective
  started at different places on different ranks. Here (launch/preemption.py) the handler only
  sets a flag; at the next batch boundary every rank agrees on it (one all-reduce), saves
  `requeue-step=N.ckpt` together (a sharded directory under FSDP2/DeepSpeed) and the run stops
  cleanly; the sbatch body (launch/slurm/srun_fit.sh) then runs `scontrol requeue` (rank 0 does it
  itself when started some other way inside a SLURM job).
- `--ckpt_path auto` resumes from the newest complete checkpoint under the run's
  `default_root_dir` and checkpoint directories (requeue, SIGTERM, last or periodic), or starts
  fresh when there is none. Candidates are verified newest first (maskvid.checkpoint_files.verify_checkpoint):
  a partial or corrupt one is skipped with a warning naming it, and the previous complete one is
  taken. The requeued job runs the identical command and continues.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from maskvid.launch.checkpoint_io import BACKUP_SUFFIX
from maskvid.checkpoint_files import CheckpointFormatError, verify_checkpoint
from maskvid.launch.preemption import SignalCheckpoint

log = logging.getLogger("maskvid.requeue")

REQUEUE_PREFIX = "requeue-step="
# Set by launch/slurm/srun_fit.sh: rank 0 writes this file instead of requeueing itself.
REQUEUE_FILE_ENV = "MASKVID_REQUEUE_FILE"


class SlurmRequeue(SignalCheckpoint):
    """On `signum` (SLURM's `--signal=USR1@T`): checkpoint at the next step, requeue, stop."""

    prefix = REQUEUE_PREFIX
    what = "preemption signal"

    def __init__(self, signum: int = signal.SIGUSR1, requeue: bool = True) -> None:
        """
        Args:
            signum: The signal SLURM sends before the time limit (`#SBATCH --signal=USR1@90`).
            requeue: Run `scontrol requeue $SLURM_JOB_ID` after saving (only inside a SLURM job).
        """
        super().__init__(signum)
        self.requeue = requeue

    def after_save(self, trainer: Trainer, path: Path) -> None:
        if not trainer.is_global_zero:
            return
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
        marker = os.environ.get(REQUEUE_FILE_ENV)
        if self.requeue and marker:
            # launch/slurm/srun_fit.sh requeues once every rank has exited cleanly: a requeue
            # from here would have SLURM kill the ranks while they are still shutting down.
            Path(marker).write_text(f"{job}\n")
            print(f"maskvid: requeue requested ({marker})", flush=True)
        elif self.requeue and job:
            try:
                result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            except OSError as exc:  # no scontrol on this node: the checkpoint is saved, say what to run
                print(f"maskvid: could not requeue job {job} ({exc}); the checkpoint {path} is saved: "
                      f"run `scontrol requeue {job}` or resubmit with --ckpt_path auto", flush=True)
                return
            print(f"maskvid: scontrol requeue {job}: exit {result.returncode} {result.stderr.strip()}", flush=True)


def _mtime(path: Path) -> float:
    if path.is_file():
        return path.stat().st_mtime
    return max((p.stat().st_mtime for p in path.rglob("*") if p.is_file()), default=0.0)


def _candidates(root: Path) -> set[Path]:
    found = set()
    for path in root.rglob("*.ckpt"):
        # Files inside a sharded checkpoint directory (or its staging copy) are not checkpoints.
        inside = path.relative_to(root).parts[:-1]
        if not any(part.endswith(".ckpt") or ".ckpt." in part for part in inside):
            found.add(path)
    # A kill between the two renames of a sharded save leaves only the previous copy, stepped
    # aside as `.NAME.old` (launch/checkpoint_io.py): it is complete, so it counts.
    for backup in root.rglob(f".*.ckpt{BACKUP_SUFFIX}"):
        if not backup.with_name(backup.name[1 : -len(BACKUP_SUFFIX)]).exists():
            found.add(backup)
    return found


def find_resume_checkpoint(trainer: Trainer) -> str | None:
    """The newest complete checkpoint of this run, or None (a fresh start)."""
    roots = {Path(trainer.default_root_dir)}
    roots |= {Path(cb.dirpath) for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath}
    found: set[Path] = set()
    for root in roots:
        if root.is_dir():
            found |= _candidates(root)
    for path in sorted(found, key=_mtime, reverse=True):
        try:
            return str(verify_checkpoint(path))
        except CheckpointFormatError as exc:
            if getattr(trainer, "is_global_zero", True):
                log.warning("skipping %s", exc)
                print(f"maskvid: --ckpt_path auto: skipping {path}: {getattr(exc, 'reason', exc)}", flush=True)
    return None
