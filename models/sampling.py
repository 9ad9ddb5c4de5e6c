"""MaskGIT sampling (Chang et al., 2022) for any stage-2 backbone, with classifier-free guidance.

Start with every position masked (or some primed: story mode). At each of `steps` steps predict
every masked token at once, keep the most confident predictions and re-mask the rest, so that the
masked fraction follows the schedule (by default cos(pi/2 * progress)). Confidence gets Gumbel
noise whose scale anneals to zero over the steps (exploration early, commitment late). Guidance runs the conditional and
unconditional passes in one batched forward: logits = u + s * (c - u).
Optional refinement rounds follow (`refine_steps`): each re-masks a random fraction of the
generated tokens and predicts them again from all the others, so that tokens committed in the same
step, which were drawn independently of each other, are redrawn knowing their neighbours (ragged
object edges are the typical symptom). This is the predictor-corrector idea of Lezama et al.
(2022) with a random corrector.
`sampler: draft_revise` replaces that corrector with MeBT's draft-and-revise (models/draft_revise.py):
the MaskGIT steps make a draft, then sweeps re-predict every generated token exactly once each.
`sample_tokens` runs whichever sampler the options name.
All randomness comes from one torch.Generator: a seed gives the same video on the same machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from einops import rearrange
from torch import nn

from maskvid.models import mask_schedules
from maskvid.models.layers import token_valid


def mask_ratio(progress: torch.Tensor | float) -> torch.Tensor | float:
    """Cosine schedule: the fraction of tokens still masked at progress in [0, 1]."""
    return mask_schedules.mask_fraction("cosine", progress)


def uniform(shape: torch.Size | tuple, generator, device) -> torch.Tensor:
    """U[0, 1) noise. A list of generators draws row b of the batch from generator b, so a video
    depends on its own seed only, not on what else shares its batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([uniform(tuple(shape[1:]), g, device) for g in generator])
    return torch.rand(shape, generator=generator, device=device)


def gumbel(shape: torch.Size | tuple, generator, device) -> torch.Tensor:
    """Standard Gumbel noise, drawn as `uniform` draws (per-video generators included)."""
    u = uniform(shape, generator, device).clamp_(1e-20, 1.0)
    return -torch.log((-torch.log(u)).clamp_(min=1e-20))


CFG_SCHEDULES = ("constant", "linear")
SAMPLERS = ("maskgit", "draft_revise")


