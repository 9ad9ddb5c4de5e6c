"""Joint image-video training (Phenaki): one train stream that mixes a video stream and an image
stream at a configured ratio.

Which source fills position p of a (rank, worker) stream is a pure function of (seed, rank,
worker, p), like everything else in the train stream, so resume needs no saved state. Positions
come in blocks of MIX_BLOCK; block k holds exactly floor((k+1)·B·r) - floor(k·B·r) images (B the
block size, r the ratio), at places drawn by an RNG seeded from (seed, rank, worker, k). So:

- the image count of the first n positions is floor(n·r) at every block boundary, and off by
  less than one block's images in between: the ratio holds by construction, not merely in
  expectation, and images are spread at random within blocks;
- the number of images before any position is a closed form plus one block's draw, which is how
  a resumed stream finds where each of its two sub-streams stands.

Each sub-stream is an ordinary TrainStream (its own shards, shuffle and bad-sample skipping) read
at its own position: the video stream at p - images_before(p), the image stream at images_before(p).
Images decode to 1-frame clips padded to the clip length, with frame_mask marking frame 0 only
(`clips.decode_image`); stage 2 hides that padding from the backbone.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Iterator

import numpy as np
from torch.utils.data import IterableDataset

from maskvid.datamodules.streams import TrainStream, logical_start

MIX_BLOCK = 256
# Stream ids (TrainStream.stream) of a mixture's image stream: its shard picks and shuffles are
# then independent of the video stream's, which shares the seed.
IMAGE_STREAM = 1


def images_up_to(block: int, ratio: float) -> int:
    """Images in the blocks before `block` (the one rounding both counts below share)."""
    return math.floor(block * MIX_BLOCK * ratio)


@lru_cache(maxsize=64)
def image_places(seed: int, rank: int, worker: int, block: int, ratio: float) -> np.ndarray:
    """bool [MIX_BLOCK]: which positions of `block` an image fills."""
    count = images_up_to(block + 1, ratio) - images_up_to(block, ratio)
    order = np.random.default_rng([seed, rank, worker, block, 0x1A6E]).permutation(MIX_BLOCK)
    places = order < count
    places.flags.writeable = False  # shared by the cache
    return places


def images_before(seed: int, rank: int, worker: int, position: int, ratio: float) -> int:
    """Positions before `position` that an image fills."""
    block, offset = divmod(position, MIX_BLOCK)
    return images_up_to(block, ratio) + int(image_places(seed, rank, worker, block, ratio)[:offset].sum())


class MixedStream(IterableDataset):
    """A rank's train stream, mixing `videos` and `images` (two TrainStreams of the same seed,
    rank and batch size) with a share `image_ratio` of images; `videos` may be None at ratio 1.
    Samples carry meta["stream"]: "image" or "video". Resumes exactly from `start_batch`, as
    TrainStream does."""

    def __init__(self, videos: TrainStream | None, images: TrainStream, image_ratio: float) -> None:
        super().__init__()
        if not 0.0 < image_ratio <= 1.0:
            raise ValueError(f"image_ratio must be in (0, 1], got {image_ratio}")
        if videos is None and image_ratio < 1:
            raise ValueError(f"image_ratio {image_ratio} < 1 needs a video stream")
        if videos is not None and (videos.seed, videos.rank, videos.batch_size) != (
                images.seed, images.rank, images.batch_size):
            raise ValueError("the video and image streams must share seed, rank and batch size")
        self.videos, self.images = videos, images
        self.image_ratio = float(image_ratio)
        self.start_batch = 0  # set by the loader on resume

    # What ResumableLoader reads of its dataset.
    @property
    def seed(self) -> int:
        return self.images.seed

    @property
    def batch_size(self) -> int:
        return self.images.batch_size

    @property
    def rank(self) -> int:
        return self.images.rank

    @property
    def world_size(self) -> int:
        return self.images.world_size

    @property
    def skipped(self) -> int:
        return self.images.skipped + (self.videos.skipped if self.videos is not None else 0)

    def is_image(self, worker: int, position: int) -> bool:
        block, offset = divmod(position, MIX_BLOCK)
        return bool(image_places(self.seed, self.rank, worker, block, self.image_ratio)[offset])

    def samples(self, worker: int, position: int) -> Iterator[dict[str, Any]]:
        """Decoded samples from `position` on, each from the stream its place names."""
        n_images = images_before(self.seed, self.rank, worker, position, self.image_ratio)
        # Generators: a sub-stream is only opened (and located) when it first has to give a sample.
        videos = self.videos.samples(worker, position - n_images) if self.videos is not None else None
        images = self.images.samples(worker, n_images)
        while True:
            image = self.is_image(worker, position)
            sample = next(images if image else videos)
            sample["meta"].update(position=position, skipped=self.skipped, stream="image" if image else "video")
            yield sample
            position += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, position = logical_start(self.start_batch, self.batch_size)
        for stream in (self.videos, self.images):
            if stream is not None:
                stream.skipped = 0
        return self.samples(worker, position)
