"""The caption-accuracy oracle: reads colour, shape and direction back from a synthetic-style video.

It scores generated videos against the prompts of the synthetic dataset (`maskvid.datamodules.synthetic`)
without any learned model, so it needs no weights and shares no model's blind spots. Per frame:

- background: the median of the border pixels (the renderer keeps the border clear);
- object: the pixels far from the background in RGB; its colour is the median of the most
  object-like half of them, matched to the nearest palette colour within a tolerance;
- shape: the object's coverage (a soft mask, measured in luma, which yuv420 keeps at full
  resolution, so compression blur at edges neither adds nor removes area) divided by its soft
  bounding box, median over frames, which separates the shapes' fill ratios (square 1.0,
  circle 0.785, triangle 0.5);
- direction: the coverage-weighted centroid's displacement from the first to the last frame
  with an object, relative to the frame size; below `STATIC_FRACTION` it is static.

A frame whose border is not uniform (noise), whose "object" fills most of it, or whose object is
not one uniform colour has no object; a video has one only if half its frames do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from maskvid.datamodules.synthetic import COLOURS

NO_OBJECT = "no object"  # colour/shape/direction when no object is found (blank, noise)
STATIC = "static"  # direction when the object does not move
UNKNOWN = "unknown"  # colour/shape of an object that matches nothing in the vocabulary

ATTRIBUTES = ("colour", "shape", "direction")

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background above which a pixel is object
BORDER_SPREAD = 20.0  # median RGB deviation of the border above which the background is noise
COLOUR_SPREAD = 40.0  # median RGB deviation within the object above which it is not one colour
MAX_OBJECT_FRACTION = 0.5  # an "object" covering more of the frame is a background change
MIN_OBJECT_FRACTION = 0.002  # fewer object pixels than this (and than 4) is an empty frame
COLOUR_TOLERANCE = 80.0  # RGB distance to the nearest palette colour for it to count
# Fill-ratio range of each shape (maskvid.datamodules.synthetic.FILL_RATIO); outside every range
# the blob is no known shape. The circle/triangle boundary sits above the midpoint of their fill
# ratios: a small triangle's apex is thinner than a pixel, so its fill is over-measured.
SHAPE_FILL_RANGES: dict[str, tuple[float, float]] = {
    "triangle": (0.3, 0.72),
    "circle": (0.72, 0.89),
    "square": (0.89, 1.15),
}
STATIC_FRACTION = 0.06  # centroid travel (fraction of the frame) below which nothing moves

MIN_LUMA_CONTRAST = 25.0  # object/background luma difference needed to measure edges in luma
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # BT.601, as h264 stores it
_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32)


@dataclass
class OracleResult:
    """What the oracle read from one video, with the measurements behind each answer."""

    colour: str
    shape: str
    direction: str
    colour_distance: float = float("nan")  # RGB distance of the measured colour to the palette one
    fill_ratio: float = float("nan")  # median object area / bounding-box area
    displacement: tuple[float, float] = (0.0, 0.0)  # centroid (dx, dy) as fractions of (W, H)
    object_frames: float = 0.0  # fraction of frames in which an object was found


@dataclass
class _Frame:
    colour: np.ndarray  # measured RGB, float [3]
    fill: float
    centroid: tuple[float, float]  # (x, y) in pixels


def _as_array(video: Any) -> np.ndarray:
    if hasattr(video, "detach"):  # torch tensor, without importing torch here
        video = video.detach().cpu().numpy()
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or not video.size:
        raise ValueError(f"expected uint8 video [T, H, W, 3], got {video.dtype} {video.shape}")
    return video


def _border(frame: np.ndarray) -> np.ndarray:
    return np.concatenate([frame[0], frame[-1], frame[1:-1, 0], frame[1:-1, -1]])


def _measure(frame: np.ndarray) -> _Frame | None:
    """The object in one float [H, W, 3] frame, or None if there is no single clear object."""
    h, w, _ = frame.shape
    border = _border(frame)
    bg = np.median(border, axis=0)
    if np.median(np.linalg.norm(border - bg, axis=-1)) > BORDER_SPREAD:
        return None
    dist = np.linalg.norm(frame - bg, axis=-1)
    candidate = dist > FOREGROUND_DISTANCE
    count = int(candidate.sum())
    if count < max(4, MIN_OBJECT_FRACTION * h * w) or count > MAX_OBJECT_FRACTION * h * w:
        return None
    # The most object-like half: edge pixels blended with the background would bias the colour.
    core = frame[candidate & (dist >= np.median(dist[candidate]))]
    colour = np.median(core, axis=0)
    if np.median(np.linalg.norm(core - colour, axis=-1)) > COLOUR_SPREAD:
        return None
    # Coverage: each pixel's position between the background and the object. Luma is stored at
    # full resolution and chroma at half (yuv420), so luma gives the sharper edges whenever the
    # two differ enough in brightness; otherwise fall back to the RGB colour line.
    luma_bg, luma_fg = float(bg @ _LUMA), float(colour @ _LUMA)
    if abs(luma_fg - luma_bg) >= MIN_LUMA_CONTRAST:
        alpha = (frame @ _LUMA - luma_bg) / (luma_fg - luma_bg)
    else:
        axis = colour - bg
        alpha = (frame - bg) @ axis / float(axis @ axis)
    alpha = np.clip(alpha, 0.0, 1.0)
    mask = alpha > 0.5
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    # The box grown by one pixel, so that the blurred rim counts towards area and extent.
    window = alpha[max(rows[0] - 1, 0) : rows[-1] + 2, max(cols[0] - 1, 0) : cols[-1] + 2]
    # Soft extents (sum of each column's / row's peak coverage) are exact for partially covered
    # edge pixels, where an integer box would be off by up to a pixel on each side.
    width, height = float(window.max(axis=0).sum()), float(window.max(axis=1).sum())
    fill = float(window.sum()) / (width * height)
    ys, xs = np.mgrid[0:h, 0:w]
    weight = alpha * mask
    centroid = (float((weight * xs).sum() / weight.sum()), float((weight * ys).sum() / weight.sum()))
    return _Frame(colour, fill, centroid)


def _shape(fill: float) -> str:
    return next((name for name, (lo, hi) in SHAPE_FILL_RANGES.items() if lo <= fill < hi), UNKNOWN)


def _direction(dx: float, dy: float) -> str:
    if max(abs(dx), abs(dy)) < STATIC_FRACTION:
        return STATIC
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def recover(video: Any) -> OracleResult:
    """Read colour, shape and direction from uint8 [T, H, W, 3] (numpy or torch) pixels."""
    pixels = _as_array(video).astype(np.float32)
    t, h, w, _ = pixels.shape
    frames = [f for f in map(_measure, pixels) if f is not None]
    seen = len(frames) / t
    if not frames or 2 * len(frames) < t:
        return OracleResult(NO_OBJECT, NO_OBJECT, NO_OBJECT, object_frames=seen)
    colour = np.median(np.stack([f.colour for f in frames]), axis=0)
    distances = np.linalg.norm(_PALETTE - colour, axis=-1)
    nearest = int(distances.argmin())
    colour_name = _PALETTE_NAMES[nearest] if distances[nearest] <= COLOUR_TOLERANCE else UNKNOWN
    fill = float(np.median([f.fill for f in frames]))
    dx = (frames[-1].centroid[0] - frames[0].centroid[0]) / w
    dy = (frames[-1].centroid[1] - frames[0].centroid[1]) / h
    return OracleResult(
        colour=colour_name,
        shape=_shape(fill),
        direction=_direction(dx, dy),
        colour_distance=float(distances[nearest]),
        fill_ratio=fill,
        displacement=(dx, dy),
        object_frames=seen,
    )


def score(result: OracleResult, attrs: dict[str, Any]) -> dict[str, bool]:
    """Per-attribute and joint correctness of one reading against the intended attributes."""
    hits = {name: getattr(result, name) == attrs[name] for name in ATTRIBUTES}
    hits["joint"] = all(hits.values())
    return hits


def caption_accuracy(videos: Iterable[Any], attrs_list: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy of colour, shape, direction and all three jointly, plus `n` (number of videos).

    attrs_list: the intended attributes per video (e.g. a sample's json or `parse_caption` output).
    """
    totals = dict.fromkeys((*ATTRIBUTES, "joint"), 0)
    n = 0
    for video, attrs in zip(videos, attrs_list, strict=True):
        for name, hit in score(recover(video), attrs).items():
            totals[name] += hit
        n += 1
    if n == 0:
        raise ValueError("caption_accuracy needs at least one video")
    return {**{name: total / n for name, total in totals.items()}, "n": n}
