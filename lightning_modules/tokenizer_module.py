"""TokenizerModule: trains the C-ViViT tokenizer (stage 1) with a GAN, from `maskvid fit`.

The networks arrive by injection (`tokenizer`, `discriminator`); this module only holds the
training recipe: reconstruction + quantizer + optional perceptual loss, an adversarial term with an
adaptive weight switched on at `gan_start_step`, an R1 gradient penalty, warmup + cosine LR for both
optimizers, gradient clipping, an EMA copy for validation and export, and the logging.

Validation logs PSNR and SSIM (per frame, averaged), codebook usage and perplexity, and, when an
I3D file is configured, the reconstruction FVD (`val/rfvd_N`, N clips) of all ranks together.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from maskvid.lightning_modules.config_errors import ConfigMismatchError, ModelOptionError
from maskvid.lightning_modules.ema import EMA
from maskvid.lightning_modules.media import log_reconstructions
from maskvid.lightning_modules.optim import adamw, clip_grad_norm, weight_decay_groups
from maskvid.lightning_modules.parallelize import parallelize_with_strategy
from maskvid.lightning_modules.schedules import fit_warmup_cosine
from maskvid.lightning_modules.step_seed import step_seed
from maskvid.lightning_modules.video_metrics import VideoEvalMetrics
from maskvid.metrics.codebook import CodebookUsage
from maskvid.metrics.i3d import I3DWeightsError, load_i3d
from maskvid.models.config import instantiate
from maskvid.models.cvivit import CViViT
from maskvid.models.discriminator import VideoDiscriminator
from maskvid.models.perceptual import VideoFeatureLoss
from maskvid.models.tokenizer_checkpoint import CHECKPOINT_KEY, FORMAT_VERSION

_NO_DECAY = ("codebook", "pos_h", "pos_w")


class TokenizerModule(LightningModule):
    """Stage 1: learn a discrete video tokenizer."""

    def __init__(
        self,
        tokenizer: CViViT,
        discriminator: VideoDiscriminator | None = None,
        lr: float = 1e-4,
        disc_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 1e-4,
        warmup_steps: int = 500,
        min_lr_ratio: float = 0.1,
        grad_clip: float = 1.0,
        recon_loss: Literal["l1", "l2", "l1+l2"] = "l2",
        quantizer_weight: float = 1.0,
        gan_weight: float = 0.1,
        gan_start_step: int = 2000,
        adaptive_weight_max: float = 1e4,
        gp_weight: float = 10.0,
        gp_every: int = 4,
        perceptual_weight: float = 0.0,
        perceptual_path: str | None = None,
        perceptual_frames: int | None = None,
        video_perceptual_weight: float = 0.0,
        ema_decay: float | None = 0.999,
        num_log_videos: int = 4,
        log_fps: float = 8.0,
        i3d_path: str | None = None,
        compile: bool = False,
    ) -> None:
        """
        Args:
            tokenizer: The tokenizer network (C-ViViT with its quantizer).
            discriminator: Video discriminator for the adversarial loss; null trains without GAN.
            lr: Peak learning rate of the tokenizer (AdamW).
            disc_lr: Peak learning rate of the discriminator (default: lr).
            betas: AdamW betas, both optimizers.
            weight_decay: AdamW weight decay on matrices (not on norms, biases, positions, codes).
            warmup_steps: Linear LR warmup steps, then cosine decay to min_lr_ratio at max_steps.
            min_lr_ratio: Final LR as a fraction of the peak.
            grad_clip: Gradient-norm clip for both optimizers; 0 disables.
            recon_loss: Pixel loss: l1, l2 or their sum.
            quantizer_weight: Weight of the codebook + commitment loss.
            gan_weight: Base weight of the adversarial term (scaled by the adaptive weight).
            gan_start_step: Step at which the discriminator starts training and the adversarial
                term switches on (reconstruction settles first).
            adaptive_weight_max: Cap of the adaptive weight ||grad rec|| / ||grad gan|| measured
                at the decoder's output heads.
            gp_weight: R1 gradient penalty weight on real videos; 0 disables.
            gp_every: Apply the penalty every N discriminator steps (lazy regularisation, scaled
                by N so its strength is unchanged).
            perceptual_weight: Weight of the LPIPS-style perceptual loss; 0 disables it.
            perceptual_path: VGG16 weights file for the perceptual loss (required when its
                weight is > 0; nothing is downloaded).
            perceptual_frames: Real frames per clip the perceptual loss scores each step, drawn at
                random; null scores every real frame. Padded frames are never scored.
            video_perceptual_weight: Weight of the video perceptual loss: squared distance of the
                real and reconstructed clips' I3D features (Phenaki), with the I3D from i3d_path
                (a state_dict: the TorchScript detector has no gradient); 0 disables it.
            ema_decay: Decay of the EMA copy used for validation and export; null disables.
            num_log_videos: Clips shown in the reconstruction grid and mp4 each validation.
            log_fps: Frame rate of the reconstruction mp4.
            i3d_path: I3D weights (state_dict or TorchScript file, see docs/metrics.md) for the
                reconstruction FVD of the validation clips, logged as val/rfvd_N; null skips it.
                Not stored in checkpoint hyperparameters, so `maskvid validate --ckpt_path` takes
                it from the command line.
            compile: torch.compile each transformer block, after activation checkpointing and before
                sharding; applied by maskvid's strategies (launch/strategies.py).
        """
        super().__init__()
        # A checkpoint's hparams hold the networks' configs (plain data, weights_only-safe), and
        # load_from_checkpoint hands those configs back here.
        if isinstance(tokenizer, dict):
            tokenizer = instantiate(tokenizer)
        if isinstance(discriminator, dict):
            discriminator = instantiate(discriminator)
        self.save_hyperparameters(ignore=["tokenizer", "discriminator", "i3d_path"])
        self.hparams["tokenizer"] = tokenizer.config
        self.hparams["discriminator"] = discriminator.config if discriminator is not None else None
        self.automatic_optimization = False
        self.tokenizer = tokenizer
        self.discriminator = discriminator
        self.tokenizer_ema = EMA(tokenizer, ema_decay) if ema_decay is not None else None
        if perceptual_weight > 0 and not perceptual_path:
            raise ModelOptionError(
                "perceptual_path", "perceptual_weight > 0 needs perceptual_path: a local VGG16 weights file "
                "(maskvid downloads nothing). Set model.init_args.perceptual_path or perceptual_weight: 0."
            )
        if perceptual_frames is not None and perceptual_frames < 1:
            raise ModelOptionError("perceptual_frames", f"must be >= 1 or null (every frame), got {perceptual_frames}")
        # Kept out of the module tree: frozen, not checkpointed, not sharded, not optimized.
        self._perceptual: list[nn.Module] = []
        if perceptual_weight > 0:
            from maskvid.models.perceptual import PerceptualLoss, PerceptualWeightsError

            try:
                self._perceptual.append(PerceptualLoss(perceptual_path))
            except PerceptualWeightsError as exc:
                raise ModelOptionError("perceptual_path", exc) from None
        self._video_perceptual: list[nn.Module] = []
        if video_perceptual_weight > 0:
            self._video_perceptual.append(video_feature_loss(i3d_path))
        # PSNR per frame, then averaged (the video-tokenizer convention), rather than torchmetrics'
        # default of one PSNR over the pooled squared error of every frame.
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_codebook = CodebookUsage(tokenizer.vocab_size)
        # The I3D inside stays out of state_dict and sharding (see lightning_modules/video_metrics.py).
        try:
            self.val_video = VideoEvalMetrics(i3d_path=i3d_path, fvd_name="rfvd")
        except I3DWeightsError as exc:
            raise ModelOptionError("i3d_path", exc) from None
        self._media: dict[str, Any] | None = None

    # -- setup ----------------------------------------------------------------------------------

    def check_data(self, datamodule) -> None:
        """Raise ConfigMismatchError if the datamodule's clips do not fit the tokenizer (the CLI
        calls this before anything is written; setup() again inside the run)."""
        hparams = getattr(datamodule, "hparams", {})
        if "num_frames" in hparams and "resolution" in hparams:
            try:
                self.tokenizer.token_grid(hparams["num_frames"], hparams["resolution"])
            except ValueError as exc:
                raise ConfigMismatchError(
                    f"data does not fit the tokenizer (data.num_frames={hparams['num_frames']}, "
                    f"data.resolution={hparams['resolution']}): {exc}"
                ) from None

    def setup(self, stage: str) -> None:
        self.check_data(getattr(self.trainer, "datamodule", None))

    def on_fit_start(self) -> None:
        for net in self._perceptual + self._video_perceptual:
            net.to(self.device)

    def parallel_networks(self) -> list[nn.Module]:
        """What a sharding strategy shards (launch/strategies.py): generator, discriminator and
        the EMA copy, each the same way so the EMA averages matching shards."""
        ema = self.tokenizer_ema.module if self.tokenizer_ema is not None else None
        return [self.tokenizer, self.discriminator, ema]

    def configure_model(self) -> None:
        parallelize_with_strategy(self)

    def configure_optimizers(self):
        hp = self.hparams
        schedule = fit_warmup_cosine(self.trainer, hp.warmup_steps, hp.min_lr_ratio)
        groups = lambda net: weight_decay_groups(net, hp.weight_decay, _NO_DECAY)  # noqa: E731
        opt_g = adamw(groups(self.tokenizer), self.trainer, lr=hp.lr, betas=hp.betas)
        optimizers, schedulers = [opt_g], [LambdaLR(opt_g, schedule)]
        if self.discriminator is not None:
            opt_d = adamw(groups(self.discriminator), self.trainer, lr=hp.disc_lr or hp.lr, betas=hp.betas)
            optimizers.append(opt_d)
            # Stepped only once the GAN is on, so its count starts at gan_start_step.
            start = hp.gan_start_step
            schedulers.append(LambdaLR(opt_d, lambda step: schedule(step + start)))
        return optimizers, schedulers

    # -- training -------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        video, mask = batch["video"], batch.get("frame_mask")
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = self.lr_schedulers()
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        gan_on = self.discriminator is not None and self.global_step >= hp.gan_start_step

        self.tokenizer.record_head_io = gan_on  # for the adaptive weight
        recon, q = self.tokenizer(video)
        self.tokenizer.record_head_io = False
        rec = self.reconstruction_loss(recon, video, mask)
        nll = rec
        logs = {"train/recon_loss": rec.detach(), "train/quantizer_loss": q.loss.detach()}
        if self._perceptual:
            generator = torch.Generator(device=video.device).manual_seed(
                step_seed(0, self.global_rank, self.global_step))
            perceptual = self._perceptual[0](recon, video, mask, hp.perceptual_frames, generator)
            nll = nll + hp.perceptual_weight * perceptual
            logs["train/perceptual_loss"] = perceptual.detach()
        if self._video_perceptual:
            video_perceptual = self._video_perceptual[0](video, recon, mask)
            nll = nll + hp.video_perceptual_weight * video_perceptual
            logs["train/video_perceptual_loss"] = video_perceptual.detach()
        loss = nll + hp.quantizer_weight * q.loss
        if gan_on:
            self.discriminator.requires_grad_(False)
            g_loss = -self.discriminator(recon).mean()
            weight = self._adaptive_weight(nll, g_loss)
            loss = loss + hp.gan_weight * weight * g_loss
            self.discriminator.requires_grad_(True)
            logs |= {"train/g_loss": g_loss.detach(), "train/adaptive_weight": weight}

        opt_g = optimizers[0]
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        clip_grad_norm(self, opt_g, hp.grad_clip)
        opt_g.step()
        self.tokenizer.quantizer.restart_dead_codes()
        schedulers[0].step()
        if self.tokenizer_ema is not None:
            self.tokenizer_ema.update(self.tokenizer)

        if gan_on:
            logs |= self._discriminator_step(optimizers[1], video, recon.detach())
            schedulers[1].step()

        logs |= {
            "train/loss": loss.detach(),
            "train/perplexity": q.perplexity,
            "train/codebook_usage": torch.tensor(self.tokenizer.quantizer.window_usage()),
            "train/lr": torch.tensor(schedulers[0].get_last_lr()[0]),
        }
        self.log_dict(logs, prog_bar=False, batch_size=len(video))
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss.detach()

    def reconstruction_loss(
        self, recon: torch.Tensor, video: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pixel loss over the real (unpadded) frames of each clip."""
        diff = recon.float() - video.float()
        kind = self.hparams.recon_loss
        if kind == "l1":
            per_pixel = diff.abs()
        elif kind == "l2":
            per_pixel = diff.square()
        else:
            per_pixel = diff.abs() + diff.square()
        if mask is None:
            return per_pixel.mean()
        weight = mask.to(per_pixel.dtype)[:, None, :, None, None]
        denom = weight.sum() * per_pixel.shape[1] * per_pixel.shape[3] * per_pixel.shape[4]
        return (per_pixel * weight).sum() / denom.clamp(min=1)

    def _adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        """||d nll / d W_last|| / ||d g_loss / d W_last|| (VQGAN), capped, no gradient."""
        try:
            norm_nll = self.tokenizer.head_weight_grad_norm(nll)
            norm_gan = self.tokenizer.head_weight_grad_norm(g_loss)
        finally:
            self.tokenizer.head_io = []
        return (norm_nll / (norm_gan + 1e-4)).clamp(0.0, self.hparams.adaptive_weight_max).detach()

    def _discriminator_step(self, opt_d, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        penalise = hp.gp_weight > 0 and self.global_step % hp.gp_every == 0
        real = real.detach().requires_grad_(penalise)
        logits_real = self.discriminator(real)
        logits_fake = self.discriminator(fake)
        d_loss = F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()
        logs = {
            "train/d_loss": d_loss.detach(),
            "train/logits_real": logits_real.detach().mean(),
            "train/logits_fake": logits_fake.detach().mean(),
        }
        if penalise:
            (grad,) = torch.autograd.grad(logits_real.sum(), real, create_graph=True)
            r1 = grad.float().square().flatten(1).sum(1).mean()
            d_loss = d_loss + 0.5 * hp.gp_weight * hp.gp_every * r1
            logs["train/r1"] = r1.detach()
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        clip_grad_norm(self, opt_d, hp.grad_clip)
        _step_uncounted(opt_d)
        return logs

    # -- validation -----------------------------------------------------------------------------

    @property
    def eval_tokenizer(self) -> CViViT:
        """The network validation and export use: the EMA copy when there is one."""
        return self.tokenizer_ema.module if self.tokenizer_ema is not None else self.tokenizer

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        video, mask = batch["video"], batch.get("frame_mask")
        recon, q = self.eval_tokenizer(video)
        self.log("val/recon_loss", self.reconstruction_loss(recon, video, mask), sync_dist=True, batch_size=len(video))
        frames_real, frames_recon = _valid_frames(video, mask), _valid_frames(recon.clamp(-1, 1), mask)
        self.val_psnr.update(frames_recon, frames_real)
        self.val_ssim.update(frames_recon, frames_real)
        self.val_codebook.update(q.indices)
        self.val_video.update_real(video)
        self.val_video.update_generated(recon.clamp(-1, 1))
        if batch_idx == 0 and self.trainer.is_global_zero and self.hparams.num_log_videos > 0:
            n = self.hparams.num_log_videos
            self._media = {"real": video[:n], "recon": recon[:n], "captions": list(batch.get("caption", []))[:n]}

    def on_validation_epoch_end(self) -> None:
        self.log("val/psnr", self.val_psnr.compute(), sync_dist=False)
        self.log("val/ssim", self.val_ssim.compute(), sync_dist=False)
        usage = self.val_codebook.compute()
        self.log("val/codebook_usage", usage["usage"].float())
        self.log("val/perplexity", usage["perplexity"].float())
        # Already over all ranks (torchmetrics syncs in compute), so no sync_dist.
        video_logs = self.val_video.compute("val/")
        if video_logs:
            self.log_dict(video_logs)
        for metric in (self.val_psnr, self.val_ssim, self.val_codebook, self.val_video):
            metric.reset()
        if self._media is not None and not self.trainer.sanity_checking:
            log_reconstructions(self.trainer, fps=self.hparams.log_fps, **self._media)
        self._media = None

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    # -- checkpoints ----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Everything `maskvid.models.tokenizer_checkpoint.load_tokenizer` needs, without Lightning.
        checkpoint[CHECKPOINT_KEY] = {
            "format": FORMAT_VERSION,
            "config": self.tokenizer.config,
            "prefix": "tokenizer_ema.module." if self.tokenizer_ema is not None else "tokenizer.",
        }


def _valid_frames(video: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, C, T, H, W] in [-1, 1] -> the real frames [N, C, H, W] in [0, 1]."""
    frames = video.float().add(1).div(2).transpose(1, 2)  # b t c h w
    frames = frames[mask.bool()] if mask is not None else frames.flatten(0, 1)
    return frames.clamp(0, 1)



def _step_uncounted(optimizer) -> None:
    """Step a LightningOptimizer without advancing `trainer.global_step`.

    Lightning counts every manual optimizer.step() as a global step; the discriminator's update
    belongs to the same training step as the generator's, and `max_steps`, checkpoint intervals
    and the LR schedule must keep counting batches whether the GAN is on or not.
    """
    before, after = optimizer._on_before_step, optimizer._on_after_step
    optimizer._on_before_step = optimizer._on_after_step = lambda: None
    try:
        optimizer.step()
    finally:
        optimizer._on_before_step, optimizer._on_after_step = before, after


def video_feature_loss(i3d_path: str | None) -> nn.Module:
    """The video perceptual loss on the I3D in `i3d_path`; ModelOptionError when it cannot be one."""
    if not i3d_path:
        raise ModelOptionError("i3d_path", "video_perceptual_weight > 0 needs i3d_path: a local I3D state_dict "
                               "(maskvid downloads nothing). Set model.init_args.i3d_path or video_perceptual_weight: 0.")
    try:
        features = load_i3d(i3d_path)
    except I3DWeightsError as exc:
        raise ModelOptionError("i3d_path", exc) from None
    if features.torchscript:
        raise ModelOptionError("i3d_path", f"{i3d_path} is a TorchScript I3D, which takes uint8 pixels and gives no "
                               "gradient; the video perceptual loss needs an I3D state_dict (docs/metrics.md)")
    return VideoFeatureLoss(features.network, resolution=features.resolution)
