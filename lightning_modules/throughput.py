"""TrainingThroughput: clips/s, tokens/s, achieved FLOP/s and MFU, logged during `fit`.

FLOPs per batch are counted once, on the first training batch, by torch.utils.flop_counter over
the whole step as it really runs (forward, backward, frozen tokenizer and text encoder included),
per device: under FSDP2 the gathered weights' matmuls, under DDP the local batch. Compiled blocks
run eagerly for that one step, because compiled kernels bypass the counter. The first step is
then left out of the timing, and the rates are averages over the last `window` steps of wall time
between consecutive batch ends (data loading included; validation excluded).

Logged under `throughput/` on every step:
- clips_per_sec, tokens_per_sec: all ranks together (per-device rate x world size); tokens are
  those of the token grid, so tokens_per_sec needs token batches or a module with a tokenizer.
- flops_per_sec: per device, flops_per_batch / mean step time.
- mfu: flops_per_sec / peak_flops, where the peak is `peak_flops` if given, else Lightning's table
  for the device and compute dtype (H100, H200, A100, ...: lightning.fabric.utilities.throughput);
  with neither (a CPU, an unlisted GPU) no MFU is logged.
- peak_flops: the peak used, so every MFU figure says what it is a fraction of.

The count is of what runs: with activation checkpointing it includes the recomputed forward, so
the ratio is then hardware rather than model FLOPs utilization.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

# The clock, read once per batch end (a module attribute, so tests can substitute a known one).
_clock = time.perf_counter


class _NoModuleTracker:
    """Stands in for FlopCounterMode's module tracker: every FLOP goes to "Global" alone."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def total_flop_counter():
    """torch's FLOP counter without its per-module breakdown: the module tracker's backward hooks
    make `torch.autograd.grad` on a leaf fail (the GAN tokenizer's R1 penalty), and only the total
    is wanted here."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracker()
    return counter


def tokens_per_clip(pl_module, batch: dict[str, Any]) -> int | None:
    """Video tokens one clip of `batch` stands for: the token grid of token-shard batches, or the
    module's tokenizer's grid for a video batch (uint8 [B,T,H,W,C] or float [B,C,T,H,W]); None
    for a module without a tokenizer."""
    if "tokens" in batch:
        return math.prod(batch["tokens"].shape[1:])
    if not hasattr(pl_module, "tokenizer") or "video" not in batch:
        return None
    video = batch["video"]
    frames, height, width = video.shape[1:4] if video.dtype == torch.uint8 else video.shape[2:5]
    return math.prod(pl_module.tokenizer.token_grid(int(frames), (int(height), int(width))))


def compute_dtype(trainer) -> torch.dtype:
    """The dtype matmuls run in: the FSDP2 strategy's parameter dtype, else the precision's."""
    param_dtype = getattr(trainer.strategy, "param_dtype", None)
    if param_dtype in ("bf16", "fp32"):
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[param_dtype]
    from lightning.fabric.utilities.throughput import _plugin_to_compute_dtype

    return _plugin_to_compute_dtype(trainer.precision_plugin)


class TrainingThroughput(Callback):
    """Logs throughput/clips_per_sec, tokens_per_sec, flops_per_sec, mfu and peak_flops in fit."""

    def __init__(self, window: int = 20, peak_flops: float | None = None) -> None:
        """
        Args:
            window: Steps the rates are averaged over (the most recent ones).
            peak_flops: Peak FLOP/s of one device, the MFU's denominator. null: Lightning's figure
                for the GPU and compute dtype (dense, no sparsity); on a CPU or an unlisted GPU no
                MFU is logged unless this is set.
        """
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.peak_flops = peak_flops
        self.flops_per_batch: int | None = None
        self._durations: deque[float] = deque(maxlen=window)
        self._clips: deque[int] = deque(maxlen=window)
        self._tokens: deque[int | None] = deque(maxlen=window)
        self._last: float | None = None
        self._paused: float | None = None
        self._counting: contextlib.ExitStack | None = None
        self._counter = None
        self._peak: float | None = None
        self._active = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Trainer files layered on each other (cpu.yaml, then ddp.yaml) each append one: the
        # first does the work, so nothing is counted or logged twice.
        self._active = next(c for c in trainer.callbacks if isinstance(c, TrainingThroughput)) is self
        if not self._active:
            return
        self._peak = self.peak_flops
        if self._peak is None:
            from lightning.fabric.utilities.throughput import get_available_flops

            if trainer.strategy.root_device.type != "cpu":
                self._peak = get_available_flops(trainer.strategy.root_device, compute_dtype(trainer))
        where = (f"{self._peak:.4g} FLOP/s per device" + (" (given)" if self.peak_flops else " (Lightning's table)")
                 if self._peak else "none known for this device: no MFU (set peak_flops)")
        rank_zero_info(f"throughput: MFU over a peak of {where}")

    def on_train_start(self, trainer, pl_module) -> None:
        self._durations.clear()
        self._clips.clear()
        self._tokens.clear()
        self._last = None

    def _sync(self, trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return _clock()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not self._active or self.flops_per_batch is not None:
            return
        self._counting = contextlib.ExitStack()
        if hasattr(torch.compiler, "set_stance"):
            self._counting.enter_context(torch.compiler.set_stance("force_eager"))
        self._counter = self._counting.enter_context(total_flop_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._active:
            return
        now = self._sync(trainer)
        if self._counting is not None:
            self._counting.close()
            self._counting = None
            self.flops_per_batch = int(self._counter.get_total_flops())
            self._counter = None
            self._last = self._sync(trainer)  # the counted step is slow: not timed
            return
        if self._last is None:
            self._last = now
            return
        self._durations.append(now - self._last)
        self._last = now
        clips = len(batch["caption"]) if "caption" in batch else int(next(iter(batch.values())).shape[0])
        self._clips.append(clips)
        tokens = tokens_per_clip(pl_module, batch)
        self._tokens.append(clips * tokens if tokens is not None else None)
        elapsed = sum(self._durations)
        if elapsed <= 0:
            return
        world = trainer.world_size
        flops_per_sec = self.flops_per_batch * len(self._durations) / elapsed
        metrics = {
            "throughput/clips_per_sec": sum(self._clips) / elapsed * world,
            "throughput/flops_per_sec": flops_per_sec,
        }
        if None not in self._tokens:
            metrics["throughput/tokens_per_sec"] = sum(self._tokens) / elapsed * world
        if self._peak:
            metrics["throughput/mfu"] = flops_per_sec / self._peak
            metrics["throughput/peak_flops"] = float(self._peak)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1, rank_zero_only=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._active and trainer.state.fn == TrainerFn.FITTING:
            self._paused = _clock()

    def on_validation_end(self, trainer, pl_module) -> None:
        # Validation inside fit is not training time: the next step is timed from where it left off.
        if self._paused is not None and self._last is not None:
            self._last += _clock() - self._paused
        self._paused = None
