"""What a result was measured on and how far its fits got: the `machine` and `fits` of summary.json.

A caption accuracy means little without the machine (a 2-core CPU with AMX and one without run a
time-budgeted demo to different step counts) and the steps each fit actually ran. This reads both
from the host and from the fits' last checkpoints.
"""

from __future__ import annotations

import os
import platform
import shlex
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

# CPU features that change what a step costs (bf16 matmuls, vector width).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "neon", "asimd")


def machine() -> dict[str, Any]:
    """The host: CPU model and the flags above, cores, GPUs, allocator, library versions."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "cpu": model,
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "allocator": next((lib for lib in ("tcmalloc", "jemalloc") if lib in os.environ.get("LD_PRELOAD", "")), "system"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def planned_max_steps(command: str) -> Optional[int]:
    """trainer.max_steps as a `maskvid fit` command line sets it: its --config files in order, then
    any --trainer.max_steps (the last setting wins, as in the CLI)."""
    args, steps = shlex.split(command), None
    for i, arg in enumerate(args[:-1]):
        if arg == "--config":
            path = Path(args[i + 1])
            doc = yaml.safe_load(path.read_text()) if path.is_file() else None
            value = ((doc or {}).get("trainer") or {}).get("max_steps")
            steps = int(value) if value is not None else steps
        elif arg == "--trainer.max_steps":
            steps = int(args[i + 1])
    return steps


def fit_record(checkpoint: Path, command: Optional[str], budgeted: bool) -> dict[str, Any]:
    """{steps, max_steps, stop}: the steps a fit ran (its last checkpoint's global_step), the steps
    it was set to run, and why it stopped."""
    if not checkpoint.is_file():
        return {"steps": None, "max_steps": None, "stop": f"no checkpoint at {checkpoint}"}
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    steps = int(state.get("global_step", 0))
    planned = planned_max_steps(command) if command else None
    # FitScheduleToTime (lightning_modules/time_budget.py) keeps the length it cut the schedule to.
    schedule = next((v for v in (state.get("callbacks") or {}).values()
                     if isinstance(v, dict) and "original_max_steps" in v), None)
    shortened = schedule is not None and schedule.get("max_steps") is not None and (
        schedule.get("original_max_steps") or 0) > schedule["max_steps"]
    planned = int(schedule["original_max_steps"]) if schedule and schedule.get("original_max_steps") else planned
    if planned is not None and steps >= planned:
        stop = "reached max_steps"
    elif shortened and steps >= schedule["max_steps"]:
        stop = f"time budget: the schedule was shortened from {planned} to {schedule['max_steps']} steps to end in time"
    elif budgeted:
        stop = "time budget: trainer.max_time ran out before max_steps"
    else:
        stop = "stopped before max_steps (interrupted, or an early-stopping callback)"
    return {"steps": steps, "max_steps": planned, "stop": stop}
