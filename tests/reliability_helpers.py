"""Fault injection and recording for tests/test_reliability*.py, loaded into real `maskvid fit`
runs with `--trainer.callbacks+=tests.reliability_helpers.NAME`.

- `StepLog`: every rank appends {rank, step, loss, ...} per training step to a JSONL file as soon as
  the step ends (flushed), so a test can watch a run's progress, kill it mid-flight, and compare
  losses to 1e-6 (CSVLogger buffers rows, and a killed run loses them).
- `InjectFaults`: real non-finite values at chosen steps and ranks: a NaN forward output (so a NaN
  loss), an Inf gradient (a tensor hook), a NaN weight.

`python -m tests.reliability_helpers write-forever-{file,dcp} DIR` saves ever newer checkpoints
through the atomic writers until killed (the kill-during-write test).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import Callback

STEP_LOG_ENV = "MASKVID_TEST_STEP_LOG"


def _floats(metrics: dict, keys: tuple[str, ...]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in keys if k in metrics}


class StepLog(Callback):
    """Appends one JSON line per training step and rank to $MASKVID_TEST_STEP_LOG/rank{N}.jsonl."""

    def __init__(self, keys: tuple[str, ...] = ("train/g_loss", "train/logits_fake", "train/skipped_steps")) -> None:
        """
        Args:
            keys: Logged metrics recorded besides the loss.
        """
        self.keys = keys

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        directory = os.environ.get(STEP_LOG_ENV)
        if not directory:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        checksum = sum(float(p.detach().double().sum()) for p in pl_module.parameters() if p.requires_grad)
        row = {"rank": trainer.global_rank, "step": self._step, "loss": float(loss), "checksum": checksum,
               "pid": os.getpid(), **_floats(trainer.callback_metrics, self.keys)}
        Path(directory).mkdir(parents=True, exist_ok=True)
        with open(Path(directory) / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def read_step_log(directory: Path, rank: int = 0) -> list[dict]:
    path = Path(directory) / f"rank{rank}.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # the last line of a killed run may be cut
            pass
    return rows


def _steps(spec: Optional[str]) -> dict[int, Optional[int]]:
    """'3,5@1' -> {3: None, 5: 1}: steps, each on every rank or on one."""
    out: dict[int, Optional[int]] = {}
    for part in (spec or "").split(","):
        if part.strip():
            step, _, rank = part.partition("@")
            out[int(step)] = int(rank) if rank else None
    return out


class InjectFaults(Callback):
    """Real non-finite values at the given steps ('S' on every rank, 'S@R' on rank R only)."""

    def __init__(self, nan_loss: Optional[str] = None, inf_grad: Optional[str] = None,
                 nan_weight: Optional[str] = None) -> None:
        """
        Args:
            nan_loss: Steps whose first network's forward output is multiplied by NaN.
            inf_grad: Steps at which one weight's gradient becomes Inf (tensor hook).
            nan_weight: Steps before which one trainable weight is overwritten with NaN.
        """
        self.nan_loss, self.inf_grad, self.nan_weight = _steps(nan_loss), _steps(inf_grad), _steps(nan_weight)
        self._hooks = []

    @staticmethod
    def _hits(table: dict[int, Optional[int]], step: int, rank: int) -> bool:
        return step in table and table[step] in (None, rank)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        step, rank = trainer.global_step, trainer.global_rank
        network = next(n for n in pl_module.parallel_networks() if n is not None)
        weight = next(p for p in network.parameters() if p.requires_grad and p.ndim >= 2)
        if self._hits(self.nan_loss, step, rank):
            self._hooks.append(network.register_forward_hook(_poison_output))
        if self._hits(self.inf_grad, step, rank):
            self._hooks.append(weight.register_hook(lambda g: torch.full_like(g, float("inf"))))
        if self._hits(self.nan_weight, step, rank):
            with torch.no_grad():
                weight.fill_(float("nan"))


def _poison_output(module, inputs, out):
    if isinstance(out, tuple):
        return (out[0] * float("nan"), *out[1:])
    return out * float("nan")


class _OneProcess:
    """What save_directory_atomically needs of a strategy, for one process."""

    is_global_zero = True

    def broadcast(self, obj):
        return obj

    def barrier(self, name=None):
        pass


def _write_forever(directory: Path, layout: str) -> None:
    """Save ever newer checkpoints to DIR/last.ckpt (a file, or a DCP directory) until killed;
    DIR/committed names the last version whose save returned."""
    import torch.distributed.checkpoint as dcp

    from maskvid.launch.checkpoint_io import AtomicCheckpointIO, save_directory_atomically

    io = AtomicCheckpointIO()
    weights = torch.randn(16, 1024, 1024)  # 64 MiB: each write takes a while
    version = 0
    while True:
        version += 1
        weights[0, 0, 0] = version
        state = {"version": torch.tensor(version), "weights": weights}
        if layout == "file":
            io.save_checkpoint({"version": version, "weights": weights}, directory / "last.ckpt")
        else:
            save_directory_atomically(_OneProcess(), directory / "last.ckpt",
                                      lambda staging: dcp.save(state, checkpoint_id=str(staging), no_dist=True))
        (directory / "committed").write_text(str(version))


if __name__ == "__main__":
    mode, _, layout = sys.argv[1].rpartition("-")
    if mode == "write-forever":
        _write_forever(Path(sys.argv[2]), layout)
