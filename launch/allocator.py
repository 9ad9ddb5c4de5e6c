"""Which malloc a training process runs on.

glibc's malloc slows long CPU fits down. The tensors of a step change size from step to step (MeBT's
packed sets, the mask ratio drawn per clip), the heap fragments, and the same step gets slower as
the run goes on: the demo's MeBT stage 2 went from 0.34 s a step at step 100 to 0.41 s at step 500
and 0.47 s on average over its 3800 steps on 2 cores, while with jemalloc preloaded it stayed at
0.33-0.37 s, and with tcmalloc at 0.31-0.34 s (600-step fits; benchmarks/allocator.py times the
bare step). PyTorch's CPU tuning guide and its xeon launcher
(torch.backends.xeon.run_cpu) preload jemalloc or tcmalloc for this reason.

A library can only be preloaded into a process that has not started, so `child_env` is applied to
the environment of the commands `maskvid demo` runs. `MASKVID_ALLOCATOR` chooses: `auto` (the
default: tcmalloc, else jemalloc, else the system's), `tcmalloc`, `jemalloc` or `system`. On Debian
or Ubuntu, `apt-get install libtcmalloc-minimal4` (or libjemalloc2); the Docker image has tcmalloc.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
from pathlib import Path
from typing import Mapping, Optional

from datamodules.errors import DataError

CHOICES = ("auto", "tcmalloc", "jemalloc", "system")
# Library names as ctypes.util.find_library knows them, per allocator, best first.
_LIBRARIES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
# Where Debian/Ubuntu, RPM distributions, conda and pip --user put them, for when ldconfig is not
# on PATH (find_library needs it on Linux).
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
         "/usr/local/lib64")


class AllocatorError(DataError):
    """MASKVID_ALLOCATOR names an allocator that is unknown or not installed (a DataError, so the
    CLI reports it as one line)."""


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
    A library the caller already preloads is kept and not added twice."""
    out = dict(env)
    preload = [p for p in out.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    for kind in _LIBRARIES:
        if any(Path(p).name.startswith(tuple(f"lib{n}." for n in _LIBRARIES[kind])) for p in preload):
            return out, kind
    kind, library = choose(setting)
    if library is not None:
        out["LD_PRELOAD"] = ":".join([library, *preload])
    return out, kind
