"""Tiny media files written with PyAV, for tests that need real containers and codecs.

Everything is generated on the fly (no binary fixtures in the repo) and small enough that a test
can build a dozen files in well under a second.

    write_video(tmp / "a.webm", codec="libvpx-vp9", width=64, height=48, frames=8, fps=8)
    write_video(tmp / "r.mp4", width=64, height=32, rotation=90)   # displays as 32x64
    write_image(tmp / "still.png")
    write_audio(tmp / "voice.m4a")
    truncate(tmp / "a.mp4", keep=0.5)
    strip_to_header(write_video(tmp / "none.mkv"))              # a video stream, zero frames
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# Pixel formats each encoder accepts; the first one FFmpeg lists is not always the common one.
PIX_FMTS = {
    "libx264": "yuv420p",
    "libx265": "yuv420p",
    "libvpx-vp9": "yuv420p",
    "libvpx": "yuv420p",
    "mpeg4": "yuv420p",
    "mjpeg": "yuvj420p",
    "gif": "rgb8",
    "png": "rgb24",
}

# Keeps libx265 from printing its banner and stats for every file.
CODEC_OPTIONS = {"libx265": {"x265-params": "log-level=none"}}

# EBML ID of a Matroska Cluster, the element that holds the frames.
MATROSKA_CLUSTER_ID = bytes.fromhex("1F43B675")


def has_encoder(name: str) -> bool:
    """Whether the bundled FFmpeg can encode with `name`."""
    try:
        av.codec.Codec(name, "w")
    except (av.FFmpegError, ValueError):
        return False
    return True


def frame_pattern(index: int, width: int, height: int) -> np.ndarray:
    """A distinct uint8 RGB frame [H, W, 3]: a gradient with a square moving along the top row.

    The red top-left corner makes orientation checkable after a rotation.
    """
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack(
        [(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), np.full_like(x, 96)],
        axis=-1,
    ).astype(np.uint8)
    side = max(2, min(width, height) // 4)
    left = (index * 3) % max(1, width - side)
    frame[:side, left : left + side] = 255
    frame[: side // 2, : side // 2] = (255, 0, 0)
    return frame


def write_video(
    path: str | os.PathLike,
    codec: str = "libx264",
    width: int = 64,
    height: int = 48,
    frames: int = 8,
    fps: int = 8,
    rotation: int | None = None,
    container_format: str | None = None,
    container_options: dict[str, str] | None = None,
) -> Path:
    """Encode `frames` frames of `frame_pattern` into `path`; the container follows the suffix.

    rotation: display rotation in degrees (counter-clockwise, as FFmpeg's display matrix), stored
        as side data so players (and `video_io.iter_frames`) show the video rotated.
    container_format: force the muxer, e.g. "mp4" for a file whose suffix says something else.
    container_options: muxer options, e.g. {"movflags": "faststart"} to put an mp4's index first.
    """
    path = Path(path)
    with av.open(str(path), mode="w", format=container_format, options=container_options) as out:
        stream = out.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height = width, height
        stream.pix_fmt = PIX_FMTS.get(codec, "yuv420p")
        stream.options = CODEC_OPTIONS.get(codec, {})
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            vf = av.VideoFrame.from_ndarray(frame_pattern(i, width, height), format="rgb24")
            for packet in stream.encode(vf.reformat(format=stream.pix_fmt)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_image(path: str | os.PathLike, width: int = 64, height: int = 48) -> Path:
    """A single PNG picture (FFmpeg reads it as a one-frame video)."""
    return write_video(path, codec="png", width=width, height=height, frames=1,
                       container_format="image2")


def write_audio(
    path: str | os.PathLike,
    codec: str = "aac",
    seconds: float = 0.5,
    sample_rate: int = 16000,
    container_format: str | None = None,
) -> Path:
    """A mono sine tone with no video stream (e.g. `.m4a` with aac, `.wav` with pcm_s16le)."""
    path = Path(path)
    with av.open(str(path), mode="w", format=container_format) as out:
        stream = out.add_stream(codec, rate=sample_rate)
        stream.layout = "mono"
        sample_fmt = "fltp" if codec in ("aac", "libopus") else "s16"
        chunk = stream.codec_context.frame_size or 1024
        t = np.arange(int(seconds * sample_rate)) / sample_rate
        wave = 0.3 * np.sin(2 * np.pi * 440.0 * t)
        if sample_fmt == "fltp":
            samples = wave.astype(np.float32)
        else:
            samples = (wave * 32767).astype(np.int16)
        for start in range(0, len(samples), chunk):
            block = samples[start : start + chunk][None, :]
            frame = av.AudioFrame.from_ndarray(block, format=sample_fmt, layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def strip_to_header(path: str | os.PathLike) -> Path:
    """Cut a Matroska/WebM file just inside its first Cluster: a valid video stream, no frames.

    Cutting before the Cluster ID instead makes FFmpeg fail to open the file at all.
    """
    path = Path(path)
    data = path.read_bytes()
    cluster = data.find(MATROSKA_CLUSTER_ID)
    if cluster < 0:
        raise ValueError(f"{path} has no Matroska Cluster element")
    path.write_bytes(data[: cluster + len(MATROSKA_CLUSTER_ID)])
    return path


def truncate(path: str | os.PathLike, keep: float = 0.5) -> Path:
    """Cut a file to the first `keep` fraction of its bytes (a download that stopped early)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
