"""Which precision a device computes fastest in: the one place the demo and `maskvid generate`
ask, so that a CPU with native bf16 (AMX / AVX512-BF16) trains stage 2 and samples in bf16 like a
GPU.

On a CPU with AMX, bf16 matmuls run several times faster than fp32, and with attention and the
depthwise conv kept in fp32 (models/attention.py, models/maskgit.py) the demo's train steps and
sampling take less time (benchmarks/cpu_bf16.py; docs/benchmarks.md, "bf16 on the CPU"). A CPU
without native bf16 emulates it, slower than fp32, so there everything stays fp32.
"""

from __future__ import annotations

import torch


def native_bf16(device_type: str) -> bool:
    """True when `device_type` ("cpu", "cuda") runs bf16 matmuls natively."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        # AMX and AVX512-BF16 compute bf16 dot products in hardware. oneDNN also reports plain
        # AVX512 as bf16-capable, but there it emulates bf16, slower than fp32; other CPUs
        # (aarch64 included) are unmeasured here and stay fp32.
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def trainer_precision(device_type: str) -> str:
    """Lightning `trainer.precision` for a fit on `device_type`: bf16 autocast where native."""
    return "bf16-mixed" if native_bf16(device_type) else "32-true"


def resolve(choice: str, device_type: str) -> bool:
    """--precision auto/bf16/32 -> whether to sample under bf16 autocast."""
    if choice not in ("auto", "bf16", "32"):
        raise ValueError(f"precision must be auto, bf16 or 32, got {choice!r}")
    return native_bf16(device_type) if choice == "auto" else choice == "bf16"
