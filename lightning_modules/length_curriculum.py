"""The length curriculum: which latent frames of each training clip a step trains on.

`length_curriculum: [[step, latent_frames], ...]` sets, from each step on, the length L(step)
(piecewise constant). Two ways to cut a clip to it:

- "prefix": the first L(step) latent frames (short clips first, always from the clip's start);
- "random": as MeBT's official code (Ugness/MeBT: `Net2NetTransformer.forward`'s `t_prior` over
  `t_lengths`, and `MaskGen.divide_indices`' "Video Slicing"): a window whose length is drawn
  from a prior over 1..T and whose start is uniform over the clip. With `spread` > 0 the prior is
  a Gaussian centred on L(step) with that width in latent frames (the official `gaussian*`
  priors, whose centre moves with the step); `spread` 0 always takes L(step).

A window that starts past the first latent frame trains the model on what a sliding window sees
past the trained length (generation primes each window with the end of the previous one), and
on every part of long clips rather than their openings only. Windows are drawn from (seed, rank,
step), never from a global generator, so a resumed run cuts exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from maskvid.lightning_modules.step_seed import step_seed

WINDOWS = ("prefix", "random")
_SALT = 0x1E6C


def check(schedule: Sequence[Sequence[int]] | None, window: str = "prefix", spread: float = 0.0) -> None:
    """Raise ValueError unless the curriculum can work."""
    if schedule is not None:
        steps = [int(step) for step, _ in schedule]
        if steps != sorted(steps) or any(int(t) < 1 for _, t in schedule):
            raise ValueError(f"length_curriculum must be [[step, latent_frames], ...] with ascending steps: {schedule}")
    if window not in WINDOWS:
        raise ValueError(f"curriculum_window must be one of {WINDOWS}, got {window!r}")
    if not (math.isfinite(spread) and spread >= 0):
        raise ValueError(f"curriculum_spread must be >= 0, got {spread}")


def scheduled_length(schedule: Sequence[Sequence[int]] | None, step: int) -> int | None:
    """L(step): the latent frames the curriculum sets at `step` (None: no schedule)."""
    frames = None
    for start, latent_frames in schedule or []:
        if step >= int(start):
            frames = int(latent_frames)
    return frames


def length_prior(total: int, centre: int, spread: float) -> np.ndarray:
    """Probabilities of the window lengths 1..total: a Gaussian of width `spread` around `centre`
    (all mass on `centre` when spread is 0)."""
    lengths = np.arange(1, total + 1, dtype=float)
    centre = min(max(int(centre), 1), total)
    if spread <= 0:
        return (lengths == centre).astype(float)
    weights = np.exp(-((lengths - centre) ** 2) / (2 * spread**2))
    return weights / weights.sum()


def window(
    schedule: Sequence[Sequence[int]] | None,
    step: int,
    total: int,
    mode: str = "prefix",
    spread: float = 0.0,
    seed: int = 0,
    rank: int = 0,
) -> tuple[int, int] | None:
    """(start, length) of the latent frames to train on at `step`, for clips of `total` latent
    frames; None: the whole clip."""
    centre = scheduled_length(schedule, step)
    if mode == "prefix":
        return None if centre is None else (0, min(centre, total))
    if centre is None and spread <= 0:
        return None
    rng = np.random.default_rng([step_seed(seed, rank, step), _SALT])
    probs = length_prior(total, total if centre is None else centre, spread)
    length = int(rng.choice(np.arange(1, total + 1), p=probs))
    start = int(rng.integers(0, total - length + 1))
    return start, length
