"""VideoDataModule: the one datamodule both stages share, over WebDataset video shards."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch

from maskvid.datamodules.clips import ClipSpec
from maskvid.datamodules.loader import ResumableLoader, VideoLoader
from maskvid.datamodules.mixing import IMAGE_STREAM, MixedStream
from maskvid.datamodules.pixels import to_model
from maskvid.datamodules.samples import SampleDecoder
from maskvid.datamodules.token_samples import TokenSampleDecoder
from maskvid.datamodules.streams import TrainStream, ValStream, dist_rank_world, expand_shards

log = logging.getLogger("maskvid.data")


class VideoDataModule(pl.LightningDataModule):
    """Streams captioned video clips from WebDataset shards (`maskvid data shards` writes them).

    Batches are dicts: `video` float [B, C, T, H, W] in [-1, 1], `caption` list[str],
    `frame_mask` bool [B, T] (False where a short video was padded by repeating its last frame;
    an image is a 1-frame video) and `meta` (keys, shard urls, per-sample json).

    The train stream is infinite, resampled and deterministic from (seed, rank, worker, step);
    it resumes exactly where it stopped. The val stream is finite and sees every sample once
    across all ranks and workers.
    """

    def __init__(
        self,
        train_shards: Optional[Union[str, list[str]]] = None,
        val_shards: Optional[Union[str, list[str]]] = None,
        test_shards: Optional[Union[str, list[str]]] = None,
        num_frames: int = 17,
        resolution: int = 64,
        frame_stride: int = 1,
        fps: Optional[float] = None,
        batch_size: int = 8,
        val_batch_size: Optional[int] = None,
        num_workers: int = 2,
        shuffle_buffer: int = 256,
        mix_shards: int = 4,
        seed: int = 0,
        short_videos: Literal["pad", "skip"] = "pad",
        missing_caption: Literal["skip", "keep"] = "skip",
        batches_per_epoch: Optional[int] = None,
        normalize_on_device: bool = False,
        max_source_pixels: int = 3840 * 2160,
        pin_memory: bool = False,
        samples: Literal["video", "tokens"] = "video",
        image_shards: Optional[Union[str, list[str]]] = None,
        image_ratio: float = 0.0,
    ) -> None:
        """
        Args:
            train_shards: Train shard URLs: a brace pattern (`dir/shard-{000000..000099}.tar`),
                a directory of .tar files, a list, '::'-joined URLs, or anything webdataset opens
                (`pipe:aws s3 cp s3://bucket/shard-000001.tar -`, http(s)://...).
            val_shards: Validation shard URLs (finite; each sample seen exactly once).
            test_shards: Test/predict shard URLs; defaults to val_shards.
            num_frames: Frames per clip. 1 + k*pt suits a C-ViViT tokenizer with temporal patch pt.
            resolution: Clips are resized so the short side is this, then center-cropped square.
            frame_stride: Take every n-th source frame (ignored when fps is set).
            fps: Sample clips at this frame rate instead of a fixed stride.
            batch_size: Clips per batch per process.
            val_batch_size: Clips per validation batch (defaults to batch_size).
            num_workers: DataLoader worker processes per rank (decoding runs in them).
            shuffle_buffer: Raw samples held for shuffling in each worker.
            mix_shards: Shards read and interleaved at once by each worker (mixing across shards).
            seed: Seeds shard choice, shuffling and temporal crops; the stream is a pure function
                of (seed, rank, worker, step).
            short_videos: "pad": a video shorter than the clip repeats its last frame and
                frame_mask marks the padding; "skip": such videos are skipped and counted.
            missing_caption: "skip" samples with a missing/empty caption, or "keep" them with ""
                (unconditional training).
            batches_per_epoch: Length of a train "epoch" (the stream continues across epochs).
                None: one endless epoch; bound the run with trainer.max_steps.
            normalize_on_device: Batches leave the loader as uint8 [B,T,H,W,C] and become float
                [B,C,T,H,W] on the device (in on_after_batch_transfer): 4x less host memory
                traffic, for GPU training. Same conversion, same values.
            max_source_pixels: Source videos with more pixels per frame are skipped (memory guard).
            pin_memory: Pin batches in host memory (faster host-to-GPU copies).
            samples: "video": shards of mp4/images + captions, decoded to clips; "tokens": token
                shards from `maskvid data tokenize` (video tokens + cached text embeddings), the
                fast path for stage 2. num_frames then selects 1 + (num_frames-1)/pt latent frames
                via the tokenizer's grid, checked by the model.
            image_shards: Train shards of captioned images (jpg/png/webp samples, e.g. from
                `maskvid data shards --images DIR`), mixed into the train stream at image_ratio:
                Phenaki's joint image-video training. Images arrive as 1-frame clips (frame_mask
                marks frame 0 only). With samples "tokens", token shards of images.
            image_ratio: Share of train samples drawn from image_shards, in [0, 1]. Exact per
                block of positions and a pure function of (seed, rank, worker, position), so
                resume stays exact (datamodules/mixing.py).
        """
        super().__init__()
        self.save_hyperparameters()
        self.spec = ClipSpec(
            num_frames=num_frames,
            size=resolution,
            stride=frame_stride,
            fps=fps,
            short=short_videos,
            max_pixels=max_source_pixels,
        )
        if samples == "tokens":
            self.decoder = TokenSampleDecoder()
        elif samples == "video":
            self.decoder = SampleDecoder(self.spec, missing_caption=missing_caption)
        else:
            raise ValueError(f"samples must be 'video' or 'tokens', got {samples!r}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0 (got {batch_size}, {num_workers})")
        if not 0.0 <= image_ratio <= 1.0:
            raise ValueError(f"image_ratio must be within [0, 1], got {image_ratio}")
        if image_ratio > 0 and not image_shards:
            raise ValueError(f"image_ratio is {image_ratio} but image_shards is not set (data.image_shards)")
        if image_shards and image_ratio == 0:
            raise ValueError("image_shards is set but image_ratio is 0: set data.image_ratio to the share of "
                             "images wanted in the train stream (e.g. 0.2)")
        self._train_loader: Optional[ResumableLoader] = None
        self._pending_state: Optional[dict[str, Any]] = None

    # ---- setup ---------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return dist_rank_world()

    def train_dataloader(self) -> ResumableLoader:
        if not self.hparams.train_shards and self.hparams.image_ratio < 1:
            raise ValueError("VideoDataModule: train_shards is not set (data.train_shards)")
        rank, world = self._rank_world()
        hp = self.hparams
        options = dict(seed=hp.seed, batch_size=hp.batch_size, mix_shards=hp.mix_shards,
                       shuffle_buffer=hp.shuffle_buffer, rank=rank, world_size=world)
        videos = TrainStream(expand_shards(hp.train_shards), self.decoder, **options) if hp.image_ratio < 1 else None
        dataset: TrainStream | MixedStream = videos
        if hp.image_ratio > 0:
            images = TrainStream(expand_shards(hp.image_shards), self.decoder, stream=IMAGE_STREAM, **options)
            dataset = MixedStream(videos, images, hp.image_ratio)
        loader = ResumableLoader(
            dataset,
            batches_per_epoch=self.hparams.batches_per_epoch,
            normalize=not self.hparams.normalize_on_device,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=False,  # workers must restart at the loader's position each epoch
        )
        if self._pending_state is not None:
            loader.load_state_dict(self._pending_state)
            self._pending_state = None
        self._train_loader = loader
        return loader

    def _eval_loader(self, shards: Optional[Union[str, list[str]]], name: str) -> VideoLoader:
        if not shards:
            raise ValueError(f"VideoDataModule: {name}_shards is not set (data.{name}_shards)")
        rank, world = self._rank_world()
        dataset = ValStream(expand_shards(shards), self.decoder, rank=rank, world_size=world)
        return VideoLoader(
            dataset,
            normalize=not self.hparams.normalize_on_device,
            batch_size=self.hparams.val_batch_size or self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory,
        )

    def val_dataloader(self) -> VideoLoader:
        return self._eval_loader(self.hparams.val_shards, "val")

    def test_dataloader(self) -> VideoLoader:
        return self._eval_loader(self.hparams.test_shards or self.hparams.val_shards, "test")

    def predict_dataloader(self) -> VideoLoader:
        return self.test_dataloader()

    # ---- hooks ---------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called when the model is about to use the batch (after Lightning's prefetch), which
        # is the position a checkpoint must record.
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_loader is not None:
            index = batch.get("meta", {}).get("batch_index")
            if index is not None:
                self._train_loader.mark_consumed(index)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.hparams.normalize_on_device and "video" in batch and batch["video"].dtype == torch.uint8:
            batch["video"] = to_model(batch["video"])
        return batch

    @property
    def skipped(self) -> int:
        """Bad train samples skipped so far on this rank."""
        return self._train_loader.skipped if self._train_loader is not None else 0

    def state_dict(self) -> dict[str, Any]:
        # The loader's own state travels with Lightning's loop state; this copy lets a plain
        # `datamodule.load_state_dict` (outside a Trainer) restore the stream too.
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        loader_state = state_dict.get("train_loader")
        if loader_state is None:
            return
        self._check_compatible(loader_state)
        if self._train_loader is not None:
            self._train_loader.load_state_dict(loader_state)
        else:
            self._pending_state = loader_state

    def _check_compatible(self, state: dict[str, Any]) -> None:
        now = {
            "seed": self.hparams.seed,
            "batch_size": self.hparams.batch_size,
            "num_workers": self.hparams.num_workers,
            "world_size": self._rank_world()[1],
            "image_ratio": self.hparams.image_ratio,
        }
        state = {"image_ratio": 0.0, **state}  # checkpoints from before image mixing
        changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if changed:
            warnings.warn(
                "the train stream resumes at the same position but not the same samples, because "
                + ", ".join(f"{k} changed {a} -> {b}" for k, (a, b) in changed.items()),
                stacklevel=2,
            )
