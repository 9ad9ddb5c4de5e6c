"""PyAV video I/O shared by the shard builder, the synthetic renderer and the datamodule.

Every failure of PyAV/FFmpeg on bad input surfaces as one error type, `VideoDecodeError`, so
callers can skip a bad sample with a clear reason instead of crashing on an assortment of
FFmpeg exceptions.
"""

from __future__ import annotations

import io
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import BinaryIO, Iterable, Iterator, Union

import av
import numpy as np
from av.video.reformatter import VideoReformatter

Source = Union[str, os.PathLike, bytes, BinaryIO]


class VideoDecodeError(RuntimeError):
    """The input could not be read as a video (corrupt, truncated, no video stream, no frames)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class VideoInfo:
    """What a probe learns from the container headers, without decoding every frame."""

    fps: float
    num_frames: int  # 0 when the container does not say
    width: int  # as displayed, i.e. after rotation
    height: int
    duration: float  # seconds, 0.0 when unknown
    rotation: int  # counter-clockwise degrees to apply for display
    codec: str

    def to_dict(self) -> dict:
        return asdict(self)


_FFMPEG_FAILURES = (av.FFmpegError, ValueError, OSError, EOFError, MemoryError)


@contextmanager
def decode_errors() -> Iterator[None]:
    """Turn whatever PyAV/FFmpeg raises on bad input into VideoDecodeError."""
    try:
        yield
    except VideoDecodeError:
        raise
    except FileNotFoundError:
        raise
    except _FFMPEG_FAILURES as e:
        raise VideoDecodeError("unreadable or corrupt", _short(e)) from e


def _open(source: Source) -> av.container.InputContainer:
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    with decode_errors():
        return av.open(source, mode="r")


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        types = sorted({stream.type for stream in container.streams})
        if not types:
            # An mp4 cut before its index opens fine but holds no stream: damage, not audio.
            raise VideoDecodeError("unreadable or corrupt", "no streams found (truncated, or not a media file)")
        raise VideoDecodeError("no video stream", f"only {', '.join(types)} streams")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # a damaged header: FFmpeg found no decoder for it
        raise VideoDecodeError("unreadable or corrupt", "the video stream has no decodable codec")
    return stream


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    # GIFs and some webm files report absurd rates (e.g. 1000/1 or 90000/1); treat as unknown.
    return fps if 0.0 < fps <= 240.0 else 0.0


def _rotation_of_stream(container: av.container.InputContainer, stream) -> int:
    """Peek at the first frame's display matrix; the container header does not expose it."""
    try:
        for frame in container.decode(stream):
            return int(frame.rotation or 0)
    except (av.FFmpegError, ValueError, OSError, EOFError):
        return 0
    return 0


