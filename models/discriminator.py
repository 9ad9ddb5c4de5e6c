"""A 3D convolutional (video) patch discriminator for the tokenizer's adversarial loss.

Strided 3D convolutions see motion as well as appearance, so the generator is pushed towards
temporally coherent reconstructions, not just sharp frames. No normalisation layers: the
gradient penalty (R1) regularises it instead, as in StyleGAN2.
"""

from __future__ import annotations

import torch
from torch import nn

from maskvid.models.config import module_config


class VideoDiscriminator(nn.Module):
    """Video [B, C, F, H, W] -> patch logits [B, 1, f, h, w]."""

    # FSDP2 replicates it (data parallel, fp32) rather than sharding it: the R1 penalty's double
    # backward needs the gathered weights again after FSDP has freed them. It is small.
    replicate_under_fsdp = True

    def __init__(
        self,
        channels: int = 3,
        base_channels: int = 32,
        max_channels: int = 256,
        num_downsamples: int = 3,
        temporal_downsamples: int = 2,
    ) -> None:
        """
        Args:
            channels: Pixel channels.
            base_channels: Width of the first convolution; doubles after each downsample.
            max_channels: Width cap.
            num_downsamples: Spatial stride-2 stages (the patch each logit sees grows with it).
            temporal_downsamples: How many of those stages also halve time.
        """
        super().__init__()
        self.config = module_config(self, locals())
        layers: list[nn.Module] = [nn.Conv3d(channels, base_channels, 3, padding=1), nn.LeakyReLU(0.2)]
        width = base_channels
        for i in range(num_downsamples):
            out = min(width * 2, max_channels)
            stride_t = 2 if i < temporal_downsamples else 1
            layers += [
                nn.Conv3d(width, out, kernel_size=(3, 4, 4), stride=(stride_t, 2, 2), padding=1),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv3d(width, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        # A bf16 reconstruction (FSDP2's mixed precision) meets fp32 weights here; autocast,
        # where it is on, still picks the compute dtype.
        return self.net(video.to(next(self.parameters()).dtype))
