"""Decode one training clip from an encoded video (or image) held in memory.

A clip is `num_frames` frames sampled every `stride` source frames (or at a target fps), starting
at a random (train) or fixed (val) offset, resized so the short side is `size` and center-cropped
to size×size. Only the frames the clip needs are converted to RGB, and a far offset is reached by
a keyframe seek, so long source videos cost little more than short ones.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, UnidentifiedImageError
from torch.utils.data import get_worker_info

from maskvid.datamodules.cpus import decode_threads
from maskvid.datamodules.video_io import VideoDecodeError, _open, _short, _stream_fps, _video_stream, decode_errors, rotate

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "gif", "m4v")


@dataclass
class ClipSpec:
    """How to cut a clip; shared by the train and val streams."""

    num_frames: int
    size: int
    stride: int = 1
    fps: Optional[float] = None  # when set, overrides stride: sample at this rate
    short: str = "pad"  # "pad": repeat the last frame and mask it; "skip": reject short videos
    max_pixels: int = 3840 * 2160  # larger source frames are rejected (memory guard)
    threads: int = 0  # decoder threads; 0: this process's CPUs / (local ranks x workers), see datamodules/cpus.py

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.size < 1 or self.stride < 1:
            raise ValueError(f"num_frames, size and stride must be >= 1, got {self}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.short not in ("pad", "skip"):
            raise ValueError(f"short must be 'pad' or 'skip', got {self.short!r}")


def _worker_threads() -> int:
    """Decoder threads in this process: its CPUs (affinity) shared out among the node's local
    ranks and each rank's DataLoader workers.

    FFmpeg's automatic count assumes it owns every core; N workers on each of R ranks doing that
    oversubscribe the node R x N-fold and lose to plain sequential decoding. Slice threading
    (FFmpeg's default) is kept rather than frame threading: short clips pay frame threading's
    start-up on every file.
    """
    info = get_worker_info()
    return decode_threads(info.num_workers if info is not None else 0)


def _resize_crop_dims(width: int, height: int, rotation: int, size: int) -> tuple[int, int]:
    """Raw (pre-rotation) width/height to scale to, so the upright short side equals `size`."""
    upright_w, upright_h = (height, width) if rotation % 180 else (width, height)
    scale = size / min(upright_w, upright_h)
    up_w = max(size, int(math.ceil(upright_w * scale - 1e-6)))
    up_h = max(size, int(math.ceil(upright_h * scale - 1e-6)))
    return (up_h, up_w) if rotation % 180 else (up_w, up_h)


def _center_crop(frame: np.ndarray, size: int) -> np.ndarray:
    h, w = frame.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return frame[top : top + size, left : left + size]


def pad_clip(frames: list[np.ndarray], num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack frames, repeating the last to reach num_frames; mask marks the real ones."""
    n = len(frames)
    mask = np.zeros(num_frames, dtype=bool)
    mask[:n] = True
    frames = frames + [frames[-1]] * (num_frames - n)
    return np.stack(frames), mask


def decode_image(data: bytes, spec: ClipSpec) -> tuple[np.ndarray, np.ndarray]:
    """An image is a 1-frame video: [num_frames, S, S, 3] with only frame 0 valid."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > spec.max_pixels:
                raise VideoDecodeError("frame too large", f"{img.width}x{img.height}")
            img = img.convert("RGB")
            w, h = _resize_crop_dims(img.width, img.height, 0, spec.size)
            arr = np.asarray(img.resize((w, h), Image.BILINEAR))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise VideoDecodeError("unreadable or corrupt", _short(e)) from e
    return pad_clip([_center_crop(arr, spec.size)], spec.num_frames)


def decode_clip(
    data: bytes,
    spec: ClipSpec,
    rng: Optional[np.random.Generator] = None,
    fps_hint: float = 0.0,
    frames_hint: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a clip -> (uint8 [num_frames, S, S, 3], bool mask [num_frames]).

    rng: picks the temporal offset; None starts at the first frame (validation).
    fps_hint/frames_hint: from the sample's json, used when the container does not say.
    Raises VideoDecodeError for anything undecodable, too large, empty, or (short="skip") short.
    """
    container = _open(data)
    try:
        with decode_errors():
            stream = _video_stream(container)
            stream.codec_context.thread_count = spec.threads or _worker_threads()
            cc = stream.codec_context
            if cc.width * cc.height > spec.max_pixels:
                raise VideoDecodeError("frame too large", f"{cc.width}x{cc.height}")
            src_fps = _stream_fps(stream) or fps_hint or 25.0
            n_src = int(stream.frames or 0) or int(frames_hint or 0)
            step = src_fps / spec.fps if spec.fps else float(spec.stride)
            span = (spec.num_frames - 1) * step + 1
            start = 0.0
            if rng is not None and n_src > span:
                start = float(rng.uniform(0, n_src - span)) if spec.fps else float(rng.integers(0, int(n_src - span) + 1))
            frames = _collect(container, stream, spec, src_fps, start, step)
    finally:
        container.close()
    if not frames:
        raise VideoDecodeError("zero frames")
    if len(frames) < spec.num_frames and spec.short == "skip":
        raise VideoDecodeError("too short", f"{len(frames)} < {spec.num_frames} frames")
    return pad_clip(frames, spec.num_frames)


def _collect(container, stream, spec: ClipSpec, src_fps: float, start: float, step: float) -> list[np.ndarray]:
    """Walk the decoded frames once, keeping the one that covers each target time."""
    base = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    targets = [(start + k * step) / src_fps for k in range(spec.num_frames)]
    half = 0.5 / src_fps
    if targets[0] > 1.0:
        # Keyframe seek lands at or before the target; the loop below skips forward from there.
        container.seek(int((base + targets[0] - half) / stream.time_base), stream=stream, backward=True)
    out: list[np.ndarray] = []
    k, index, dims = 0, 0, None
    # One reformatter for the whole clip: `frame.to_ndarray(width=..)` builds a fresh swscale
    # context for every frame, whose set-up cost more than the scaling itself (docs/benchmarks.md).
    # Same output, bit for bit.
    reformatter = VideoReformatter()
    last: Optional[np.ndarray] = None
    for frame in container.decode(stream):
        t = (frame.time - base) if frame.time is not None else index / src_fps
        index += 1
        if t + half < targets[k]:
            continue
        rotation = int(frame.rotation or 0)
        if dims is None:
            dims = _resize_crop_dims(frame.width, frame.height, rotation, spec.size)
        last = None
        while k < spec.num_frames and t + half >= targets[k]:
            if last is None:
                rgb = reformatter.reformat(frame, width=dims[0], height=dims[1], format="rgb24").to_ndarray()
                last = _center_crop(rotate(rgb, rotation), spec.size)
            out.append(last)
            k += 1
        if k >= spec.num_frames:
            break
    return out
