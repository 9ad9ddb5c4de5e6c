"""Checkpoints that are either complete or absent: atomic writes, verified reads.

A run killed while it writes a checkpoint must not leave `last.ckpt` (or any name a resume would
pick) pointing at half a file. So every checkpoint is written under a hidden staging name in the
same directory, flushed, and renamed into place:

- single files (`AtomicCheckpointIO`, the CheckpointIO of every maskvid run): `.NAME.partial-PID`,
  fsync, `os.replace`. Lightning's own writer stages in the system temp directory, which on most
  clusters is another filesystem, where its final "rename" is a copy that a kill can cut short.
- sharded directories (FSDP2 DCP, DeepSpeed; `save_directory_atomically`): every rank writes into
  `.NAME.partial`, then rank 0 swaps it in. A directory cannot be renamed over a non-empty one, so
  the old copy steps aside as `.NAME.old` for the instant between the two renames; auto-resume
  (launch/requeue.py) takes that copy if a kill lands exactly there.

Reads verify first (`maskvid.checkpoint_files.verify_checkpoint`) and fail with one line naming the
file, and unpickle with `weights_only=True`.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from maskvid.checkpoint_files import CheckpointFormatError, verify_checkpoint

STAGING_SUFFIX = ".partial"
BACKUP_SUFFIX = ".old"


def _fsync_dir(directory: Path) -> None:
    # The rename itself must reach the disk, not only the file's bytes.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def staging_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{STAGING_SUFFIX}")


def backup_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{BACKUP_SUFFIX}")


def commit_directory(staging: Path, final: Path) -> None:
    """Put the finished `staging` directory at `final` (rank 0, once every rank has written)."""
    old = backup_path(final)
    _remove(old)
    if final.exists() or final.is_symlink():
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    _remove(old)


def save_directory_atomically(strategy, filepath: str | Path, write: Callable[[Path], None]) -> None:
    """Run `write(staging_dir)` on every rank, then rename the staging directory to `filepath`."""
    final = Path(strategy.broadcast(str(filepath)))
    staging = staging_path(final)
    if strategy.is_global_zero:
        _remove(staging)  # what a killed save left behind
        final.parent.mkdir(parents=True, exist_ok=True)
    strategy.barrier("maskvid-checkpoint-staging")
    write(staging)
    strategy.barrier("maskvid-checkpoint-written")
    if strategy.is_global_zero:
        commit_directory(staging, final)
    strategy.barrier("maskvid-checkpoint-committed")


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a staging file beside the target, fsync, rename; verified weights_only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        if "://" in str(path):  # object stores: fsspec's transaction is what they offer
            return super().save_checkpoint(checkpoint, path)
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}{STAGING_SUFFIX}-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)  # a sharded checkpoint of the same name (strategy changed)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            # Staging files of earlier writes to this name that a kill cut short.
            for stale in final.parent.glob(f".{final.name}{STAGING_SUFFIX}-*"):
                stale.unlink(missing_ok=True)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        if not Path(path).exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        verify_checkpoint(path)
        weights_only = True if weights_only is None else weights_only
        try:
            return torch.load(path, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as exc:
            raise refused_pickle(path, exc) from None


def refused_pickle(path, exc: pickle.UnpicklingError) -> CheckpointFormatError:
    """weights_only=True refused an object: a checkpoint maskvid wrote never holds one, so the file
    is foreign or hostile, and nothing in it was run."""
    first = str(exc).strip().splitlines()[0][:200]
    return CheckpointFormatError(f"checkpoint {path} holds pickled objects that weights_only=True refuses "
                                 f"({first}); maskvid never writes such objects")
