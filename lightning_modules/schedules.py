"""Learning-rate schedules (as LambdaLR multipliers)."""

from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """Linear warmup to 1 over `warmup_steps`, then cosine decay to `min_ratio` at `total_steps`.

    The returned function reads its length from its `total_steps` attribute on every call, so a fit
    that learns it cannot reach max_steps in its time budget can end the schedule sooner
    (lightning_modules/time_budget.py). It stays a plain function on purpose: LambdaLR does not save
    functions in its state_dict, so a resumed fit takes its length from its own max_steps."""
    if total_steps <= 0:
        raise ValueError("warmup_cosine needs a finite number of steps: set trainer.max_steps")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, multiplier.total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    multiplier.total_steps = total_steps
    return multiplier


def fit_warmup_cosine(trainer, warmup_steps: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """`warmup_cosine` over the fit's length: trainer.max_steps, else the steps Lightning estimates
    from its epochs."""
    total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
    return warmup_cosine(warmup_steps, int(total), min_ratio)
