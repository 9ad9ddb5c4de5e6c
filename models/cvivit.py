"""C-ViViT, Phenaki's causal video tokenizer (Villegas et al., 2022).

    video [B, C, F, H, W], F = 1 + k*pt  ->  indices [B, 1+k, H/p, W/p]  ->  video

The first frame is patched on its own and later frames as pt-frame tubelets, so an image is a
1-frame video and a latent frame never depends on later pixels: with the causal temporal
transformer, the tokens of latent frame i depend only on frames up to the end of tubelet i.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from maskvid.models.attention import Transformer, sinusoidal_embedding
from maskvid.models.config import module_config
from maskvid.models.quantizer import Quantizer, QuantizerOutput, VectorQuantizer


class CViViT(nn.Module):
    """Causal video tokenizer: tubelet encoder, quantizer, mirrored decoder."""

    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 8,
        temporal_patch_size: int = 2,
        channels: int = 3,
        dim: int = 256,
        spatial_depth: int = 4,
        temporal_depth: int = 4,
        heads: int = 8,
        ff_mult: float = 4.0,
        quantizer: Quantizer | None = None,
    ) -> None:
        """
        Args:
            image_size: Largest frame side the spatial position table covers (frames may be
                smaller, in multiples of patch_size).
            patch_size: Spatial patch side p.
            temporal_patch_size: Frames per tubelet pt after the first frame.
            channels: Pixel channels.
            dim: Transformer width.
            spatial_depth: Spatial blocks in the encoder (and again in the decoder).
            temporal_depth: Causal temporal blocks in the encoder (and again in the decoder).
            heads: Attention heads.
            ff_mult: MLP hidden width as a multiple of dim.
            quantizer: The quantizer (default: VectorQuantizer with 8192 codes of width 32).
        """
        quantizer = quantizer if quantizer is not None else VectorQuantizer()
        super().__init__()
        self.config = module_config(self, locals())
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.channels = channels
        self.dim = dim
        p, pt, c = patch_size, temporal_patch_size, channels
        grid = image_size // patch_size

        self.embed_first = nn.Sequential(nn.Linear(c * p * p, dim), nn.LayerNorm(dim))
        self.embed_tubelet = nn.Sequential(nn.Linear(c * pt * p * p, dim), nn.LayerNorm(dim))
        self.pos_h = nn.Parameter(torch.randn(grid, dim) * 0.02)
        self.pos_w = nn.Parameter(torch.randn(grid, dim) * 0.02)
        self.enc_spatial = Transformer(dim, spatial_depth, heads, ff_mult)
        self.enc_temporal = Transformer(dim, temporal_depth, heads, ff_mult, causal=True)

        self.quantizer = quantizer
        self.to_code = nn.Linear(dim, quantizer.dim)
        self.from_code = nn.Linear(quantizer.dim, dim)

        self.dec_pos_h = nn.Parameter(torch.randn(grid, dim) * 0.02)
        self.dec_pos_w = nn.Parameter(torch.randn(grid, dim) * 0.02)
        self.dec_temporal = Transformer(dim, temporal_depth, heads, ff_mult, causal=True)
        self.dec_spatial = Transformer(dim, spatial_depth, heads, ff_mult)
        self.head_first = nn.Linear(dim, c * p * p)
        self.head_tubelet = nn.Linear(dim, c * pt * p * p)
        # Off except around a GAN step: the recorded tensors keep that step's graph alive.
        self.record_head_io = False
        self.head_io: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- public API ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.quantizer.codebook_size

    def token_grid(self, num_frames: int, size: int | tuple[int, int]) -> tuple[int, int, int]:
        """(t, h, w) of the token grid for `num_frames` frames of `size` (side or (H, W))."""
        height, width = (size, size) if isinstance(size, int) else size
        pt, p = self.temporal_patch_size, self.patch_size
        if num_frames < 1 or (num_frames - 1) % pt:
            valid = ", ".join(str(1 + k * pt) for k in range(6))
            raise ValueError(
                f"C-ViViT takes 1 + k*{pt} frames ({valid}, ...); got {num_frames}. "
                "Set data.num_frames accordingly."
            )
        if height % p or width % p:
            raise ValueError(f"frame size {height}x{width} is not a multiple of patch_size {p}")
        if height > self.image_size or width > self.image_size:
            raise ValueError(f"frame size {height}x{width} exceeds the tokenizer's image_size {self.image_size}")
        return 1 + (num_frames - 1) // pt, height // p, width // p

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, C, F, H, W] in [-1, 1] -> indices [B, t, h, w]."""
        return self.quantize(self.encode_features(video)).indices

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, t, h, w] -> video [B, C, 1+(t-1)*pt, h*p, w*p] (unclamped)."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be integer, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}); got [{int(indices.min())}, {int(indices.max())}]"
            )
        return self.decode_codes(self.quantizer.codes(indices.long()))

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Reconstruct: returns (video, quantizer output)."""
        q = self.quantize(self.encode_features(video))
        return self.decode_codes(q.quantized), q

    # -- stages -------------------------------------------------------------------------------

    def encode_features(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, C, F, H, W] -> continuous features [B, t, h, w, dim]."""
        if video.ndim != 5 or video.shape[1] != self.channels:
            raise ValueError(f"expected video [B, {self.channels}, F, H, W], got {tuple(video.shape)}")
        t, h, w = self.token_grid(video.shape[2], (video.shape[3], video.shape[4]))
        p, pt = self.patch_size, self.temporal_patch_size
        first = rearrange(video[:, :, :1], "b c 1 (h p1) (w p2) -> b 1 h w (c p1 p2)", p1=p, p2=p)
        tokens = self.embed_first(first)
        if t > 1:
            rest = rearrange(
                video[:, :, 1:], "b c (t pt) (h p1) (w p2) -> b t h w (c pt p1 p2)", pt=pt, p1=p, p2=p
            )
            tokens = torch.cat([tokens, self.embed_tubelet(rest)], dim=1)
        tokens = tokens + self._spatial_pos(self.pos_h, self.pos_w, h, w)
        x = self.enc_spatial(rearrange(tokens, "b t h w d -> (b t) (h w) d"))
        x = rearrange(x, "(b t) (h w) d -> (b h w) t d", t=t, h=h)
        x = self.enc_temporal(x + self._time_pos(t, x))
        return rearrange(x, "(b h w) t d -> b t h w d", h=h, w=w)

    def quantize(self, features: torch.Tensor) -> QuantizerOutput:
        return self.quantizer(self.to_code(features))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantized codes [B, t, h, w, code_dim] -> video [B, C, F, H, W]."""
        _, t, h, w, _ = codes.shape
        p, pt = self.patch_size, self.temporal_patch_size
        x = self.from_code(codes.to(self.from_code.weight.dtype))
        x = rearrange(x, "b t h w d -> (b h w) t d")
        x = self.dec_temporal(x + self._time_pos(t, x))
        x = rearrange(x, "(b h w) t d -> (b t) (h w) d", h=h, w=w)
        x = x + rearrange(self._spatial_pos(self.dec_pos_h, self.dec_pos_w, h, w), "h w d -> (h w) d")
        x = rearrange(self.dec_spatial(x), "(b t) (h w) d -> b t h w d", t=t, h=h)
        heads = [(self.head_first, x[:, :1])] + ([(self.head_tubelet, x[:, 1:])] if t > 1 else [])
        outputs = [head(inputs) for head, inputs in heads]
        if self.record_head_io and torch.is_grad_enabled():
            # For the adaptive GAN weight, which needs d loss / d head weight: sharded (FSDP2)
            # weights are not the tensors the graph used, so that gradient is rebuilt from these.
            self.head_io = [(inputs, out) for (_, inputs), out in zip(heads, outputs)]
        first = rearrange(outputs[0], "b 1 h w (c p1 p2) -> b c 1 (h p1) (w p2)", p1=p, p2=p)
        if t == 1:
            return first
        rest = rearrange(outputs[1], "b t h w (c pt p1 p2) -> b c (t pt) (h p1) (w p2)", pt=pt, p1=p, p2=p)
        return torch.cat([first, rest], dim=2)

    def head_weight_grad_norm(self, loss: torch.Tensor) -> torch.Tensor:
        """||d loss / d [head_first.weight, head_tubelet.weight]|| for the last decode with grad,
        as dL/dW = sum_n dL/dy_n x_n^T from the heads' inputs x and outputs y: exact under every
        strategy, including FSDP2 where the registered weights are shards outside the graph."""
        if not self.head_io:
            raise RuntimeError("head_weight_grad_norm needs a decode with record_head_io = True and gradients enabled")
        grads = torch.autograd.grad(loss, [out for _, out in self.head_io], retain_graph=True, allow_unused=True)
        total = loss.new_zeros((), dtype=torch.float32)
        for (inputs, _), grad in zip(self.head_io, grads):
            if grad is not None:
                weight_grad = rearrange(grad.float(), "... o -> (...) o").T @ rearrange(inputs.float(), "... i -> (...) i")
                total = total + weight_grad.square().sum()
        return total.sqrt()

    def latent_frame_mask(self, frame_mask: torch.Tensor) -> torch.Tensor:
        """Frame mask [B, F] -> latent-frame mask [B, t]: a latent frame is real when the first
        frame of its tubelet is (frame 0, then frames 1, 1+pt, 1+2pt, ...)."""
        return torch.cat([frame_mask[:, :1], frame_mask[:, 1 :: self.temporal_patch_size]], dim=1)

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _spatial_pos(pos_h: torch.Tensor, pos_w: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return pos_h[:h, None, :] + pos_w[None, :w, :]

    def _time_pos(self, t: int, like: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(torch.arange(t, device=like.device), self.dim).to(like.dtype)