class SamplingOptionError(ValueError):
    """A SamplingOptions field that cannot work; `field` names it."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"{field} {problem}")


@dataclass
class SamplingOptions:
    steps: int = 18
    """Parallel decoding steps (Phenaki uses 12-48)."""
    cfg_scale: float = 3.0
    """Guidance scale s; 1 disables guidance (no unconditional pass)."""
    temperature: float = 1.0
    """Softmax temperature of the token sampling."""
    top_k: int | None = None
    """Sample only among the k most likely tokens."""
    noise: float = 4.5
    """Initial scale of the Gumbel noise on confidences, annealed linearly to 0."""
    cfg_schedule: str = "constant"
    """"constant": cfg_scale at every step; "linear": from 1 at the start up to cfg_scale at the
    last step (as MUSE does). Guidance multiplies the odds of text-specific tokens at every
    position, so a full scale while the layout is still open grows objects; late steps, which
    fill in details, still get all of it."""

    refine_steps: int = 0
    """Refinement rounds after the MaskGIT loop: each re-masks `refine_ratio` of the generated
    tokens at random and predicts them again from the rest (0: none)."""
    refine_ratio: float = 0.25
    """Fraction of the generated tokens re-masked in each refinement round."""

    sampler: str = "maskgit"
    """"maskgit": the steps above, then the random refinement rounds; "draft_revise": MeBT's
    draft-and-revise: the steps above are the draft (refine_steps ignored), then revise_sweeps."""
    schedule: str = "cosine"
    """Fraction still masked after each step: "cosine", "linear" or "power:E"
    (models/mask_schedules.py)."""
    bootstrap_steps: int = 0
    """draft_revise: steps before the draft that each commit one token at a random position."""
    revise_sweeps: int = 2
    """draft_revise: sweeps after the draft; each re-predicts every generated token once."""
    revise_partitions: int = 4
    """draft_revise: each sweep splits the generated tokens into this many random parts and
    re-predicts one part per forward, given all the others."""
    revise_temperature: float = 0.7
    """draft_revise: softmax temperature of the revise sweeps."""
    revise_top_k: int | None = None
    """draft_revise: sample revised tokens among the k most likely only."""

    def guidance(self, step: int) -> float:
        """Guidance scale at `step` (0-based) of `steps`."""
        if self.cfg_schedule == "linear":
            return 1.0 + (self.cfg_scale - 1.0) * (step + 1) / self.steps
        return self.cfg_scale

    def check(self) -> None:
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise SamplingOptionError("cfg_schedule", f"must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")
        if self.steps < 1:
            raise SamplingOptionError("steps", f"must be >= 1, got {self.steps}")
        if self.temperature <= 0:
            raise SamplingOptionError("temperature", f"must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise SamplingOptionError("top_k", f"must be >= 1, got {self.top_k}")
        if self.refine_steps < 0:
            raise SamplingOptionError("refine_steps", f"must be >= 0, got {self.refine_steps}")
        if not 0 < self.refine_ratio <= 1:
            raise SamplingOptionError("refine_ratio", f"must be in (0, 1], got {self.refine_ratio}")
        if self.sampler not in SAMPLERS:
            raise SamplingOptionError("sampler", f"must be one of {SAMPLERS}, got {self.sampler!r}")
        try:
            mask_schedules.check(self.schedule)
        except ValueError as exc:
            raise SamplingOptionError("schedule", f"is invalid: {exc}") from None
        for name in ("bootstrap_steps", "revise_sweeps"):
            if getattr(self, name) < 0:
                raise SamplingOptionError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.revise_partitions < 1:
            raise SamplingOptionError("revise_partitions", f"must be >= 1, got {self.revise_partitions}")
        if self.revise_temperature <= 0:
            raise SamplingOptionError("revise_temperature", f"must be > 0, got {self.revise_temperature}")
        if self.revise_top_k is not None and self.revise_top_k < 1:
            raise SamplingOptionError("revise_top_k", f"must be >= 1, got {self.revise_top_k}")

    def forwards(self) -> int:
        """Backbone forwards per video (each one batched conditional + unconditional pass under
        guidance): the sampler's compute, for comparing samplers at equal cost."""
        if self.sampler == "draft_revise":
            return self.bootstrap_steps + self.steps + self.revise_sweeps * self.revise_partitions
        return self.steps + self.refine_steps