def probe(source: Source) -> VideoInfo:
    """Read the headers (and the first frame, for rotation). Raises VideoDecodeError."""
    container = _open(source)
    try:
        stream = _video_stream(container)
        fps = _stream_fps(stream)
        num_frames = int(stream.frames or 0)
        duration = 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        if num_frames == 0 and duration > 0 and fps > 0:
            num_frames = int(round(duration * fps))
        width, height = stream.codec_context.width, stream.codec_context.height
        codec = stream.codec_context.name
        rotation = _rotation_of_stream(container, stream)
        if rotation % 180 != 0:
            width, height = height, width
        return VideoInfo(fps, num_frames, width, height, duration, rotation, codec)
    finally:
        container.close()


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) with the short side equal to `short_side`, aspect kept, both even (yuv420)."""
    scale = short_side / min(width, height)
    w = max(2, int(round(width * scale / 2)) * 2)
    h = max(2, int(round(height * scale / 2)) * 2)
    return w, h


def rotate(frame: np.ndarray, rotation: int) -> np.ndarray:
    """Apply a display rotation (counter-clockwise degrees, multiples of 90) to HWC pixels."""
    k = (int(round(rotation / 90.0))) % 4
    return np.ascontiguousarray(np.rot90(frame, k=k)) if k else frame


def iter_frames(
    source: Source,
    fps: float | None = None,
    max_size: int | None = None,
    max_frames: int | None = None,
) -> Iterator[np.ndarray]:
    """Decode every frame as uint8 RGB [H, W, 3], upright (rotation applied).

    fps: resample to this rate by picking, for each output tick, the latest source frame at or
        before it (drops or repeats frames; never interpolates).
    max_size: downscale so the short side is at most this many pixels (never upscales).
    Raises VideoDecodeError on any decoding failure, including one after some frames.
    """
    container = _open(source)
    try:
        with decode_errors():
            yield from _iter_decoded(container, fps, max_size, max_frames)
    finally:
        container.close()


def _iter_decoded(
    container: av.container.InputContainer,
    fps: float | None,
    max_size: int | None,
    max_frames: int | None,
) -> Iterator[np.ndarray]:
    stream = _video_stream(container)
    stream.thread_type = "AUTO"
    src_fps = _stream_fps(stream) or (fps or 25.0)
    target: tuple[int, int] | None = None
    next_tick = 0.0
    emitted = 0
    index = 0
    reformatter = VideoReformatter()  # reused: one swscale set-up per video, not per frame
    for frame in container.decode(stream):
        if target is None:
            w, h = frame.width, frame.height
            target = (w, h)
            if max_size and min(w, h) > max_size:
                target = scaled_size(w, h, max_size)
        t = frame.time if frame.time is not None else index / src_fps
        index += 1
        if fps:
            # Emit this frame once for every output tick it covers.
            frame_end = t + 1.0 / src_fps
            repeats = 0
            while next_tick < frame_end - 1e-6:
                repeats += 1
                next_tick = (emitted + repeats) / fps
            if repeats == 0:
                continue
        else:
            repeats = 1
        rgb = reformatter.reformat(frame, width=target[0], height=target[1], format="rgb24").to_ndarray()
        rgb = rotate(rgb, int(frame.rotation or 0))
        for _ in range(repeats):
            yield rgb
            emitted += 1
            if max_frames is not None and emitted >= max_frames:
                return


def decode_all(source: Source, **kwargs) -> np.ndarray:
    """All frames as uint8 [T, H, W, 3]. Raises VideoDecodeError (also for zero frames)."""
    frames = list(iter_frames(source, **kwargs))
    if not frames:
        raise VideoDecodeError("zero frames")
    return np.stack(frames)


def encode_mp4(
    frames: Iterable[np.ndarray],
    fps: float,
    crf: int = 18,
    preset: str = "veryfast",
    reproducible: bool = False,
) -> tuple[bytes, int]:
    """Encode uint8 RGB frames [H, W, 3] as an h264/yuv420p mp4 in memory.

    Odd widths/heights are cropped by one pixel (yuv420 needs even sizes). Returns (bytes, n).
    reproducible: the same frames give the same bytes on every call, whatever the CPU (same
        x264 build assumed), at about half the encoding speed. It means one thread (the automatic
        count changes the slicing) and no SIMD: x264's AVX-512 routines read uninitialised
        memory, which changes the bitstream from call to call, and x264 can only be given an
        explicit list of CPU features, not told to leave one out.
    """
    buf = io.BytesIO()
    n = 0
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(buf, mode="w", format="mp4") as out:
        stream = None
        for frame in frames:
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(f"expected uint8 [H, W, 3] frames, got {frame.dtype} {frame.shape}")
            if stream is None:
                h, w = frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2
                if h == 0 or w == 0:
                    raise ValueError(f"frame too small to encode: {frame.shape}")
                stream = out.add_stream("libx264", rate=rate)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                options = {"crf": str(crf), "preset": preset}
                if reproducible:
                    options.update({"threads": "1", "x264-params": "asm=0"})
                stream.options = options
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:h, :w]), format="rgb24")
            for packet in stream.encode(vf):
                out.mux(packet)
            n += 1
        if stream is None:
            raise ValueError("no frames to encode")
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue(), n
