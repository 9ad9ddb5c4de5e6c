"""Shared measuring tools for the benchmarks: the machine's matmul roof, FLOP counts, peak memory,
and timing of real Lightning training steps."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop, sdpa_flop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskvid.launch.cpu_tuning import keep_freed_memory  # noqa: E402

# The recorded CPU figures were taken with the host tuning that `maskvid fit` applies when
# MASKVID_CPU_TUNING=1 (launch/cpu_tuning.py); the benchmarks keep it on to stay comparable.
keep_freed_memory()


def _register_cpu_attention_flops() -> None:
    """torch's FLOP counter knows the CUDA attention kernels but not the CPU flash kernel, so
    attention would count as free on CPU. Same formulas (full, non-causal count, as usual)."""
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu.default in torch.utils.flop_counter.flop_registry:
        return

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop(query_shape, key_shape, value_shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_attention_flops()


def matmul_roof(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 7,
                shape: tuple[int, int, int] | None = None) -> float:
    """Dense square-matmul throughput in GFLOP/s (median of `repeats`): the machine's roof.
    shape: (m, k, n) to time an [m, k] @ [k, n] matmul instead of the n x n square."""
    m, k, n = shape or (n, n, n)
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times) / 1e9


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

    def __init__(self, flop_step: int = 0, device: str = "cpu", roof_dtype: torch.dtype = torch.float32,
                 roof_n: int = 2048) -> None:
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
                    # The roof right next to each step: this machine's speed drifts by tens of
                    # percent within a minute, so a ratio is only meaningful taken side by side.
                    timer.roofs.append(matmul_roof(device, roof_dtype, n=roof_n, repeats=3))

        self.callback = _Callback()
        self.times: list[float] = []
        self.roofs: list[float] = []
        self.flops: int = 0
        self._counter = None
        self._start = 0.0

    def median(self, skip: int = 1) -> float:
        """Median step time, skipping the first `skip` timed steps (warmup)."""
        times = self.times[skip:] or self.times
        return statistics.median(times)

    def fraction_of_roof(self, skip: int = 1) -> float:
        """Achieved FLOP/s over the roof measured beside each step, averaged over steps."""
        pairs = list(zip(self.times, self.roofs))[skip:] or list(zip(self.times, self.roofs))
        total_time = sum(t for t, _ in pairs)
        # Time-weighted mean roof, so lazily regularised steps weigh what they cost.
        roof = sum(t * r for t, r in pairs) / total_time
        return self.flops * len(pairs) / total_time / 1e9 / roof

    def mean(self, skip: int = 1) -> float:
        """Mean step time after warmup: the honest figure when some steps do periodic extra
        work (a lazy gradient penalty every N steps, dead-code restarts)."""
        times = self.times[skip:] or self.times
        return statistics.fmean(times)


def fit_steps(
    module, batch: dict, steps: int, device: str = "cpu", precision: str = "32-true", flop_step: int = 0,
    roof_dtype: torch.dtype = torch.float32, roof_n: int = 2048, callbacks: tuple = (),
) -> StepTimer:
    """Run `steps` real training steps of `module` on copies of `batch`; returns the timer.

    roof_n: side of the square matmul of the roof measured beside each step. callbacks: extra
    Lightning callbacks, run before the timer's (so their batch hooks wrap the timed step and
    stay clear of the roof measurement)."""
    from lightning.pytorch import Trainer

    timer = StepTimer(flop_step=flop_step, device=device, roof_dtype=roof_dtype, roof_n=roof_n)

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
        callbacks=[*callbacks, timer.callback],
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    return timer


def emit(result: dict, json_out: Path | None) -> None:
    """Print the benchmark's JSON and, if asked, write it to a file too."""
    import json

    text = json.dumps(result, indent=2)
    print(text)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text)
