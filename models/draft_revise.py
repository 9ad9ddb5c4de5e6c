"""Draft-and-revise sampling (MeBT, Yoo et al. 2023) for any stage-2 backbone.

Following the official code (Ugness/MeBT: `Net2NetTransformer.draft_and_revise`, `.revise`, and
`MaskGen.create_gibbs_revise_mask` / the "bootstrap" strategy of `MaskGen.generate_next_mask`):

1. optional bootstrap steps: each predicts every masked token and commits one of them, at a
   random position, so the draft does not start from nothing observed (where MeBT, whose masked
   queries never see each other, predicts worst);
2. a MaskGIT draft: `options.steps` confidence-ordered steps under `options.schedule`, at the
   draft's temperature and top-k (`options.temperature`, `options.top_k`);
3. `revise_sweeps` sweeps: each splits the generated tokens into `revise_partitions` random parts
   and, part by part, masks one part and redraws it given all the others at the low
   `revise_temperature`. Every generated token is re-predicted exactly once per sweep, each time
   with most of the video observed, unlike the random refinement of models/sampling.py, which
   redraws a random fraction per round and may skip a token or redraw it twice.

Primed tokens (story mode, sliding windows) are context only and padding (`valid`) is never
filled: neither is drafted or revised. All randomness comes from the generator(s).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from maskvid.models.sampling import SamplingOptions, TokenDraw, maskgit_steps, start_grid, uniform


def random_partition(revisable: torch.Tensor, parts: int, generator, device) -> torch.Tensor:
    """revisable bool [B, N] -> long [B, N]: each revisable position's part in [0, parts), the rest
    -1. Per row, a uniformly random split into parts whose sizes differ by at most one."""
    keys = uniform(revisable.shape, generator, device).masked_fill(~revisable, 2.0)
    rank = keys.argsort(dim=1).argsort(dim=1)  # revisable positions take ranks 0 .. count-1
    count = revisable.sum(dim=1, keepdim=True).clamp(min=1)
    part = torch.div(rank * parts, count, rounding_mode="floor")
    return part.masked_fill(~revisable, -1)


def commit_one(unknown: torch.Tensor, generator, device) -> torch.Tensor:
    """unknown bool [B, N] -> bool [B, N]: one uniformly random unknown position per row (none
    in a row with nothing unknown)."""
    keys = uniform(unknown.shape, generator, device).masked_fill(~unknown, -1.0)
    pick = torch.zeros_like(unknown).scatter_(1, keys.argmax(dim=1, keepdim=True), True)
    return pick & unknown


@torch.no_grad()
def draft_revise_sample(
    backbone: nn.Module,
    grid: tuple[int, int, int],
    text: torch.Tensor | None,
    text_mask: torch.Tensor | None,
    options: SamplingOptions = SamplingOptions(sampler="draft_revise"),
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    prime: torch.Tensor | None = None,
    batch_size: int | None = None,
    valid: torch.Tensor | None = None,
    *,
    given: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """-> tokens [B, t, h, w]; the arguments are maskgit_sample's (models/sampling.py)."""
    options.check()
    tokens, unknown, valid = start_grid(backbone, grid, text, prime, batch_size, valid, given, keep)
    device = tokens.device
    draw = TokenDraw(backbone, grid, text, text_mask, generator, valid)
    generated = unknown  # the only positions a revise sweep may redraw

    for _ in range(options.bootstrap_steps):
        sampled, _ = draw(tokens, options.guidance(0), options.temperature, options.top_k)
        commit = commit_one(unknown, generator, device)
        tokens = torch.where(commit, sampled, tokens)
        unknown = unknown & ~commit

    tokens = maskgit_steps(draw, tokens, unknown, options, generator)

    final_scale = options.guidance(options.steps - 1)
    for _ in range(options.revise_sweeps):
        part = random_partition(generated, options.revise_partitions, generator, device)
        for p in range(options.revise_partitions):
            redo = part == p
            if not bool(redo.any()):  # fewer generated tokens than parts
                continue
            inputs = torch.where(redo, torch.full_like(tokens, backbone.mask_id), tokens)
            sampled, _ = draw(inputs, final_scale, options.revise_temperature, options.revise_top_k)
            tokens = torch.where(redo, sampled, tokens)
    return draw.grid_tokens(tokens)
