"""Mask schedules: the fraction of video tokens under the mask, as a function of r in [0, 1].

One function serves training and sampling, so that the sampler meets the masking rates the model
was trained on. Training draws r ~ U[0, 1) per clip and masks `ratio(r)` of it; sampling sets
r = step / steps and keeps `ratio(r)` masked after each step, so r = 1 unmasks everything.

- "cosine": cos(pi/2 r), MaskGIT's and Phenaki's choice: many high rates, few low ones.
- "linear": 1 - r, the official MeBT configs' training schedule (MaskGen schedule "linear").
- "power:E": 1 - r^E; E = 2, 3 and 0.5 are the official MaskGen's "square", "cube" and "sqrt".
  E > 1 spends more of the rates near 1 (harder examples), E < 1 near 0.

A minimum rate (training only) keeps every clip's loss from resting on a handful of tokens: a
draw near r = 1 under the linear schedule would mask almost nothing.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "power:E")


def parse(spec: str) -> tuple[str, float]:
    """"cosine" | "linear" | "power:E" -> (name, exponent); ValueError on anything else."""
    name, _, exponent = str(spec).partition(":")
    if name in ("cosine", "linear") and not exponent:
        return name, 1.0
    if name == "power":
        try:
            value = float(exponent)
        except ValueError:
            value = float("nan")
        if math.isfinite(value) and value > 0:
            return name, value
        raise ValueError(f"mask schedule {spec!r}: power needs a positive exponent, e.g. 'power:2'")
    raise ValueError(f"unknown mask schedule {spec!r}; valid: {', '.join(SCHEDULES)}")


def check(spec: str, min_rate: float = 0.0) -> None:
    """Raise ValueError if `spec` or `min_rate` cannot work."""
    parse(spec)
    if not 0.0 <= min_rate < 1.0:
        raise ValueError(f"minimum masking rate must be in [0, 1), got {min_rate}")


def mask_fraction(spec: str, r: torch.Tensor | float, min_rate: float = 0.0) -> torch.Tensor | float:
    """The masked fraction at r in [0, 1] under schedule `spec`, never below `min_rate`.

    Tensors in, tensors out (elementwise); floats in, a float out.
    """
    name, exponent = parse(spec)
    if not isinstance(r, torch.Tensor):
        if name == "cosine":
            ratio = math.cos(float(r) * math.pi / 2)
        elif name == "linear":
            ratio = 1.0 - float(r)
        else:
            ratio = 1.0 - max(float(r), 0.0) ** exponent
        return min(max(ratio, min_rate), 1.0)
    if name == "cosine":
        ratio = torch.cos(r * (math.pi / 2))
    elif name == "linear":
        ratio = 1.0 - r
    else:
        ratio = 1.0 - r.clamp(min=0.0) ** exponent
    return ratio.clamp(min=min_rate, max=1.0)