@torch.no_grad()
def guided_logits(
    backbone: nn.Module,
    tokens: torch.Tensor,
    text: torch.Tensor | None,
    text_mask: torch.Tensor | None,
    cfg_scale: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits with classifier-free guidance, conditional and unconditional in one forward.
    valid: the backbone's padding mask (None: every position is real)."""
    if cfg_scale == 1.0 or text is None:
        return backbone(tokens, text, text_mask, valid=valid).float()
    b = tokens.shape[0]
    drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(tokens.device)
    logits = backbone(
        torch.cat([tokens, tokens]), torch.cat([text, text]), torch.cat([text_mask, text_mask]), drop_text=drop,
        valid=None if valid is None else torch.cat([valid, valid]),
    ).float()
    cond, uncond = logits[:b], logits[b:]
    return uncond + cfg_scale * (cond - uncond)


def start_grid(
    backbone: nn.Module,
    grid: tuple[int, int, int],
    text: torch.Tensor | None,
    prime: torch.Tensor | None,
    batch_size: int | None,
    valid: torch.Tensor | None,
    given: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> (tokens [B, N]: mask_id but the primed frames and the kept given tokens, unknown [B, N]:
    the positions to generate, valid on the backbone's device or None)."""
    t, h, w = grid
    b = text.shape[0] if text is not None else (batch_size or 1)
    device = next(backbone.parameters()).device
    mask_id = backbone.mask_id
    tokens = torch.full((b, t, h, w), mask_id, dtype=torch.long, device=device)
    if prime is not None:
        k = prime.shape[1]
        if k >= t or prime.shape[2:] != (h, w):
            raise ValueError(f"prime of shape {tuple(prime.shape)} does not fit the grid {grid}")
        tokens[:, :k] = prime.to(device)
    if (given is None) != (keep is None):
        raise ValueError("given and keep go together: the tokens and which of them to keep")
    if keep is not None:
        if given.shape[1:] != (t, h, w) or keep.shape[1:] != (t, h, w) or keep.dtype != torch.bool:
            raise ValueError(f"given {tuple(given.shape)} and keep {tuple(keep.shape)} {keep.dtype} must be "
                             f"[B, {t}, {h}, {w}] tokens and bool")
        # Interpolation, inpainting: any kept position is context, as a primed frame is.
        tokens = torch.where(keep.to(device), given.to(device), tokens)
    tokens = rearrange(tokens, "b t h w -> b (t h w)")
    unknown = tokens == mask_id
    if valid is not None:
        valid = valid.to(device)
        unknown = unknown & token_valid(valid, grid)
    return tokens, unknown, valid


class TokenDraw:
    """Draws a token at every position of flat grids [B, N] from the backbone, with guidance."""

    def __init__(self, backbone: nn.Module, grid: tuple[int, int, int], text: torch.Tensor | None,
                 text_mask: torch.Tensor | None, generator, valid: torch.Tensor | None = None) -> None:
        self.backbone, self.grid, self.text, self.text_mask = backbone, grid, text, text_mask
        self.generator, self.valid = generator, valid
        self.device = next(backbone.parameters()).device
        self.mask_id = backbone.mask_id

    def grid_tokens(self, flat: torch.Tensor) -> torch.Tensor:
        t, h, _ = self.grid
        return rearrange(flat, "b (t h w) -> b t h w", t=t, h=h)

    def __call__(self, inputs: torch.Tensor, cfg_scale: float, temperature: float, top_k: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs [B, N] -> (sampled [B, N], log_probs [B, N, V])."""
        logits = guided_logits(self.backbone, self.grid_tokens(inputs), self.text, self.text_mask, cfg_scale, self.valid)
        log_probs = token_log_probs(rearrange(logits, "b t h w v -> b (t h w) v"), temperature, top_k)
        # max(...).indices, not argmax: the same first-maximum index, and faster over a vocabulary on
        # a CPU, where argmax's reduction is not vectorised (figures in docs/benchmarks.md).
        return (log_probs + gumbel(log_probs.shape, self.generator, self.device)).max(dim=-1).indices, log_probs


def maskgit_steps(draw: TokenDraw, tokens: torch.Tensor, unknown: torch.Tensor, options: SamplingOptions,
                  generator) -> torch.Tensor:
    """The MaskGIT loop: fill the `unknown` positions of tokens [B, N] in options.steps steps,
    keeping after each the fraction of them options.schedule sets still masked."""
    device, mask_id = tokens.device, draw.mask_id
    total_unknown = unknown.sum(dim=1)  # [B]
    for step in range(options.steps):
        sampled, log_probs = draw(tokens, options.guidance(step), options.temperature, options.top_k)
        confidence = log_probs.gather(-1, sampled[..., None]).squeeze(-1)
        progress = (step + 1) / options.steps
        confidence = confidence + options.noise * (1 - progress) * gumbel(confidence.shape, generator, device)
        # Known tokens stay; the least confident new ones go back under the mask.
        sampled = torch.where(unknown, sampled, tokens)
        confidence = torch.where(unknown, confidence, torch.full_like(confidence, float("inf")))
        remask = torch.floor(total_unknown.float() * mask_schedules.mask_fraction(options.schedule, progress)).long()
        if step == options.steps - 1:
            remask.zero_()
        order = confidence.argsort(dim=-1)  # ascending: least confident first
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=device).expand_as(order))
        masked_now = rank < remask[:, None]
        tokens = torch.where(masked_now, torch.full_like(sampled, mask_id), sampled)
        unknown = masked_now
    return tokens


@torch.no_grad()
def maskgit_sample(
    backbone: nn.Module,
    grid: tuple[int, int, int],
    text: torch.Tensor | None,
    text_mask: torch.Tensor | None,
    options: SamplingOptions = SamplingOptions(),
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    prime: torch.Tensor | None = None,
    batch_size: int | None = None,
    valid: torch.Tensor | None = None,
    *,
    given: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """-> tokens [B, t, h, w], every real position filled: the MaskGIT loop, then options'
    random refinement rounds (whatever options.sampler says; `sample_tokens` dispatches on it).

    generator: one generator for the batch, or one per video (then each video is a function of
        its own seed, whatever else is in the batch, up to float rounding of batched matmuls).
    prime: optional tokens [B, k, h, w] fixed as the first k latent frames (story mode).
    valid: optional bool [B, t] or [B, t, h, w], False = padding: never filled, scored or counted
        by the schedule, unseen by the backbone, and returned as mask_id.
    given, keep: optional tokens [B, t, h, w] and bool [B, t, h, w]: the kept positions are fixed
        to the given tokens and the rest generated (MaskGIT/MUSE-style interpolation between given
        clips, inpainting of a spatio-temporal box: keep_box, interpolation_keep).
    """
    options.check()
    tokens, unknown, valid = start_grid(backbone, grid, text, prime, batch_size, valid, given, keep)
    device = tokens.device
    draw = TokenDraw(backbone, grid, text, text_mask, generator, valid)
    generated = unknown  # what refinement may redraw: everything but the primed frames and kept tokens
    tokens = maskgit_steps(draw, tokens, unknown, options, generator)
    for _ in range(options.refine_steps):
        redo = (uniform(tokens.shape, generator, device) < options.refine_ratio) & generated
        sampled, _ = draw(torch.where(redo, torch.full_like(tokens, draw.mask_id), tokens),
                          options.guidance(options.steps - 1), options.temperature, options.top_k)
        tokens = torch.where(redo, sampled, tokens)
    return draw.grid_tokens(tokens)


@torch.no_grad()
def sample_tokens(
    backbone: nn.Module,
    grid: tuple[int, int, int],
    text: torch.Tensor | None,
    text_mask: torch.Tensor | None,
    options: SamplingOptions = SamplingOptions(),
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    prime: torch.Tensor | None = None,
    batch_size: int | None = None,
    valid: torch.Tensor | None = None,
    *,
    given: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sampler options.sampler names, with maskgit_sample's arguments -> tokens [B, t, h, w]."""
    if options.sampler == "draft_revise":
        from maskvid.models.draft_revise import draft_revise_sample  # it builds on this module

        return draft_revise_sample(backbone, grid, text, text_mask, options, generator, prime, batch_size, valid,
                                   given=given, keep=keep)
    return maskgit_sample(backbone, grid, text, text_mask, options, generator, prime, batch_size, valid,
                          given=given, keep=keep)


def keep_box(grid: tuple[int, int, int], frames: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int],
             inside: bool = False) -> torch.Tensor:
    """bool [t, h, w] keep mask for inpainting a spatio-temporal box of latent positions ([start,
    end) each): inside=False regenerates the box and keeps the rest, inside=True keeps only the box."""
    box = torch.zeros(grid, dtype=torch.bool)
    box[frames[0] : frames[1], rows[0] : rows[1], cols[0] : cols[1]] = True
    return box if inside else ~box


def interpolation_keep(grid: tuple[int, int, int], first: int, last: int) -> torch.Tensor:
    """bool [t, h, w] keep mask for interpolation: the first `first` and the last `last` latent
    frames are given, those between generated."""
    t = grid[0]
    if first < 0 or last < 0 or first + last >= t:
        raise ValueError(f"{first} + {last} given latent frames leave none of {t} to generate")
    keep = torch.zeros(grid, dtype=torch.bool)
    keep[:first] = True
    keep[t - last :] = True
    return keep


def token_log_probs(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Log-probabilities the tokens are drawn from: temperature, then top-k."""
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.log_softmax(dim=-1)
