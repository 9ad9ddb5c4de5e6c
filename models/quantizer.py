"""Pluggable quantizers for the video tokenizer.

Every quantizer maps continuous codes [..., dim] to indices [...] in [0, codebook_size) and back,
and reports what a user needs to watch a codebook: its loss, the batch perplexity and how many
codes are in use. `VectorQuantizer` is Phenaki's (l2-normalised codebook, commitment loss, dead-code
restart); `FSQ` (finite scalar quantization) and `LFQ` (lookup-free, MAGVIT-v2) are the codebook-free
alternatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from maskvid.models.config import module_config


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor
    """Quantized codes, same shape as the input, straight-through gradients."""
    indices: torch.Tensor
    """Code indices, the input shape without its last dim."""
    loss: torch.Tensor
    """Codebook + commitment loss (0 for quantizers without one)."""
    perplexity: torch.Tensor
    """exp(entropy) of this batch's code histogram: how many codes it effectively uses."""


class Quantizer(nn.Module):
    """Interface: `dim` (input width), `codebook_size`, forward, `codes(indices)`."""

    dim: int
    codebook_size: int
    # Sharding strategies keep quantizers in fp32 compute (their own FSDP2 unit with an fp32
    # policy): bf16 rounding of a codebook moves codes onto each other.
    full_precision = True

    def forward(self, z: torch.Tensor) -> QuantizerOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def codes(self, indices: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """The quantized vectors [..., dim] of indices [...]."""
        raise NotImplementedError

    def window_usage(self) -> float:
        """Fraction of codes used since the last restart window began (1.0 when not tracked)."""
        return 1.0

    def restart_dead_codes(self) -> int:
        """Called by the training loop after each optimizer step; returns the codes restarted."""
        return 0


def code_counts(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """How often each code occurs in `indices`, as float [codebook_size]. index_add_ rather than
    bincount, whose output size depends on the data (a graph break under torch.compile)."""
    flat = indices.flatten()
    ones = torch.ones(flat.shape, device=flat.device, dtype=torch.float32)
    return torch.zeros(codebook_size, device=flat.device, dtype=torch.float32).index_add_(0, flat, ones)


def perplexity_of(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    counts = code_counts(indices, codebook_size)
    probs = counts / counts.sum().clamp(min=1)
    return torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum())


@torch.no_grad()
def count_window(quantizer: Quantizer, indices: torch.Tensor) -> None:
    """Add a step's codes to `window_counts`, starting a new window once `usage_window` steps are in
    (without a branch on the count, which would break a compiled graph)."""
    fresh = quantizer.window_steps >= quantizer.usage_window
    counts = code_counts(indices, quantizer.codebook_size)
    quantizer.window_counts.copy_(torch.where(fresh, counts, quantizer.window_counts + counts))
    quantizer.window_steps.copy_(torch.where(fresh, 1, quantizer.window_steps + 1))


class VectorQuantizer(Quantizer):
    """VQ with an l2-normalised codebook (ViT-VQGAN / Phenaki).

    Codes and encodings are compared on the unit sphere, where nearest neighbour is the largest
    cosine: this keeps every code reachable and makes a low-dimensional codebook work well.
    Codes that no encoding chose during a window of `restart_every` training steps are restarted
    from random encodings of the current batch (the same choice on every rank).
    """

    def __init__(
        self,
        codebook_size: int = 8192,
        dim: int = 32,
        beta: float = 0.25,
        restart_every: int = 100,
    ) -> None:
        """
        Args:
            codebook_size: Number of codes (the stage-2 vocabulary).
            dim: Code width. Small (e.g. 32) codes on the sphere give high codebook usage.
            beta: Commitment weight: how strongly encodings are pulled towards their codes.
            restart_every: Training steps per dead-code window; 0 disables restarts.
        """
        super().__init__()
        self.config = module_config(self, locals())
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.restart_every = restart_every
        self.codebook = nn.Parameter(F.normalize(torch.randn(codebook_size, dim), dim=-1))
        self.register_buffer("window_counts", torch.zeros(codebook_size), persistent=True)
        self.register_buffer("window_steps", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("restarted_total", torch.zeros((), dtype=torch.long), persistent=True)

    def _normalised_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook.float(), dim=-1)

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self._normalised_codebook())

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        z = F.normalize(z.float(), dim=-1)
        flat = z.reshape(-1, self.dim)
        codebook = self._normalised_codebook()
        with torch.no_grad():
            # max(...).indices, not argmax: the same index, faster on a CPU (models/sampling.py).
            indices = (flat @ codebook.t()).max(dim=-1).indices
        q = F.embedding(indices, codebook)
        loss = F.mse_loss(q, flat.detach()) + self.beta * F.mse_loss(flat, q.detach())
        quantized = flat + (q - flat).detach()
        if self.training and torch.is_grad_enabled():
            self._track(indices, flat.detach())
        return QuantizerOutput(
            quantized=quantized.reshape(z.shape),
            indices=indices.reshape(z.shape[:-1]),
            loss=loss,
            perplexity=perplexity_of(indices, self.codebook_size),
        )

    def window_usage(self) -> float:
        return float((self.window_counts > 0).float().mean())

    @torch.no_grad()
    def _track(self, indices: torch.Tensor, encodings: torch.Tensor) -> None:
        if self.restart_every <= 0:
            return
        self.window_counts += code_counts(indices, self.codebook_size)
        self.window_steps += 1
        # For restart_dead_codes(), after this step's update; it decides (outside forward, so that
        # forward has no data-dependent branch) whether the window is over.
        self._candidates = encodings

    @torch.no_grad()
    def restart_dead_codes(self) -> int:
        """At the end of a window of `restart_every` training steps, move every code that no
        encoding chose onto one of the last batch's encodings (plus a little noise).

        Called after the optimizer step rather than inside forward: under FSDP2 the codebook seen
        in forward is a gathered copy, and only the sharded parameter outside it persists."""
        encodings, self._candidates = getattr(self, "_candidates", None), None
        if encodings is None or int(self.window_steps) < self.restart_every:
            return 0
        counts = self.window_counts.clone()
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
        dead = torch.nonzero(counts == 0).flatten()
        if len(dead):
            # Candidates come from this rank's batch; rank 0's choice is broadcast so that every
            # replica keeps an identical codebook.
            picks = torch.randint(len(encodings), (len(dead),), device=encodings.device)
            noise = 0.01 * torch.randn(len(dead), self.dim, device=encodings.device)
            fresh = F.normalize(encodings[picks] + noise, dim=-1)
            if distributed:
                dist.broadcast(fresh, src=0)
            self._write_codes(dead, fresh)
            self.restarted_total += len(dead)
        self.window_counts.zero_()
        self.window_steps.zero_()
        return len(dead)

    def _write_codes(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        codebook = self.codebook
        if hasattr(codebook, "full_tensor"):  # an FSDP2 shard (DTensor): rewrite it from the whole
            from torch.distributed.tensor import distribute_tensor

            full = codebook.full_tensor()
            full[rows] = values.to(full.dtype)
            codebook.copy_(distribute_tensor(full, codebook.device_mesh, codebook.placements))
        else:
            codebook.data[rows] = values.to(codebook.dtype)


class FSQ(Quantizer):
    """Finite scalar quantization (Mentzer et al., 2023): no codebook, no auxiliary loss.

    Each of the `len(levels)` channels is bounded and rounded to `levels[i]` values; the index is
    the mixed-radix number of the rounded channels, so every code is always reachable.
    """

    def __init__(self, levels: list[int] = [8, 8, 8, 5, 5, 5], usage_window: int = 100) -> None:  # noqa: B006
        """
        Args:
            levels: Quantization levels per channel; the vocabulary is their product.
            usage_window: Training steps over which `window_usage` (logged codebook usage) counts.
        """
        super().__init__()
        self.config = module_config(self, locals())
        if not levels or any(level < 2 for level in levels):
            raise ValueError(f"FSQ levels must each be >= 2, got {levels}")
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        basis = torch.cumprod(torch.tensor([1] + list(levels[:-1])), dim=0)
        self.register_buffer("basis", basis, persistent=False)
        self.usage_window = usage_window
        self.register_buffer("window_counts", torch.zeros(self.codebook_size), persistent=True)
        self.register_buffer("window_steps", torch.zeros((), dtype=torch.long), persistent=True)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        half = (self.levels.float() - 1) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def _to_unit(self, digits: torch.Tensor) -> torch.Tensor:
        half = self.levels // 2
        return (digits - half) / half.clamp(min=1)

    def window_usage(self) -> float:
        return float((self.window_counts > 0).float().mean())

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices[..., None] // self.basis) % self.levels
        return self._to_unit(digits).float()

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        bounded = self._bound(z.float())
        rounded = bounded + (bounded.round() - bounded).detach()
        half = self.levels // 2
        digits = (rounded.detach().round() + half).long()
        indices = (digits * self.basis).sum(-1)
        quantized = rounded / half.clamp(min=1)
        if self.training and torch.is_grad_enabled():
            count_window(self, indices)
        return QuantizerOutput(
            quantized=quantized,
            indices=indices,
            loss=z.new_zeros((), dtype=torch.float32),
            perplexity=perplexity_of(indices, self.codebook_size),
        )


class LFQ(Quantizer):
    """Lookup-free quantization (MAGVIT-v2, Yu et al., 2023), computed by vector-quantize-pytorch.

    Each of `dim` channels is quantized to its sign (±1) and the index is the binary number of the
    signs: a 2**dim vocabulary with no codebook to look up, collapse or restart. Its entropy penalty
    keeps each token's assignment confident and the batch's code histogram spread (the histogram is
    averaged over ranks before its entropy is taken, so N ranks train as one).
    """

    def __init__(self, dim: int = 10, entropy_weight: float = 0.1, diversity_gamma: float = 1.0,
                 commitment_weight: float = 0.25, usage_window: int = 100) -> None:
        """
        Args:
            dim: Bits per token; the vocabulary is 2**dim.
            entropy_weight: Weight of the entropy penalty (per-token entropy minus diversity_gamma
                times the batch code entropy).
            diversity_gamma: How strongly the batch entropy term pushes codes to be used evenly.
            commitment_weight: Weight of the commitment loss pulling the encoder output to its code.
            usage_window: Training steps over which `window_usage` (logged codebook usage) counts.
        """
        super().__init__()
        self.config = module_config(self, locals())
        # Imported here: only LFQ tokenizers pay for the library's import.
        from vector_quantize_pytorch import LFQ as LookupFree

        if not 1 <= dim <= 20:
            raise ValueError(f"LFQ dim must be in [1, 20] (a 2**dim vocabulary), got {dim}")
        self.dim = dim
        self.codebook_size = 2**dim
        self.lfq = LookupFree(dim=dim, codebook_size=2**dim, entropy_loss_weight=entropy_weight,
                              diversity_gamma=diversity_gamma, commitment_loss_weight=commitment_weight,
                              channel_first=False)
        self.usage_window = usage_window
        self.register_buffer("window_counts", torch.zeros(self.codebook_size), persistent=True)
        self.register_buffer("window_steps", torch.zeros((), dtype=torch.long), persistent=True)

    def window_usage(self) -> float:
        return float((self.window_counts > 0).float().mean())

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.lfq.indices_to_codes(indices.long()).float()

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        shape = z.shape[:-1]
        flat = z.float().reshape(1, -1, self.dim)  # the library's (batch, sequence, dim) layout
        quantized, indices, aux_loss = self.lfq(flat)
        indices = indices.reshape(shape)
        if self.training and torch.is_grad_enabled():
            count_window(self, indices)
        return QuantizerOutput(
            quantized=quantized.reshape(z.shape),
            indices=indices,
            loss=aux_loss.float().reshape(()),
            perplexity=perplexity_of(indices, self.codebook_size),
        )
