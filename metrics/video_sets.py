"""Sets of videos for offline evaluation: a folder of video files or WebDataset shards, as clips.

Each video gives its first `num_frames` frames as uint8 [T, S, S, 3], square: with `resolution`
the short side is resized to it and the frame center-cropped (as the datamodule cuts clips),
without it the decoded frames are only center-cropped. Videos that cannot be decoded are skipped
and counted. `set_features` turns a set into I3D features batch by batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from maskvid.datamodules.clips import VIDEO_EXTS, ClipSpec, decode_clip
from maskvid.datamodules.errors import DataError
from maskvid.datamodules.pixels import to_model
from maskvid.datamodules.samples import BadSample
from maskvid.datamodules.video_io import VideoDecodeError, decode_all

log = logging.getLogger(__name__)


def _center_square(frames: np.ndarray) -> np.ndarray:
    h, w = frames.shape[1:3]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return frames[:, top : top + side, left : left + side]


def decode_eval_clip(data: bytes, num_frames: int, resolution: Optional[int] = None) -> np.ndarray:
    """The first num_frames frames (fewer if the video is shorter): uint8 [T, S, S, 3].
    Raises VideoDecodeError."""
    if resolution:
        frames, mask = decode_clip(data, ClipSpec(num_frames=num_frames, size=resolution))
        return frames[mask]  # the padding decode_clip adds to short videos is not the video
    return _center_square(decode_all(data, max_frames=num_frames))


def video_files(folder: Path) -> list[Path]:
    exts = {f".{e}" for e in VIDEO_EXTS}
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))


def is_shards(spec: str) -> bool:
    """A directory holding .tar shards, a .tar file, or a brace pattern / URL list of them."""
    path = Path(spec)
    if path.is_dir():
        return any(path.glob("*.tar"))
    return spec.endswith(".tar") or "{" in spec or "::" in spec or "://" in spec or spec.startswith("pipe:")


@dataclass
class _ShardClipDecoder:
    """ValStream decoder: a raw shard sample -> its clip (any video extension)."""

    num_frames: int
    resolution: Optional[int]

    def __call__(self, raw: dict[str, Any], rng) -> dict[str, Any]:
        ext = next((e for e in VIDEO_EXTS if e in raw), None)
        if ext is None:
            raise BadSample("no video", f"has {sorted(k for k in raw if not k.startswith('__'))}")
        try:
            video = decode_eval_clip(raw[ext], self.num_frames, self.resolution)
        except VideoDecodeError as e:
            raise BadSample(e.reason, e.detail) from e
        caption = raw["txt"].decode("utf-8", "replace").strip() if "txt" in raw else ""
        return {"video": video, "caption": caption, "meta": {"key": raw.get("__key__", "")}}


@dataclass
class VideoSet:
    """Clips from a folder of videos or from shards; `skipped` counts the undecodable ones."""

    spec: str
    num_frames: int
    resolution: Optional[int] = None
    max_videos: Optional[int] = None
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not is_shards(self.spec) and not Path(self.spec).is_dir():
            raise DataError(f"not a folder of videos or shards: {self.spec}")

    def _skip(self, reason: str, where: str) -> None:
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        log.warning("skipping %s: %s", where, reason)

    def __iter__(self) -> Iterator[np.ndarray]:
        count = 0
        for video in self._videos():
            if self.max_videos is not None and count >= self.max_videos:
                return
            count += 1
            yield video

    def _videos(self) -> Iterator[np.ndarray]:
        if is_shards(self.spec):
            from maskvid.datamodules.streams import ValStream, expand_shards

            stream = ValStream(expand_shards(self.spec), _ShardClipDecoder(self.num_frames, self.resolution))
            for sample in stream:
                self.skipped = stream.skipped
                yield sample["video"]
            self.skipped = stream.skipped
            return
        files = video_files(Path(self.spec))
        if not files:
            raise DataError(f"no video files ({', '.join(VIDEO_EXTS)}) in {self.spec}")
        for path in files:
            try:
                yield decode_eval_clip(path.read_bytes(), self.num_frames, self.resolution)
            except (VideoDecodeError, OSError) as e:
                self._skip(str(e), os.fspath(path))


def set_features(videos: VideoSet, extract, batch_size: int = 8, device: str | torch.device = "cpu",
                 progress=None) -> Iterator[torch.Tensor]:
    """I3D features [B, D] of the set, `batch_size` clips at a time (clips of one shape per batch)."""
    batch: list[np.ndarray] = []

    def run(items: list[np.ndarray]) -> torch.Tensor:
        pixels = torch.from_numpy(np.ascontiguousarray(np.stack(items)))
        features = extract(to_model(pixels).to(device))
        if progress is not None:
            progress.update(len(items))
        return features

    for video in videos:
        if batch and (len(batch) == batch_size or video.shape != batch[0].shape):
            yield run(batch)
            batch = []
        batch.append(video)
    if batch:
        yield run(batch)
