"""MaskedVideoModule: stage 2, text-conditioned masked video-token modelling (Phenaki / MeBT), or
unconditional (MeBT's paper setting) with `text_encoder: null` and a backbone with `text_dim: null`.

The backbone arrives by injection (`class_path` in YAML: MaskGITBackbone, MeBT, ...); the frozen
stage-1 tokenizer comes from its checkpoint and the frozen text encoder by name. Batches are either
video clips (tokenized on the fly) or token-shard samples (tokens + cached text embeddings): the
module takes whichever it is given.

Validation logs the masked-token loss and accuracy, then generates `num_val_videos` videos per rank
from the val captions and logs, over all ranks: FVD against the real val clips (`val/fvd_N`, N
generated videos; when an I3D file is set), CLIPSIM (when a CLIP directory is set), caption
accuracy (oracle-read, when the prompts are the synthetic dataset's) and rank 0's videos as media.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import torch
from einops import rearrange
from lightning.pytorch import LightningModule
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from maskvid.lightning_modules.config_errors import ConfigMismatchError, ModelOptionError
from maskvid.lightning_modules import length_curriculum as curriculum
from maskvid.lightning_modules.ema import EMA
from maskvid.lightning_modules.optim import adamw, clip_grad_norm, weight_decay_groups
from maskvid.lightning_modules.parallelize import parallelize_with_strategy
from maskvid.lightning_modules.schedules import fit_warmup_cosine
from maskvid.lightning_modules.step_seed import step_seed
from maskvid.lightning_modules.video_metrics import VideoEvalMetrics
from maskvid.metrics.caption_accuracy import target_attributes
from maskvid.metrics.clip_model import CLIPLoadError
from maskvid.metrics.i3d import I3DWeightsError
from maskvid.models.config import instantiate
from maskvid.models.losses import token_cross_entropy
from maskvid.models import mask_schedules
from maskvid.models.sampling import SamplingOptionError, SamplingOptions, sample_tokens
from maskvid.models.stage2_checkpoint import STAGE2_KEY, STAGE2_FORMAT
from maskvid.models.text_encoder import TextEncoder
from maskvid.models.tokenizer_checkpoint import TokenizerCheckpointError
from maskvid.video_tokenizer import load_tokenizer

_NO_DECAY = ("token_emb.weight", "pos_t", "pos_h", "pos_w", "null", "latents", "context_start")
# What a text-conditioned model defaults to; an unconditional one has no caption to drop or guide by.
_TEXT_DROP_PROB, _CFG_SCALE = 0.1, 3.0
# Validation-only settings: kept out of checkpoint hyperparameters, because LightningCLI lets a
# checkpoint's hyperparameters override the command line, and `maskvid validate --ckpt_path`
# must be able to switch metrics on or change how many videos they use.
_EVAL_OPTIONS = ("num_val_videos", "num_log_videos", "val_sample_batch_size", "i3d_path", "fvd_real_stats",
                 "clip_path", "caption_accuracy")


class MaskedVideoModule(LightningModule):
    """Stage 2: learn p(video tokens | text), or p(video tokens), by masked-token prediction."""

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer_path: str,
        text_encoder: str | None = "packaged:minilm",
        text_max_length: int = 32,
        text_encoder_dtype: Literal["fp32", "bf16"] = "fp32",
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.05,
        warmup_steps: int = 500,
        min_lr_ratio: float = 0.1,
        grad_clip: float = 1.0,
        text_drop_prob: float | None = None,
        length_curriculum: list[tuple[int, int]] | None = None,
        curriculum_window: Literal["prefix", "random"] = "prefix",
        curriculum_spread: float = 0.0,
        label_smoothing: float = 0.0,
        mask_schedule: str = "cosine",
        min_mask_rate: float = 0.0,
        ema_decay: float | None = 0.999,
        sample_steps: int = 18,
        cfg_scale: float | None = None,
        temperature: float = 1.0,
        sample_noise: float = 4.5,
        cfg_schedule: str = "constant",
        top_k: int | None = None,
        refine_steps: int = 0,
        refine_ratio: float = 0.25,
        sampler: Literal["maskgit", "draft_revise"] = "maskgit",
        sample_schedule: str = "cosine",
        bootstrap_steps: int = 0,
        revise_sweeps: int = 2,
        revise_partitions: int = 4,
        revise_temperature: float = 0.7,
        revise_top_k: int | None = None,
        val_prompts: list[str] | None = None,
        num_val_videos: int = 4,
        num_log_videos: int = 4,
        val_sample_batch_size: int = 8,
        i3d_path: str | None = None,
        fvd_real_stats: str | None = None,
        clip_path: str | None = None,
        caption_accuracy: bool | None = None,
        log_fps: float = 8.0,
        mask_seed: int = 0,
        prefix_prob: float = 0.0,
        compile: bool = False,
    ) -> None:
        """
        Args:
            backbone: The stage-2 network (e.g. maskvid.models.maskgit.MaskGITBackbone, maskvid.models.mebt.MeBT).
            tokenizer_path: Stage-1 checkpoint (file or sharded directory) or a `maskvid ckpt export`
                directory. Its frozen tokenizer is stored in this module's checkpoints, so
                generation needs no other file.
            text_encoder: Frozen text encoder: a local directory, a cached hub name (T5 or any
                AutoModel) or `packaged:minilm`; null trains an unconditional model (the backbone's
                text_dim must be null too; captions in batches are ignored; no CFG).
            text_max_length: Caption length in tokens (padding/truncation).
            text_encoder_dtype: The frozen text encoder's weights: bf16 halves a large T5's memory
                on every GPU; its embeddings reach the backbone in fp32 either way.
            lr: Peak AdamW learning rate.
            betas: AdamW betas.
            weight_decay: AdamW weight decay on matrices.
            warmup_steps: Linear warmup steps, then cosine decay to min_lr_ratio at max_steps.
            min_lr_ratio: Final LR as a fraction of the peak.
            grad_clip: Gradient-norm clip; 0 disables.
            text_drop_prob: Probability of training a clip without its caption (for CFG); default
                0.1. Unconditional models have no caption: leave it unset (or 0).
            length_curriculum: [[step, latent_frames], ...]: from each step on, train on the first
                `latent_frames` latent frames of every clip (MeBT's recipe for long videos: short
                clips first). Steps ascending; null trains on whole clips.
            curriculum_window: "prefix": the first latent frames of each clip; "random": a window
                at a random start, its length drawn around the curriculum's (MeBT's official
                recipe; lightning_modules/length_curriculum.py).
            curriculum_spread: "random" windows: width in latent frames of the Gaussian prior over
                lengths around the curriculum's; 0 takes its length exactly.
            label_smoothing: Cross-entropy label smoothing.
            mask_schedule: Training masking rate as a function of u ~ U[0, 1): "cosine",
                "linear" (MeBT's official) or "power:E" (models/mask_schedules.py).
            min_mask_rate: Floor on each clip's masking rate.
            ema_decay: Decay of the EMA copy used for validation, sampling and export; null disables.
            sample_steps: MaskGIT steps for validation samples (and the default for generate).
            cfg_scale: Classifier-free guidance scale for validation samples (and generate); default
                3.0. Unconditional models cannot be guided: leave it unset (or 1).
            temperature: Sampling temperature.
            sample_noise: Initial scale of the Gumbel noise on the re-masking confidences, annealed
                to 0 over the steps (MaskGIT's choice temperature; lower commits more greedily).
            cfg_schedule: Guidance over the sampling steps: "constant" (cfg_scale throughout) or
                "linear" (from 1 up to cfg_scale at the last step).
            top_k: Sample tokens among the k most likely only (null: all).
            refine_steps: Refinement rounds after the sampling steps: each re-masks refine_ratio
                of the generated tokens at random and predicts them again from the rest.
            refine_ratio: Fraction of the tokens re-masked per refinement round.
            sampler: "maskgit" (the steps, then the refinement rounds) or "draft_revise" (MeBT's:
                the steps make a draft, then revise sweeps; models/draft_revise.py).
            sample_schedule: Fraction kept masked after each sampling step: "cosine", "linear" or
                "power:E".
            bootstrap_steps: draft_revise: steps before the draft that commit one random token each.
            revise_sweeps: draft_revise: sweeps that each re-predict every generated token once.
            revise_partitions: draft_revise: random parts per sweep (one forward each).
            revise_temperature: draft_revise: temperature of the revise sweeps.
            revise_top_k: draft_revise: revise among the k most likely tokens (null: all).
            val_prompts: Prompts for the validation samples, dealt out over the ranks and repeated to
                fill num_val_videos per rank (default: the val captions each rank sees).
            num_val_videos: Videos generated per rank at each validation; the metrics use those of
                all ranks (FVD_N names N = ranks x this). 0 generates nothing.
            num_log_videos: How many of rank 0's generated videos are logged as media.
            val_sample_batch_size: Videos generated at once during validation.
            i3d_path: I3D weights (state_dict or TorchScript file, see docs/metrics.md) for FVD
                of the generated videos against the real val clips, logged as val/fvd_N; null skips FVD.
            fvd_real_stats: Cached real-video statistics (`maskvid eval real-stats`) to compare with
                instead of the val clips (needed on token shards, which hold no pixels).
            clip_path: Local Hugging Face CLIP directory for CLIPSIM (val/clipsim: mean over frames
                of the raw cosine with the prompt); null skips it.
            caption_accuracy: Oracle-read caption accuracy (val/caption_acc/*) of the generated
                videos. null: only when every prompt names synthetic attributes (the synthetic
                dataset); true: on the prompts that do; false: never.
            log_fps: Frame rate of the logged mp4s.
            mask_seed: Seed of the training masks and caption drops. They are drawn from
                (mask_seed, rank, step), so a resumed run masks exactly as an uninterrupted one.
            prefix_prob: Fraction of training clips whose first K latent frames (K from 1 to the
                clip's latent frames - 1) are given unmasked, as generation from given frames, story
                scenes and sliding windows prime them; the loss counts only masked positions.
            compile: torch.compile each backbone block, after activation checkpointing and before
                sharding; applied by maskvid's strategies (launch/strategies.py).
        """
        super().__init__()
        if isinstance(backbone, dict):  # from a checkpoint's hparams
            backbone = instantiate(backbone)
        _check_conditioning(text_encoder, text_drop_prob, cfg_scale, clip_path, caption_accuracy)
        curriculum.check(length_curriculum, curriculum_window, curriculum_spread)
        mask_schedules.check(mask_schedule, min_mask_rate)
        if not 0.0 <= prefix_prob <= 1.0:
            raise ModelOptionError("prefix_prob", f"must be in [0, 1], got {prefix_prob}")
        self.save_hyperparameters(ignore=["backbone", *_EVAL_OPTIONS])
        self.hparams["backbone"] = backbone.config
        try:
            self.sampling_options().check()
        except SamplingOptionError as exc:  # e.g. temperature 0: fail at startup, not at the first validation
            raise ModelOptionError({"steps": "sample_steps", "noise": "sample_noise", "schedule": "sample_schedule"}.get(exc.field, exc.field), exc) from None
        self.backbone = backbone
        self.backbone_ema = EMA(backbone, ema_decay) if ema_decay is not None else None
        try:
            self.tokenizer = load_tokenizer(tokenizer_path)
        except TokenizerCheckpointError as exc:
            raise ModelOptionError("tokenizer_path", exc) from None
        # Frozen, reloaded by name, kept out of checkpoints, sharding and the optimizer.
        self._text_encoder: list[TextEncoder | None] = [
            TextEncoder(text_encoder, text_max_length, text_encoder_dtype) if text_encoder is not None else None]
        self._check_compatible()
        self.num_val_videos = num_val_videos
        self.num_log_videos = num_log_videos
        self.val_sample_batch_size = max(1, val_sample_batch_size)
        # FVD, CLIPSIM, caption accuracy; their networks stay out of checkpoints and sharding.
        try:
            self.val_video = VideoEvalMetrics(i3d_path=i3d_path, fvd_real_stats=fvd_real_stats, clip_path=clip_path,
                                              caption_accuracy=caption_accuracy)
        except I3DWeightsError as exc:
            raise ModelOptionError("i3d_path", exc) from None
        except CLIPLoadError as exc:
            raise ModelOptionError("clip_path", exc) from None
        self._val_prompts: list[tuple[str, dict[str, str] | None]] = []

    # -- wiring ---------------------------------------------------------------------------------

    @property
    def text_encoder(self) -> TextEncoder | None:
        """None for an unconditional model."""
        return self._text_encoder[0]

    @property
    def unconditional(self) -> bool:
        return self.hparams.text_encoder is None

    @property
    def sampling_backbone(self) -> nn.Module:
        return self.backbone_ema.module if self.backbone_ema is not None else self.backbone

    def _check_compatible(self) -> None:
        vocab_backbone, vocab_tokenizer = self.backbone.vocab_size, self.tokenizer.vocab_size
        if vocab_backbone != vocab_tokenizer:
            raise ConfigMismatchError(
                f"vocabulary mismatch: the backbone predicts {vocab_backbone} token ids but the tokenizer "
                f"({self.hparams.tokenizer_path}) has {vocab_tokenizer} codes. Set "
                f"model.init_args.backbone.init_args.vocab_size: {vocab_tokenizer}."
            )
        # A backbone that does not say (no text_dim attribute) is taken to match the text encoder.
        backbone_text = getattr(self.backbone, "text_dim", None if self.unconditional else self.text_encoder.dim)
        if self.unconditional and backbone_text is not None:
            raise ConfigMismatchError(
                "text_encoder is null (unconditional) but the backbone has a text path: set "
                "model.init_args.backbone.init_args.text_dim: null")
        if not self.unconditional and backbone_text is None:
            raise ConfigMismatchError(
                "the backbone is unconditional (text_dim null) but a text encoder is set: set "
                "model.init_args.text_encoder: null, or give the backbone a text_dim")
        if self.unconditional:
            return
        if getattr(self.backbone, "text_dim", self.text_encoder.dim) != self.text_encoder.dim:
            raise ConfigMismatchError(
                f"text width mismatch: the backbone expects {self.backbone.text_dim}-d text embeddings but "
                f"{self.hparams.text_encoder} gives {self.text_encoder.dim}-d. Set backbone text_dim: {self.text_encoder.dim}."
            )

    def token_grid(self, num_frames: int, resolution: int) -> tuple[int, int, int]:
        try:
            grid = self.tokenizer.token_grid(num_frames, resolution)
            self.backbone.check_grid(grid)
        except ValueError as exc:
            raise ConfigMismatchError(
                f"data does not fit the models (data.num_frames={num_frames}, data.resolution={resolution}): {exc}"
            ) from None
        return grid

    def check_data(self, datamodule) -> None:
        """Raise ConfigMismatchError if the datamodule's clips do not fit (the CLI calls this
        before anything is written; setup() again inside the run)."""
        hparams = getattr(datamodule, "hparams", {})
        if "num_frames" in hparams and "resolution" in hparams:
            self.grid = self.token_grid(hparams["num_frames"], hparams["resolution"])

    def setup(self, stage: str) -> None:
        self.check_data(getattr(self.trainer, "datamodule", None))

    def on_fit_start(self) -> None:
        if self.text_encoder is not None:
            self.text_encoder.to(self.device)

    def on_validation_start(self) -> None:
        if self.text_encoder is not None:
            self.text_encoder.to(self.device)

    # -- batches --------------------------------------------------------------------------------

    @torch.no_grad()
    def batch_tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """-> (tokens [B,t,h,w], text [B,L,D], text_mask [B,L], valid latent frames [B,t]); text and
        text_mask are None for an unconditional model, which ignores the batch's captions."""
        if "tokens" in batch:
            tokens = batch["tokens"].long()
            if int(tokens.max()) >= self.backbone.vocab_size or int(tokens.min()) < 0:
                raise ConfigMismatchError(
                    f"token shards hold ids up to {int(tokens.max())}, beyond the vocabulary "
                    f"({self.backbone.vocab_size}): they were made with another tokenizer"
                )
            latent_valid = batch.get("latent_mask")
            expected_grid = getattr(self, "grid", None)
            if expected_grid is not None and tuple(tokens.shape[1:]) != tuple(expected_grid):
                raise ConfigMismatchError(
                    f"token shards hold a {tuple(tokens.shape[1:])} token grid but data.num_frames/resolution "
                    f"give {tuple(expected_grid)}: set them to the values the shards were tokenized with"
                )
        else:
            tokens = self.tokenizer.encode(batch["video"])
            latent_valid = None
            if batch.get("frame_mask") is not None:
                latent_valid = self.tokenizer.latent_frame_mask(batch["frame_mask"])[:, : tokens.shape[1]]
        if latent_valid is None:
            latent_valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if self.unconditional:
            return tokens, None, None, latent_valid.bool()
        if "text_emb" in batch:
            text, text_mask = batch["text_emb"].float(), batch["text_mask"].bool()
            expected = getattr(self.backbone, "text_dim", text.shape[-1])
            if text.shape[-1] != expected:
                raise ConfigMismatchError(
                    f"token shards hold {text.shape[-1]}-d text embeddings but the backbone takes {expected}-d: "
                    f"they were made with another text encoder than {self.hparams.text_encoder}"
                )
        else:
            text, text_mask = self.text_encoder(batch["caption"])
        return tokens, text.to(self.device), text_mask.to(self.device), latent_valid.bool()

    def random_mask(self, valid: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per clip, mask the mask_schedule's fraction (at least one) of the valid positions.

        valid: bool [B, N] -> bool [B, N], True = masked.
        """
        b, n = valid.shape
        u = torch.rand(b, generator=generator, device=valid.device)
        count = valid.sum(dim=1)
        ratio = mask_schedules.mask_fraction(self.hparams.mask_schedule, u, self.hparams.min_mask_rate)
        num_masked = torch.ceil(ratio * count).clamp(min=1).long()
        scores = torch.rand(b, n, generator=generator, device=valid.device).masked_fill(~valid, 2.0)
        rank = scores.argsort(dim=1).argsort(dim=1)
        return (rank < num_masked[:, None]) & valid

    @staticmethod
    def prefix_mask(latent_valid: torch.Tensor, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Which latent frames are given (never masked): for a `prob` fraction of clips, the first K,
        K uniform in 1..(the clip's real latent frames - 1), so that something is left to predict.

        latent_valid: bool [B, t] -> bool [B, t], True = given.
        """
        b, t = latent_valid.shape
        frames = latent_valid.sum(dim=1)
        chosen = torch.rand(b, generator=generator, device=latent_valid.device) < prob
        u = torch.rand(b, generator=generator, device=latent_valid.device)
        k = 1 + (u * (frames - 1).clamp(min=0)).long().clamp(max=(frames - 2).clamp(min=0))
        k = torch.where(chosen & (frames > 1), k, torch.zeros_like(k))
        return torch.arange(t, device=latent_valid.device)[None] < k[:, None]

    def curriculum_frames(self, step: int) -> int | None:
        """Latent frames trained on at `step` under the length curriculum (None: whole clips)."""
        return curriculum.scheduled_length(self.hparams.length_curriculum, step)

    def curriculum_cut(self, step: int, latent_valid: torch.Tensor) -> tuple[int, int] | None:
        """(start, length) of the latent frames trained on at `step` (None: whole clips)."""
        hp = self.hparams
        cut = curriculum.window(hp.length_curriculum, step, latent_valid.shape[1], hp.curriculum_window,
                                hp.curriculum_spread, hp.mask_seed, self.global_rank)
        if cut is None:
            return None
        # Keep a real frame in every clip: a window past a short clip's end would be all padding.
        shortest = int(latent_valid.sum(dim=1).min())
        return min(cut[0], max(0, shortest - cut[1])), cut[1]

    def masked_loss(
        self,
        backbone: nn.Module,
        batch: dict,
        generator: torch.Generator | None = None,
        drop_prob: float = 0.0,
        max_latent_frames: int | None = None,
        curriculum_step: int | None = None,
        prefix_prob: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """max_latent_frames: train on that prefix; curriculum_step: on the length curriculum's cut at
        that step; prefix_prob: the fraction of clips whose first latent frames are given (prefix_mask)."""
        tokens, text, text_mask, latent_valid = self.batch_tokens(batch)
        cut = self.curriculum_cut(curriculum_step, latent_valid) if curriculum_step is not None else None
        if cut is not None:
            start, length = cut
            tokens, latent_valid = tokens[:, start : start + length], latent_valid[:, start : start + length]
        if max_latent_frames is not None:
            # From the start: a C-ViViT clip's first latent frame is the image-like one.
            tokens, latent_valid = tokens[:, :max_latent_frames], latent_valid[:, :max_latent_frames]
        b, t, h, w = tokens.shape
        valid = rearrange(latent_valid[:, :, None, None].expand(b, t, h, w), "b t h w -> b (t h w)")
        maskable = valid
        if prefix_prob > 0:
            given = self.prefix_mask(latent_valid, prefix_prob, generator)
            maskable = valid & ~rearrange(given[:, :, None, None].expand(b, t, h, w), "b t h w -> b (t h w)")
        masked = self.random_mask(maskable, generator)
        flat = rearrange(tokens, "b t h w -> b (t h w)")
        inputs = torch.where(masked, torch.full_like(flat, backbone.mask_id), flat)
        # Drawn even when unused (unconditional), so the masks' random stream is the same either way.
        drop = torch.rand(b, generator=generator, device=tokens.device) < drop_prob
        if text is None:
            drop = None
        # Logits of the masked positions only (row-major, the order of flat[masked]): the head and
        # the [B, N, V] tensor for observed positions would be wasted memory and compute.
        # The padding (repeated last frames of short clips and images) is hidden from the backbone:
        # visible copies of the answer would let it skip the caption.
        logits = backbone(rearrange(inputs, "b (t h w) -> b t h w", t=t, h=h), text, text_mask, drop_text=drop,
                          masked_only=True, valid=latent_valid)
        target = flat[masked]
        # F.cross_entropy's value and gradient, with a backward that reuses its buffer (models/losses.py).
        loss = token_cross_entropy(logits, target, label_smoothing=self.hparams.label_smoothing)
        # max(...).indices, not argmax: the same index, faster on a CPU (models/sampling.py).
        accuracy = (logits.detach().max(dim=-1).indices == target).float().mean()
        return {"loss": loss, "accuracy": accuracy, "mask_ratio": masked.sum() / valid.sum().clamp(min=1), "latent_frames": t}

    # -- training -------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Its own generator, seeded as StepSeed seeds the global ones: a resumed run masks as the
        # uninterrupted one did, and ranks mask differently.
        generator = torch.Generator(device=self.device).manual_seed(
            step_seed(self.hparams.mask_seed, self.global_rank, self.global_step))
        out = self.masked_loss(self.backbone, batch, generator=generator, drop_prob=self.text_drop_prob,
                               curriculum_step=self.global_step, prefix_prob=self.hparams.get("prefix_prob", 0.0))
        if self.hparams.length_curriculum or self.hparams.curriculum_spread > 0:
            self.log("train/latent_frames", float(out["latent_frames"]))
        size = len(batch["caption"]) if "caption" in batch else None
        self.log_dict(
            {"train/loss": out["loss"], "train/masked_accuracy": out["accuracy"], "train/mask_ratio": out["mask_ratio"]},
            batch_size=size,
        )
        self.log("loss", out["loss"], prog_bar=True, logger=False, batch_size=size)
        return out["loss"]

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Not in on_train_batch_end: ModelCheckpoint's batch-end hook runs before the module's, and
        # its checkpoint would lack this step's EMA update (a resume would drift from the average).
        if self.backbone_ema is not None:
            self.backbone_ema.update(self.backbone)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_grad_norm(self, optimizer, gradient_clip_val or self.hparams.grad_clip)

    def parallel_networks(self) -> list[nn.Module]:
        """What a sharding strategy shards: the trainable backbone and its EMA copy. The frozen
        tokenizer and text encoder stay whole on every rank (launch/strategies.py)."""
        return [self.backbone, self.backbone_ema.module if self.backbone_ema is not None else None]

    def configure_model(self) -> None:
        parallelize_with_strategy(self)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = adamw(weight_decay_groups(self.backbone, hp.weight_decay, _NO_DECAY), self.trainer, lr=hp.lr,
                          betas=hp.betas)
        scheduler = LambdaLR(optimizer, fit_warmup_cosine(self.trainer, hp.warmup_steps, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation -----------------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # A fixed mask per batch, so validation losses are comparable across evaluations.
        generator = torch.Generator(device=self.device).manual_seed(1000 + batch_idx)
        out = self.masked_loss(self.sampling_backbone, batch, generator=generator)
        size = len(batch["caption"]) if "caption" in batch else None
        self.log("val/loss", out["loss"], sync_dist=True, batch_size=size)
        self.log("val/masked_accuracy", out["accuracy"], sync_dist=True, batch_size=size)
        if "video" in batch:
            self.val_video.update_real(batch["video"])
        if self.hparams.val_prompts or self.unconditional:
            return
        infos = batch.get("meta", {}).get("info") or []
        for i, caption in enumerate(batch.get("caption", [])):
            if len(self._val_prompts) >= self.num_val_videos:
                break
            self._val_prompts.append((caption, target_attributes(caption, infos[i] if i < len(infos) else None)))

    def on_validation_epoch_start(self) -> None:
        self._val_prompts = []

    def _rank_prompts(self, local: list[tuple[str, dict | None]]) -> list[tuple[str, dict | None]]:
        """This rank's num_val_videos (prompt, attributes). Every rank gets exactly that many, so
        that sharded backbones run the same collectives on every rank while sampling."""
        n = self.num_val_videos
        if self.hparams.val_prompts:
            pool = [(p, target_attributes(p)) for p in self.hparams.val_prompts]
        else:
            pool = local
            if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
                # A rank may have seen fewer captions (or none): deal from the union.
                parts: list[Any] = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(parts, local)
                pool = [item for part in parts for item in part]
        if not pool:
            return []
        start = self.global_rank * n
        return [pool[(start + i) % len(pool)] for i in range(n)]

    def on_validation_epoch_end(self) -> None:
        local, self._val_prompts = self._val_prompts, []
        if self.trainer.sanity_checking or self.num_val_videos <= 0 or not hasattr(self, "grid"):
            self.val_video.reset()
            return
        # Unconditional: num_val_videos samples, labelled for the media log only.
        mine = ([(f"unconditional {i}", None) for i in range(self.num_val_videos)] if self.unconditional
                else self._rank_prompts(local))
        if not mine:
            self.val_video.reset()
            return
        shown: list[torch.Tensor] = []
        step = self.val_sample_batch_size
        for chunk, start in enumerate(range(0, len(mine), step)):
            part = mine[start : start + step]
            prompts = [p for p, _ in part]
            # Ranks and chunks sample with different noise; the same run samples the same again.
            seed = step_seed(0, self.global_rank, chunk)
            if self.unconditional:
                video = self.generate(None, self.grid, seed=seed, num_videos=len(part))
                self.val_video.update_generated(video)
            else:
                video = self.generate(prompts, self.grid, seed=seed)
                self.val_video.update_generated(video, prompts, [a for _, a in part])
            if self.trainer.is_global_zero and len(shown) < self.num_log_videos:
                shown.extend(video[: self.num_log_videos - len(shown)].cpu())
        logs = self.val_video.compute("val/")  # collective: every rank gets here
        self.val_video.reset()
        if logs:
            self.log_dict(logs)
        if shown:
            from maskvid.lightning_modules.media import log_samples

            log_samples(self.trainer, torch.stack(shown), [p for p, _ in mine[: len(shown)]], fps=self.hparams.log_fps)

    # -- sampling -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self, prompts: list[str] | None, grid: tuple[int, int, int], seed: int = 0,
        options: SamplingOptions | None = None, num_videos: int | None = None,
    ) -> torch.Tensor:
        """prompts -> videos [B, C, F, H, W] in [-1, 1] (EMA backbone). An unconditional model takes
        no prompts (None) and makes num_videos videos."""
        options = options or self.sampling_options()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        backbone = self.sampling_backbone
        if self.unconditional:
            if prompts is not None:
                raise ValueError("this model is unconditional (text_encoder: null): pass num_videos, not prompts")
            tokens = sample_tokens(backbone, grid, None, None, options, generator, batch_size=num_videos or 1)
            return self.tokenizer.decode(tokens).clamp(-1, 1)
        text, text_mask = self.text_encoder(prompts)
        tokens = sample_tokens(backbone, grid, text.to(self.device), text_mask.to(self.device), options, generator)
        return self.tokenizer.decode(tokens).clamp(-1, 1)

    def sampling_options(self) -> SamplingOptions:
        """The configured sampler (validation samples, and `maskvid generate`'s defaults)."""
        hp = self.hparams  # save_hyperparameters records every __init__ argument, defaults included
        return SamplingOptions(
            steps=hp.sample_steps, cfg_scale=self.cfg_scale, temperature=hp.temperature, noise=hp.sample_noise,
            cfg_schedule=hp.cfg_schedule, top_k=hp.top_k, refine_steps=hp.refine_steps, refine_ratio=hp.refine_ratio,
            sampler=hp.sampler, schedule=hp.sample_schedule, bootstrap_steps=hp.bootstrap_steps,
            revise_sweeps=hp.revise_sweeps, revise_partitions=hp.revise_partitions,
            revise_temperature=hp.revise_temperature, revise_top_k=hp.revise_top_k,
        )

    @property
    def cfg_scale(self) -> float:
        """The guidance scale: the configured one, else 3 with text and 1 (none) without."""
        if self.hparams.cfg_scale is not None:
            return self.hparams.cfg_scale
        return 1.0 if self.unconditional else _CFG_SCALE

    @property
    def text_drop_prob(self) -> float:
        """The caption drop rate: the configured one, else 0.1 with text and 0 without."""
        if self.hparams.text_drop_prob is not None:
            return self.hparams.text_drop_prob
        return 0.0 if self.unconditional else _TEXT_DROP_PROB

    # -- checkpoints ----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        hp = self.hparams
        checkpoint[STAGE2_KEY] = {
            "format": STAGE2_FORMAT,
            "backbone": self.backbone.config,
            "backbone_prefix": "backbone_ema.module." if self.backbone_ema is not None else "backbone.",
            "tokenizer": self.tokenizer.config,
            "tokenizer_prefix": "tokenizer.",
            # None: an unconditional model, which takes no prompts.
            "text_encoder": None if self.unconditional else {
                "name_or_path": hp.text_encoder, "max_length": hp.text_max_length, "dtype": hp.text_encoder_dtype},
            "sampling": asdict(self.sampling_options()),
            "grid": list(getattr(self, "grid", ())) or None,
        }


def _check_conditioning(text_encoder: str | None, text_drop_prob: float | None, cfg_scale: float | None,
                        clip_path: str | None, caption_accuracy: bool | None) -> None:
    """Refuse, naming the option, what an unconditional model (text_encoder null) cannot do."""
    if text_drop_prob is not None and not 0 <= text_drop_prob <= 1:
        raise ModelOptionError("text_drop_prob", f"must be in [0, 1], got {text_drop_prob}")
    if text_encoder is not None:
        return
    why = "an unconditional model (text_encoder: null) has no caption"
    if text_drop_prob not in (None, 0):
        raise ModelOptionError("text_drop_prob", f"{why} to drop: leave it unset")
    if cfg_scale not in (None, 1):
        raise ModelOptionError("cfg_scale", f"{why} to guide by (no classifier-free guidance): leave it unset")
    if clip_path is not None:
        raise ModelOptionError("clip_path", f"{why} for CLIPSIM to compare with: leave it unset")
    if caption_accuracy:
        raise ModelOptionError("caption_accuracy", f"{why} to read: leave it unset")
