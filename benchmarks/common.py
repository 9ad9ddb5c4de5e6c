"""Shared measuring tools for the benchmarks: the machine's matmul roof, FLOP counts, peak memory,
and timing of real Lightning training steps."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def matmul_roof(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 7) -> float:
    """Dense square-matmul throughput in GFLOP/s (median of `repeats`): the machine's roof."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (MiB, Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepTimer:
    """A Lightning callback timing each training step, and counting one step's FLOPs.

    The FLOP count (torch.utils.flop_counter: matmuls, convolutions, attention) is taken on the
    step `flop_step`, which is excluded from the timings (counting slows it down).
    """

    def __init__(self, flop_step: int = 0, device: str = "cpu") -> None:
        from lightning.pytorch.callbacks import Callback
        from torch.utils.flop_counter import FlopCounterMode

        timer = self

        class _Callback(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == flop_step:
                    timer._counter = FlopCounterMode(display=False)
                    timer._counter.__enter__()
                _sync(device)
                timer._start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                _sync(device)
                elapsed = time.perf_counter() - timer._start
                if timer._counter is not None:
                    timer._counter.__exit__(None, None, None)
                    timer.flops = timer._counter.get_total_flops()
                    timer._counter = None
                else:
                    timer.times.append(elapsed)

        self.callback = _Callback()
        self.times: list[float] = []
        self.flops: int = 0
        self._counter = None
        self._start = 0.0

    def median(self, skip: int = 1) -> float:
        """Median step time, skipping the first `skip` timed steps (warmup)."""
        times = self.times[skip:] or self.times
        return statistics.median(times)


def fit_steps(module, batch: dict, steps: int, device: str = "cpu", precision: str = "32-true", flop_step: int = 0) -> StepTimer:
    """Run `steps` real training steps of `module` on copies of `batch`; returns the timer."""
    from lightning.pytorch import Trainer

    timer = StepTimer(flop_step=flop_step, device=device)

    class Repeat(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield batch

    loader = torch.utils.data.DataLoader(Repeat(), batch_size=None)
    trainer = Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer.callback],
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    return timer
