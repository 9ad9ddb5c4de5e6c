"""Metrics: FVD, CLIP similarity, PSNR/SSIM and the synthetic caption-accuracy oracle."""
