"""`TextToVideo`: prompts in, uint8 videos out, from a stage-2 model alone.

    t2v = TextToVideo.from_pretrained("runs/demo/export")    # or .from_checkpoint("last.ckpt")
    videos = t2v.generate(["a red circle moving left"], num_frames=17, seed=0)  # uint8 [B, T, H, W, 3]
    t2v.save_pretrained("my_model")                           # config.json + model.safetensors

The model is the frozen backbone, the frozen tokenizer that turns its tokens into pixels, and the
text encoder, which is named (not copied): it is a frozen pretrained network loaded by name. An
unconditional model (trained with `text_encoder: null`) has none: `generate(num_videos=N)`.
"""

from __future__ import annotations

from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from einops import rearrange
from torch import nn

from maskvid import pretrained
from maskvid.models.cvivit import CViViT
from maskvid.models.sampling import SamplingOptions, sample_tokens
from maskvid.video_tokenizer import VideoTokenizer, provenance

_BACKBONE, _TOKENIZER = "backbone.", "tokenizer."
_SEED_MASK = 0x7FFF_FFFF_FFFF_FFFF


class TextToVideo:
    """Frozen backbone + tokenizer + text encoder, and how to sample from them."""

    FORMAT = pretrained.TEXT_TO_VIDEO

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: CViViT | VideoTokenizer,
        text_encoder: nn.Module | dict[str, Any] | None,
        defaults: SamplingOptions | None = None,
        grid: Sequence[int] | None = None,
        source: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            backbone: the stage-2 transformer (MaskGITBackbone or MeBT); frozen here.
            tokenizer: the stage-1 tokenizer whose tokens the backbone predicts.
            text_encoder: a TextEncoder, or its init arguments ({"name_or_path", "max_length",
                "dtype"}) to build it on first use (exporting needs no text encoder); None for an
                unconditional model.
            defaults: the sampler's defaults; `generate(**overrides)` changes them per call.
            grid: the training clip's token grid (t, h, w): the default length, and the window
                past which generation slides.
            source: where it came from (checkpoint, step, EMA), recorded in config.json.
        """
        self.backbone = backbone.eval().requires_grad_(False)
        self.tokenizer = tokenizer if isinstance(tokenizer, VideoTokenizer) else VideoTokenizer(tokenizer)
        if text_encoder is None or isinstance(text_encoder, dict):
            self._text_encoder = None
            self.text_encoder_args = dict(text_encoder) if text_encoder is not None else None
        else:
            self._text_encoder = text_encoder
            self.text_encoder_args = dict(text_encoder.config["init_args"])
        self.defaults = defaults or SamplingOptions()
        self.grid = tuple(int(g) for g in grid) if grid else None
        self.source = dict(source or {})
        vocab = getattr(backbone, "vocab_size", None)
        if vocab is not None and vocab != self.tokenizer.vocab_size:
            raise pretrained.PretrainedError(
                f"the backbone predicts {vocab} token ids but the tokenizer has {self.tokenizer.vocab_size} codes")

    def __repr__(self) -> str:
        return (f"TextToVideo(backbone={type(self.backbone).__name__}, grid={self.grid}, "
                f"text_encoder={(self.text_encoder_args or {}).get('name_or_path')!r}, device={self.device})")

    # -- the model ------------------------------------------------------------------------------

    @property
    def unconditional(self) -> bool:
        return self.text_encoder_args is None

    @property
    def text_encoder(self) -> nn.Module | None:
        if self._text_encoder is None and not self.unconditional:
            from maskvid.models.text_encoder import TextEncoder

            self._text_encoder = TextEncoder(**self.text_encoder_args).to(self.device)
        return self._text_encoder

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def to(self, device: str | torch.device) -> TextToVideo:
        self.backbone.to(device)
        self.tokenizer.to(device)
        if self._text_encoder is not None:
            self._text_encoder.to(device)
        return self

    @property
    def trained_frames(self) -> int:
        """Latent frames per clip in training: longer videos are made with a sliding window."""
        return self.grid[0] if self.grid else self.backbone.grid[0]

    def grid_for(self, num_frames: int | None, resolution: int | None = None) -> tuple[int, int, int]:
        """The token grid for `num_frames` (default: the training clip length)."""
        if num_frames is None:
            if self.grid is None:
                raise ValueError("this model does not record its clip length: pass num_frames")
            return self.grid
        net = self.tokenizer.network
        size = resolution or net.patch_size * (self.grid[1] if self.grid else self.backbone.grid[1])
        grid = net.token_grid(num_frames, size)
        self.backbone.check_grid((min(grid[0], self.trained_frames), *grid[1:]))  # longer: sliding window
        return grid

    def options(self, **overrides: Any) -> SamplingOptions:
        """The default sampler with `overrides` (SamplingOptions fields; None keeps the default)."""
        names = {f.name for f in fields(SamplingOptions)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown sampling option(s) {unknown}; valid: {sorted(names)}")
        options = replace(self.defaults, **{k: v for k, v in overrides.items() if v is not None})
        if self.unconditional and overrides.get("cfg_scale") not in (None, 1):
            raise ValueError("cfg_scale: an unconditional model has no caption to guide by")
        options.check()
        return options

    def video_generator(self, seed: int, *ids: int) -> torch.Generator:
        """One generator per video: a video depends on (seed, its ids), not on how it was batched.
        `generate(prompts, seed=s)` draws prompt i from (s, i, 0), as `maskvid generate --seed s`."""
        return torch.Generator(device=self.device).manual_seed(hash((seed, *ids)) & _SEED_MASK)

    # -- sampling -------------------------------------------------------------------------------

    @torch.no_grad()
    def tokens(
        self,
        prompts: list[str] | int,
        grid: tuple[int, int, int],
        options: SamplingOptions,
        generator,
        prime: torch.Tensor | None = None,
        context: int = 2,
        precision: str = "32",
        given: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample a [B, t, h, w] token grid, one per prompt (an unconditional model: prompts is the
        number of videos). Past the trained length, a window of the trained
        length slides forward, each window primed with the last `context` latent frames.
        precision: "bf16" (autocast), "32", or "auto" (bf16 where the device has it natively).
        given, keep: tokens [B, t, h, w] and bool [B, t, h, w] kept as given (sampling.keep_box,
        interpolation_keep), within the trained length."""
        from maskvid.precision import resolve

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=resolve(precision, self.device.type)):
            return self._tokens(prompts if isinstance(prompts, int) else list(prompts), grid, options, generator,
                                prime, context, given, keep)

    def _tokens(self, prompts, grid, options, generator, prime, context, given=None, keep=None) -> torch.Tensor:
        if isinstance(prompts, int) != self.unconditional:
            raise ValueError("an unconditional model takes a number of videos, not prompts" if self.unconditional
                             else "this model is text-conditioned: pass prompts")
        text = text_mask = None
        batch = prompts if self.unconditional else None
        if not self.unconditional:
            text, text_mask = self.text_encoder(prompts)
            text, text_mask = text.to(self.device), text_mask.to(self.device)
        t, h, w = grid
        window = self.trained_frames
        if t <= window:
            return sample_tokens(self.backbone, grid, text, text_mask, options, generator, prime=prime, batch_size=batch,
                                 given=given, keep=keep)
        if keep is not None:
            raise ValueError(f"kept tokens work within the trained length ({window} latent frames), got {t}")
        if not 0 < context < window:
            raise ValueError(f"sliding-window context must be in [1, {window - 1}], got {context}")
        tokens = sample_tokens(self.backbone, (window, h, w), text, text_mask, options, generator, prime=prime,
                               batch_size=batch)
        while tokens.shape[1] < t:
            step = min(window - context, t - tokens.shape[1])
            new = sample_tokens(
                self.backbone, (context + step, h, w), text, text_mask, options, generator, prime=tokens[:, -context:],
                batch_size=batch)
            tokens = torch.cat([tokens, new[:, context:]], dim=1)
        return tokens

    def frame_size(self, grid: tuple[int, int, int] | None = None) -> tuple[int, int]:
        """(H, W) in pixels of the videos this model makes (of `grid`, default: the training clip's)."""
        h, w = (grid or self.grid or self.backbone.grid)[1:]
        p = self.tokenizer.network.patch_size
        return h * p, w * p

    def encode_frames(self, frames: torch.Tensor, latent_frames: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Given frames uint8 [B, F, H, W, 3] -> the tokens [B, k, h, w] of their last 1 + (k-1)*pt
        frames (k <= latent_frames), resized (short side) and centre-cropped to `size`. The C-ViViT
        is causal: those k latent frames do not depend on any frame after them, so they can be kept
        as the prime of a longer grid and decode to the tokenizer's reconstruction of the frames."""
        if frames.dtype != torch.uint8 or frames.dim() != 5 or frames.shape[-1] != 3:
            raise ValueError(f"given frames must be uint8 [B, F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        pt = self.tokenizer.network.temporal_patch_size
        k = min(latent_frames, 1 + (frames.shape[1] - 1) // pt)
        if k < 1:
            raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
        clip = fit_frames(frames[:, frames.shape[1] - (1 + (k - 1) * pt):], size or self.frame_size())
        return self.tokenizer.encode(clip)

    def init_prime(self, init_frames: torch.Tensor, grid: tuple[int, int, int], count: int, context: int | None = None
                   ) -> torch.Tensor:
        """The prime [count, k, h, w] for generation from given frames: k = as many latent frames
        as the frames make, at most grid's t - 1 (and `context`), so something is generated."""
        if init_frames.shape[0] not in (1, count):
            raise ValueError(f"init_frames holds {init_frames.shape[0]} videos for {count} outputs: pass 1 or {count}")
        limit = grid[0] - 1 if context is None else min(context, grid[0] - 1)
        if limit < 1:
            raise ValueError(f"a {grid[0]}-latent-frame grid leaves nothing to generate after given frames")
        prime = self.encode_frames(init_frames, limit, self.frame_size(grid))
        return prime.expand(count, *prime.shape[1:])

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token grids [B, t, h, w] -> uint8 videos [B, T, H, W, 3] on the CPU (fp32 decoding)."""
        return self.tokenizer.decode(tokens)

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        num_frames: int | None = None,
        seed: int | None = None,
        *,
        num_videos: int | None = None,
        context: int = 2,
        precision: str = "auto",
        init_frames: torch.Tensor | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """Prompts -> uint8 videos [B, T, H, W, 3] on the CPU, one per prompt.

        Args:
            prompts: the captions (None for an unconditional model).
            num_frames: frames per video, 1 + k * the tokenizer's temporal patch (default: the
                training clip length); longer than trained slides a window forward.
            seed: same seed, same videos (each video from (seed, its index)); None draws one from
                torch's global generator.
            num_videos: how many videos an unconditional model makes (video i from (seed, i)).
            context: latent frames each sliding window keeps from the one before.
            precision: the transformer's: "auto" (bf16 autocast where native), "bf16" or "32".
            init_frames: given frames uint8 [B or 1, F, H, W, 3] to continue (an image: F = 1):
                encoded with the tokenizer, their latent frames kept as the first ones (at most
                the grid's t - 1) and the rest generated; the output starts with the tokenizer's
                reconstruction of the given frames (their last 1 + k*pt, resized and cropped).
            **sampling: SamplingOptions overrides: steps, cfg_scale, temperature, top_k, noise,
                cfg_schedule, refine_steps, refine_ratio, sampler ("maskgit" or "draft_revise"),
                schedule, bootstrap_steps, revise_sweeps, revise_partitions, revise_temperature,
                revise_top_k (models/sampling.py SamplingOptions).
        """
        if self.unconditional:
            if prompts is not None or not num_videos or num_videos < 1:
                raise ValueError("this model is unconditional: pass num_videos=N (>= 1) and no prompts")
            prompts = num_videos
        else:
            if num_videos is not None:
                raise ValueError("num_videos is for unconditional models: this one takes prompts")
            prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
            if not prompts:
                raise ValueError("no prompts")
        options = self.options(**sampling)
        grid = self.grid_for(num_frames)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        count = prompts if isinstance(prompts, int) else len(prompts)
        generators = [self.video_generator(seed, i, 0) for i in range(count)]
        prime = None if init_frames is None else self.init_prime(init_frames, grid, count)
        return self.decode(self.tokens(prompts, grid, options, generators, prime=prime, context=context,
                                       precision=precision))

    def inpaint(
        self,
        video: torch.Tensor,
        keep: torch.Tensor,
        prompts: str | Sequence[str] | None = None,
        seed: int | None = None,
        *,
        precision: str = "auto",
        **sampling: Any,
    ) -> torch.Tensor:
        """Regenerate what `keep` does not keep of a given video -> uint8 [B, T, H, W, 3].

        Args:
            video: uint8 [B, T, H, W, 3], T = 1 + k * pt within the trained length; resized and
                centre-cropped to the model's size, then encoded with its tokenizer.
            keep: bool [t, h, w] or [B, t, h, w] over its token grid: True = keep the given token
                (models/sampling.py keep_box: a spatio-temporal box kept or regenerated).
            prompts: one caption, or one per video (None for an unconditional model).
            seed, precision, **sampling: as generate's.
        """
        grid = self.grid_for(video.shape[1])
        given = self.tokenizer.encode(fit_frames(video, self.frame_size(grid)))
        count = given.shape[0]
        keep = keep.expand(count, *grid) if keep.dim() == 3 else keep
        if self.unconditional:
            if prompts is not None:
                raise ValueError("this model is unconditional: pass no prompts")
            prompts = count
        else:
            prompts = [prompts] * count if isinstance(prompts, str) else list(prompts or [])
            if len(prompts) != count:
                raise ValueError(f"{len(prompts)} prompt(s) for {count} video(s)")
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        generators = [self.video_generator(seed, i, 0) for i in range(count)]
        return self.decode(self.tokens(prompts, grid, self.options(**sampling), generators, precision=precision,
                                       given=given, keep=keep))

    # -- saving and loading ---------------------------------------------------------------------

    def save_pretrained(self, out: str | Path) -> Path:
        """Write `out/config.json` and `out/model.safetensors` (backbone and tokenizer weights; the
        text encoder is named, not copied); `from_pretrained(out)` reads them."""
        config = {
            "format": self.FORMAT,
            "backbone": self.backbone.config,
            "tokenizer": self.tokenizer.network.config,
            "text_encoder": self.text_encoder_args,
            "sampling": asdict(self.defaults),
            "grid": list(self.grid) if self.grid else None,
            "weights": {"backbone": _BACKBONE, "tokenizer": _TOKENIZER},
            "source": self.source,
        }
        tensors = {**pretrained.prefixed(_BACKBONE, self.backbone),
                   **pretrained.prefixed(_TOKENIZER, self.tokenizer.network)}
        return pretrained.write_directory(out, config, tensors)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> TextToVideo:
        """The model in an exported directory (`maskvid ckpt export`, or save_pretrained)."""
        config = pretrained.read_config(path, (cls.FORMAT,))
        tensors = pretrained.read_weights(path)
        for key in ("backbone", "tokenizer", "text_encoder"):
            if not isinstance(config.get(key), dict) and not (key == "text_encoder" and config.get(key, 0) is None):
                raise pretrained.PretrainedError(f"{path}: config.json has no {key!r} section")
        prefixes = config.get("weights") or {"backbone": _BACKBONE, "tokenizer": _TOKENIZER}
        pretrained.check_all_used(tensors, tuple(prefixes.values()), path)
        backbone = pretrained.load_network(config["backbone"], tensors, prefixes["backbone"], path)
        tokenizer = pretrained.load_network(config["tokenizer"], tensors, prefixes["tokenizer"], path)
        return cls(backbone, tokenizer, config["text_encoder"], _sampling(config.get("sampling")),
                   config.get("grid"), config.get("source")).to(map_location)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> TextToVideo:
        """The model in a stage-2 training checkpoint: a single file or a sharded (FSDP2 DCP,
        DeepSpeed) directory; the EMA backbone when training kept one."""
        from maskvid.checkpoint_files import read_checkpoint

        return cls.from_checkpoint_dict(read_checkpoint(path), path).to(map_location)

    @classmethod
    def from_checkpoint_dict(cls, checkpoint: dict, source: Any) -> TextToVideo:
        from maskvid.models.stage2_checkpoint import stage2_record

        info, state = stage2_record(checkpoint, source)
        backbone = pretrained.load_network(info["backbone"], state, info["backbone_prefix"], source)
        tokenizer = pretrained.load_network(info["tokenizer"], state, info["tokenizer_prefix"], source)
        ema = "_ema." in info["backbone_prefix"]
        text_encoder = dict(info["text_encoder"]) if info["text_encoder"] is not None else None
        return cls(backbone, tokenizer, text_encoder, _sampling(info.get("sampling")),
                   info.get("grid"), provenance(checkpoint, source, ema))

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> TextToVideo:
        """An exported directory (config.json) or any stage-2 checkpoint."""
        if pretrained.is_pretrained_dir(path):
            return cls.from_pretrained(path, map_location)
        return cls.from_checkpoint(path, map_location)


def fit_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] -> uint8 [B, F, *size, 3]: scaled so it covers `size`, centre-cropped."""
    import torch.nn.functional as F

    height, width = frames.shape[2:4]
    if (height, width) != tuple(size):
        b = frames.shape[0]
        scale = max(size[0] / height, size[1] / width)
        scaled = (max(size[0], round(height * scale)), max(size[1], round(width * scale)))
        x = rearrange(frames, "b f h w c -> (b f) c h w").float()
        x = F.interpolate(x, size=scaled, mode="bilinear", antialias=True, align_corners=False)
        top, left = (scaled[0] - size[0]) // 2, (scaled[1] - size[1]) // 2
        x = x[:, :, top : top + size[0], left : left + size[1]]
        frames = rearrange(x.round().clamp(0, 255).to(torch.uint8), "(b f) c h w -> b f h w c", b=b)
    return frames


def _sampling(values: dict[str, Any] | None) -> SamplingOptions:
    names = {f.name for f in fields(SamplingOptions)}
    return SamplingOptions(**{k: v for k, v in (values or {}).items() if k in names})
