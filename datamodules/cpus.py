"""How many CPUs this process may use, and how many decoder threads each DataLoader worker gets.

On a multi-GPU node every local rank runs its own DataLoader workers, and a job is often pinned to
a subset of the node's cores (SLURM, containers, `taskset`). Sizing threads from
`os.cpu_count()` per process oversubscribes such a node by ranks x workers.
"""

from __future__ import annotations

import os
import re


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one, else the count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def local_world_size() -> int:
    """Training processes on this node: torchrun's LOCAL_WORLD_SIZE (maskvid's strategies set it
    too, for Lightning's own launcher), else SLURM's tasks per node, else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = os.environ.get(name, "")
        match = re.match(r"\d+", value)  # SLURM_TASKS_PER_NODE reads like "4(x2)"
        if match and int(match.group()) > 0:
            return int(match.group())
    return 1


def decode_threads(num_workers: int) -> int:
    """Decoder threads for one DataLoader worker (or for the main process when num_workers is 0):
    this process's CPUs shared among the node's local ranks and each rank's workers, at least 1.
    All ranks on a node share one affinity mask unless the launcher pins each rank to its own."""
    return max(1, usable_cpus() // (local_world_size() * max(1, num_workers)))
