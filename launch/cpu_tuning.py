"""Opt-in host tuning for CPU training: a faster malloc preloaded into child processes, and glibc's
malloc told to keep freed memory. Off by default, and never applied where CUDA is available (the
GPU path and the Docker image use the system's malloc untouched).

Turn it on with `maskvid demo --cpu-tuning` or `MASKVID_CPU_TUNING=1` (for `maskvid fit` and the
commands the demo runs). Two measures, one reason: a CPU training step allocates and frees large
tensors whose sizes change from step to step (MeBT's packed sets, the mask ratio drawn per clip).

- `child_env`: preload tcmalloc or jemalloc into a process that has not started yet (a library
  cannot be preloaded into a running one). On glibc's malloc the heap fragments and the same step
  gets slower as a long fit goes on; PyTorch's CPU tuning guide and its xeon launcher
  (torch.backends.xeon.run_cpu) preload these allocators for this reason. `MASKVID_ALLOCATOR`
  picks one: `auto` (tcmalloc, else jemalloc, else the system's), `tcmalloc`, `jemalloc`, `system`.
  On Debian/Ubuntu: `apt-get install libtcmalloc-minimal4` (or libjemalloc2).
- `keep_freed_memory`: in the running process, raise glibc's mmap and trim thresholds, so large
  activations reuse heap pages instead of being mapped, zero-filled and unmapped every step. The
  price is that the process keeps up to the threshold of freed memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from pathlib import Path
from typing import Mapping, Optional

from maskvid.datamodules.errors import DataError

ENV = "MASKVID_CPU_TUNING"
CHOICES = ("auto", "tcmalloc", "jemalloc", "system")
# Library names as ctypes.util.find_library knows them, per allocator, best first.
_LIBRARIES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
# Where Debian/Ubuntu, RPM distributions, conda and pip --user put them, for when ldconfig is not
# on PATH (find_library needs it on Linux).
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
         "/usr/local/lib64")
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # above any activation of the configs we ship


class AllocatorError(DataError):
    """MASKVID_ALLOCATOR names an allocator that is unknown or not installed (a DataError, so the
    CLI reports it as one line)."""


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def requested(flag: Optional[bool] = None) -> bool:
    """Whether the user asked for CPU tuning: `flag` (e.g. --cpu-tuning) if given, else
    MASKVID_CPU_TUNING (1/true/yes/on)."""
    if flag is not None:
        return flag
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def enabled(flag: Optional[bool] = None) -> bool:
    """CPU tuning applies: asked for, and no CUDA device (a GPU run never gets it)."""
    return requested(flag) and not _cuda_available()


# -- a malloc preloaded into child processes ------------------------------------------------------

def find(kind: str) -> Optional[str]:
    """Path (or soname the dynamic loader resolves) of the jemalloc or tcmalloc library, or None."""
    for name in _LIBRARIES[kind]:
        dirs = list(_DIRS)
        if os.environ.get("CONDA_PREFIX"):
            dirs.insert(0, os.path.join(os.environ["CONDA_PREFIX"], "lib"))
        for folder in dirs:
            matches = sorted(glob.glob(os.path.join(folder, f"lib{name}.so*")))
            if matches:
                return matches[0]
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def choose(setting: Optional[str] = None) -> tuple[str, Optional[str]]:
    """(allocator, library) for MASKVID_ALLOCATOR (or `setting`): ("system", None) when none is
    wanted or none is installed under `auto`."""
    setting = (setting if setting is not None else os.environ.get("MASKVID_ALLOCATOR", "auto")).strip().lower()
    if setting not in CHOICES:
        raise AllocatorError(f"MASKVID_ALLOCATOR={setting!r}: expected one of {', '.join(CHOICES)}")
    if setting == "system":
        return "system", None
    for kind in ("tcmalloc", "jemalloc") if setting == "auto" else (setting,):
        library = find(kind)
        if library:
            return kind, library
    if setting != "auto":
        raise AllocatorError(f"MASKVID_ALLOCATOR={setting}: lib{_LIBRARIES[setting][0]} is not installed "
                             f"(Debian/Ubuntu: apt-get install {'libjemalloc2' if setting == 'jemalloc' else 'libtcmalloc-minimal4'})")
    return "system", None


def child_env(env: Mapping[str, str], setting: Optional[str] = None) -> tuple[dict[str, str], str]:
    """`env` for a child process with the chosen allocator preloaded, and the allocator's name.
    A library the caller already preloads is kept and not added twice. Applies whenever called:
    callers check `enabled()` first."""
    out = dict(env)
    already = preloaded(out)
    if already != "system":
        return out, already
    preload = [p for p in out.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    kind, library = choose(setting)
    if library is not None:
        out["LD_PRELOAD"] = ":".join([library, *preload])
    return out, kind


def preloaded(env: Mapping[str, str]) -> str:
    """The allocator `env` already preloads (tcmalloc, jemalloc), else "system"."""
    names = [Path(p).name for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    for kind, libraries in _LIBRARIES.items():
        if any(n.startswith(tuple(f"lib{lib}." for lib in libraries)) for n in names):
            return kind
    return "system"


# -- glibc's malloc in this process ---------------------------------------------------------------

def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds in this process; True if it took effect (False on
    other C libraries, which have no mallopt). Safe to call more than once."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))


def apply_in_process() -> bool:
    """What `maskvid fit|validate|test|predict` calls at startup: `keep_freed_memory` when CPU
    tuning is enabled, else nothing. True if the tuning took effect."""
    return enabled() and keep_freed_memory()
