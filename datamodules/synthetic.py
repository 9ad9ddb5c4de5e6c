"""The built-in captioned dataset: coloured shapes moving across a plain dark background.

Every clip shows one object (colour x shape) travelling in one direction, optionally varied in
speed, size and background, and its caption names those attributes. Because the attributes are
known exactly and can be read back from pixels (`maskvid.metrics.oracle`), a text-to-video model trained
on it can be scored on whether it draws what the prompt asked for.

Composition is measured with held-out combinations: the (colour, shape, direction) triples in
`HELDOUT_COMBOS` never occur in train or val, only in the `heldout` split, while every single
colour, shape and direction value still occurs in training.

Rendering is deterministic: sample `i` of a split depends only on (seed, split, i), so the shards
are byte-identical whatever the number of workers or the order in which samples are made.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from maskvid.datamodules.cpus import usable_cpus
from maskvid.datamodules.errors import DataError
from maskvid.datamodules.shard_writer import ShardSink
from maskvid.datamodules.video_io import encode_mp4

RGB = tuple[int, int, int]
Combo = tuple[str, str, str]  # (colour, shape, direction)

# Object colours sit at least ~90 apart in RGB so h264 chroma loss cannot swap them.
COLOURS: dict[str, RGB] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (240, 230, 40),
    "magenta": (230, 40, 220),
    "cyan": (40, 220, 230),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
}
# Backgrounds are dark (>= 150 from every object colour) and their names share no word with an
# object colour, so neither the oracle nor `parse_caption` can mistake one for the other.
BACKGROUNDS: dict[str, RGB] = {
    "black": (0, 0, 0),
    "dark gray": (45, 45, 45),
    "navy": (10, 15, 70),
    "dark brown": (60, 35, 15),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
# Area / bounding-box area of each shape: what the oracle tells them apart by.
FILL_RATIO: dict[str, float] = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# Unit motion per direction in image coordinates (x right, y down).
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
SPEEDS: tuple[str, ...] = ("slow", "fast")
SIZES: tuple[str, ...] = ("small", "large")
# Object bounding-box side, and distance travelled over the whole clip, as fractions of the
# frame side. Large + fast still fits: 0.375 + 0.4 (+10% jitter each) < 1 minus the margins.
SIZE_FRACTION: dict[str, float] = {"small": 0.25, "large": 0.375}
TRAVEL_FRACTION: dict[str, float] = {"slow": 0.2, "fast": 0.4}
JITTER = 0.1  # relative random variation of object size and travel distance
MARGIN_PX = 1.0  # the outermost pixel ring is always pure background

# Fixed (not seed dependent) held-out triples: 10 of the 96 combinations, one or two per colour,
# 3-4 per shape and 2-3 per direction, so every single value keeps most of its training combos.
HELDOUT_COMBOS: tuple[Combo, ...] = (
    ("red", "circle", "up"),
    ("green", "triangle", "left"),
    ("green", "square", "right"),
    ("blue", "square", "down"),
    ("blue", "circle", "left"),
    ("yellow", "circle", "right"),
    ("magenta", "square", "up"),
    ("cyan", "triangle", "down"),
    ("white", "triangle", "right"),
    ("orange", "square", "left"),
)

# Every template names colour, shape and direction; the others add size, speed or background.
TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} moving {direction}",
    "a {size} {colour} {shape} slides {direction_to} on a {background} background",
    "a {speed} {colour} {shape} moves {direction_to}",
    "{colour} {shape} travelling {direction_to} across a {background} background",
    "a {size} {colour} {shape} drifts {direction_to} {speed_adverb}",
    "the {colour} {shape} moves {direction} {speed_adverb} on a {background} background",
)
_DIRECTION_TO = {"left": "to the left", "right": "to the right", "up": "upward", "down": "downward"}
_SPEED_ADVERB = {"slow": "slowly", "fast": "quickly"}

SPLITS: tuple[str, ...] = ("train", "val", "heldout")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
SUPERSAMPLE = 4  # sub-pixel samples per axis: anti-aliased edges keep area ratios exact
SHARD_MTIME = 0.0  # fixed tar member timestamp, for byte-identical shards

# Words that `parse_caption` maps to attribute values (captions plus a few natural synonyms).
_DIRECTION_WORDS = {
    "left": "left", "leftward": "left", "leftwards": "left",
    "right": "right", "rightward": "right", "rightwards": "right",
    "up": "up", "upward": "up", "upwards": "up",
    "down": "down", "downward": "down", "downwards": "down",
}
_SPEED_WORDS = {"slow": "slow", "slowly": "slow", "fast": "fast", "quick": "fast", "quickly": "fast"}
_SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}

# Invariants the parser and the splits rely on.
assert not {w for name in BACKGROUNDS for w in name.split()} & set(COLOURS)
assert all(c in COLOURS and s in SHAPES and d in DIRECTIONS for c, s, d in HELDOUT_COMBOS)


def all_combos() -> list[Combo]:
    """Every (colour, shape, direction) triple, in vocabulary order."""
    return list(product(COLOURS, SHAPES, DIRECTIONS))


def seen_combos() -> list[Combo]:
    """The triples that train and val draw from: all but `HELDOUT_COMBOS`."""
    held = set(HELDOUT_COMBOS)
    return [c for c in all_combos() if c not in held]


def balanced_combos() -> list[Combo]:
    """One seen triple per (colour, direction) pair, shapes dealt in turn: every colour and every
    direction is asked for equally often, so a model that ignores one of those words scores
    exactly 1/len(values) on it (the chance level of a caption-accuracy test).

    The first 86 seen prompts, in vocabulary order, would name only three colours."""
    seen = set(seen_combos())
    combos = []
    for i, (colour, direction) in enumerate(product(COLOURS, DIRECTIONS)):
        # The next shape in turn whose triple is not held out (every pair keeps at least two).
        shapes = [SHAPES[(i + k) % len(SHAPES)] for k in range(len(SHAPES))]
        combos.append(next((colour, s, direction) for s in shapes if (colour, s, direction) in seen))
    return combos


def attribute_chance(combos: list[Combo]) -> dict[str, float]:
    """Per attribute, the accuracy of the best prompt-blind answer on these prompts: the share of
    the most frequent value. A model that ignores the word can match no more than this in
    expectation, whatever it draws."""
    chance = {}
    for i, name in enumerate(("colour", "shape", "direction")):
        values = [combo[i] for combo in combos]
        chance[name] = max(values.count(v) for v in set(values)) / len(values)
    return chance


def split_combos(split: str) -> list[Combo]:
    """The triples a split draws from: held-out ones for `heldout`, seen ones otherwise."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return list(HELDOUT_COMBOS) if split == "heldout" else seen_combos()


def caption_for(attrs: dict[str, Any], template: int | None = None) -> str:
    """Phrase attributes with TEMPLATES[template] (default: attrs["template"], else 0).

    Attributes a template does not mention may be absent; the defaults are small, slow, black.
    """
    index = attrs.get("template", 0) if template is None else template
    return TEMPLATES[index].format(
        colour=attrs["colour"],
        shape=attrs["shape"],
        direction=attrs["direction"],
        direction_to=_DIRECTION_TO[attrs["direction"]],
        size=attrs.get("size", "small"),
        speed=attrs.get("speed", "slow"),
        speed_adverb=_SPEED_ADVERB[attrs.get("speed", "slow")],
        background=attrs.get("background", "black"),
    )


def _one(values: set[str]) -> str | None:
    return next(iter(values)) if len(values) == 1 else None


def parse_caption(text: str) -> dict[str, str] | None:
    """Recover the attributes a caption names, or None if colour, shape or direction is missing
    or ambiguous. size, speed and background are included only when the caption names them."""
    lowered = " ".join(re.findall(r"[a-z]+", text.lower()))
    words = lowered.split()
    colour = _one({w for w in words if w in COLOURS})
    shape = _one({w for w in words if w in SHAPES})
    direction = _one({_DIRECTION_WORDS[w] for w in words if w in _DIRECTION_WORDS})
    if colour is None or shape is None or direction is None:
        return None
    attrs = {"colour": colour, "shape": shape, "direction": direction}
    optional = {
        "size": _one({_SIZE_WORDS[w] for w in words if w in _SIZE_WORDS}),
        "speed": _one({_SPEED_WORDS[w] for w in words if w in _SPEED_WORDS}),
        "background": _one({b for b in BACKGROUNDS if f" {b} background" in f" {lowered}"}),
    }
    attrs.update({k: v for k, v in optional.items() if v is not None})
    return attrs


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator behind sample `index` of `split`: independent of every other sample."""
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


@dataclass(frozen=True)
class Variation:
    """Which values of the free attributes a dataset draws from (default: all of them).

    Fewer values make an easier dataset: e.g. only large objects on black, which a tokenizer at
    32x32 reconstructs well enough for the oracle to read their shape (small 8-pixel objects lose
    their corners). Captions stay true: a template that names the size names the one drawn.
    """

    sizes: tuple[str, ...] = SIZES
    speeds: tuple[str, ...] = SPEEDS
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)

    def __post_init__(self) -> None:
        for name, values, vocab in (("sizes", self.sizes, SIZES), ("speeds", self.speeds, SPEEDS),
                                    ("backgrounds", self.backgrounds, tuple(BACKGROUNDS))):
            if not values:
                raise DataError(f"synthetic {name}: at least one value is needed, from {list(vocab)}")
            unknown = [v for v in values if v not in vocab]
            if unknown:
                raise DataError(f"synthetic {name}: unknown {unknown}; expected values from {list(vocab)}")
            if len(set(values)) != len(values):
                raise DataError(f"synthetic {name}: {list(values)} repeats a value")

    def as_dict(self) -> dict[str, list[str]]:
        return {"sizes": list(self.sizes), "speeds": list(self.speeds), "backgrounds": list(self.backgrounds)}


FULL_VARIATION = Variation()


def sample_attributes(combo: Combo, rng: np.random.Generator, variation: Variation = FULL_VARIATION) -> dict[str, Any]:
    """Draw the free attributes (speed, size, background, caption template) for one triple."""
    colour, shape, direction = combo
    # The same draws in the same order whatever the variation: the default reproduces the
    # shards written before variations existed, byte for byte.
    return {
        "colour": colour,
        "shape": shape,
        "direction": direction,
        "speed": variation.speeds[rng.integers(len(variation.speeds))],
        "size": variation.sizes[rng.integers(len(variation.sizes))],
        "background": variation.backgrounds[rng.integers(len(variation.backgrounds))],
        "template": int(rng.integers(len(TEMPLATES))),
    }


def _coverage(shape: str, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Fraction of each pixel inside the shape, float [size, size], from SUPERSAMPLE^2 samples."""
    half = side / 2
    # Only the pixels under the shape's box are sampled: the rest of the frame is uncovered.
    x0, x1 = max(int(cx - half), 0), min(int(np.ceil(cx + half)), size)
    y0, y1 = max(int(cy - half), 0), min(int(np.ceil(cy + half)), size)
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs = (np.arange(x0, x1)[:, None] + offsets).ravel()
    ys = (np.arange(y0, y1)[:, None] + offsets).ravel()
    dx = np.abs(xs[None, :] - cx)
    dy = ys[:, None] - cy
    if shape == "square":
        inside = (dx <= half) & (np.abs(dy) <= half)
    elif shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "triangle":  # apex up, base at the bottom: half the bounding box
        inside = (np.abs(dy) <= half) & (dx <= (dy + half) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    coverage = np.zeros((size, size))
    coverage[y0:y1, x0:x1] = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    return coverage


def render_video(
    attrs: dict[str, Any], size: int = 64, frames: int = 17, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Render uint8 [frames, size, size, 3] for `attrs` (colour, shape, direction; speed, size and
    background default to slow, small, black). `rng` picks the start position and the size and
    travel jitter (None: centred, no jitter). The object stays inside the frame throughout."""
    fg = np.array(COLOURS[attrs["colour"]], dtype=np.float32)
    bg = np.array(BACKGROUNDS[attrs.get("background", "black")], dtype=np.float32)
    vx, vy = DIRECTION_VECTORS[attrs["direction"]]

    def jitter() -> float:
        return 1.0 if rng is None else float(rng.uniform(1 - JITTER, 1 + JITTER))

    side = SIZE_FRACTION[attrs.get("size", "small")] * size * jitter()
    travel = TRAVEL_FRACTION[attrs.get("speed", "slow")] * size * jitter()
    lo, hi = MARGIN_PX + side / 2, size - MARGIN_PX - side / 2  # allowed centre range
    if hi - lo < travel:
        raise ValueError(f"frame size {size} is too small for a {attrs.get('size')} object")

    def start(moving: int) -> float:
        # Along the motion the whole path must fit; across it any position inside will do.
        span = hi - lo - (travel if moving else 0.0)
        offset = span / 2 if rng is None else float(rng.uniform(0.0, span))
        return (hi - offset) if moving < 0 else (lo + offset)

    cx0, cy0 = start(vx), start(vy)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        progress = t / (frames - 1) if frames > 1 else 0.0
        cx, cy = cx0 + vx * travel * progress, cy0 + vy * travel * progress
        alpha = _coverage(attrs["shape"], cx, cy, side, size)[..., None]
        video[t] = np.rint(bg + (fg - bg) * alpha).astype(np.uint8)
    return video


@dataclass
class SyntheticSample:
    """One rendered clip with its caption and attributes (the sample's json, minus video info)."""

    video: np.ndarray  # uint8 [T, H, W, 3]
    caption: str
    attrs: dict[str, Any]


def render_sample(seed: int, split: str, index: int, size: int = 64, frames: int = 17,
                  variation: Variation = FULL_VARIATION) -> SyntheticSample:
    """Sample `index` of `split` exactly as `build_synthetic` writes it (before encoding).

    Triples are dealt from a seed-shuffled cycle, so each one appears equally often in a split.
    """
    combos = split_combos(split)
    order = np.random.default_rng([seed, _SPLIT_IDS[split]]).permutation(len(combos))
    rng = sample_rng(seed, split, index)
    attrs = sample_attributes(combos[order[index % len(combos)]], rng, variation)
    video = render_video(attrs, size, frames, rng)
    attrs.update(seed=seed, split=split, index=index)
    return SyntheticSample(video, caption_for(attrs), attrs)


@dataclass(frozen=True)
class _Job:
    seed: int
    split: str
    index: int
    size: int
    frames: int
    fps: float
    variation: Variation = FULL_VARIATION


def _encode_job(job: _Job) -> tuple[str, bytes, str, dict[str, Any]]:
    """Render and encode one sample (runs in worker processes)."""
    sample = render_sample(job.seed, job.split, job.index, job.size, job.frames, job.variation)
    mp4, n = encode_mp4(sample.video, job.fps, reproducible=True)
    meta = {
        "fps": job.fps,
        "num_frames": n,
        "width": job.size,
        "height": job.size,
        "duration": n / job.fps,
        "source": "synthetic",
        **sample.attrs,
    }
    return f"{job.split}-{job.index:06d}", mp4, sample.caption, meta


def _run_jobs(jobs: list[_Job], workers: int) -> Iterator[tuple[str, bytes, str, dict[str, Any]]]:
    """Results in job order, from `workers` processes (0: in this process)."""
    if workers == 0:
        yield from map(_encode_job, jobs)
        return
    # spawn: forking a parent that has started torch or OpenMP threads can deadlock.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_encode_job, jobs, chunksize=8)


@dataclass
class SyntheticBuild:
    """What `build_synthetic` wrote."""

    out_dir: Path
    patterns: dict[str, str] = field(default_factory=dict)  # split -> brace pattern of its shards
    counts: dict[str, int] = field(default_factory=dict)  # split -> number of samples
    prompt_files: dict[str, Path] = field(default_factory=dict)  # "seen"/"heldout" -> .txt file


def _write_prompts(out_dir: Path, name: str, combos: list[Combo]) -> Path:
    """prompts_<name>.txt (one canonical caption per triple) and .jsonl (with its attributes)."""
    rows = [
        {"prompt": caption_for({"colour": c, "shape": s, "direction": d}, 0),
         "colour": c, "shape": s, "direction": d, "template": 0}
        for c, s, d in combos
    ]
    txt = out_dir / f"prompts_{name}.txt"
    txt.write_text("".join(row["prompt"] + "\n" for row in rows))
    (out_dir / f"prompts_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return txt


def vocabulary() -> dict[str, Any]:
    """The vocabularies, templates and held-out triples, as written to attributes.json."""
    return {
        "colours": {k: list(v) for k, v in COLOURS.items()},
        "shapes": list(SHAPES),
        "directions": list(DIRECTIONS),
        "speeds": list(SPEEDS),
        "sizes": list(SIZES),
        "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()},
        "templates": list(TEMPLATES),
        "heldout": [list(c) for c in HELDOUT_COMBOS],
    }


def build_synthetic(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_train: int = 1024,
    num_val: int = 128,
    num_heldout: int = 128,
    size: int = 64,
    frames: int = 17,
    fps: float = 8.0,
    samples_per_shard: int = 128,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    variation: Variation = FULL_VARIATION,
) -> SyntheticBuild:
    """Write `OUT/{train,val,heldout}/shard-*.tar`, the prompt files and attributes.json.

    A split with zero samples is skipped. Existing shards are only replaced with overwrite=True
    (DataError otherwise, raised before anything is rendered). workers=None: min(4, CPUs).
    `variation` restricts the free attributes (size, speed, background) to some of their values.
    """
    if seed < 0:
        raise DataError(f"--seed must be >= 0, got {seed}")
    if size < 16 or size % 2:
        raise DataError(f"--size must be an even number >= 16 (h264 yuv420), got {size}")
    if frames < 2:
        raise DataError(f"--frames must be >= 2 so that the object can move, got {frames}")
    if fps <= 0:
        raise DataError(f"--fps must be > 0, got {fps}")
    counts = {"train": num_train, "val": num_val, "heldout": num_heldout}
    if any(n < 0 for n in counts.values()):
        raise DataError(f"sample counts must be >= 0, got {counts}")
    workers = min(4, usable_cpus()) if workers is None else workers
    if workers < 0:
        raise DataError(f"--workers must be >= 0, got {workers}")

    out = Path(out_dir)
    counts = {split: n for split, n in counts.items() if n > 0}
    sinks: dict[str, ShardSink] = {}
    try:
        # Open every sink first: each refuses existing shards before any time is spent rendering.
        for split in counts:
            sinks[split] = ShardSink(out / split, samples_per_shard, overwrite=overwrite, mtime=SHARD_MTIME)
        jobs = [_Job(seed, split, i, size, frames, float(fps), variation) for split, n in counts.items() for i in range(n)]
        with tqdm(total=len(jobs), desc="synthetic", unit="clip", disable=not progress) as bar:
            for key, mp4, caption, meta in _run_jobs(jobs, workers):
                sinks[meta["split"]].write(key, mp4, caption, meta)
                bar.update()
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    build = SyntheticBuild(out, counts=counts)
    for split, sink in sinks.items():
        sink.close()
        build.patterns[split] = sink.pattern
    build.prompt_files["seen"] = _write_prompts(out, "seen", seen_combos())
    build.prompt_files["heldout"] = _write_prompts(out, "heldout", list(HELDOUT_COMBOS))
    info = {
        **vocabulary(),
        "seed": seed,
        "size": size,
        "frames": frames,
        "fps": float(fps),
        "variation": variation.as_dict(),
        "splits": {s: {"pattern": build.patterns[s], "num_samples": n} for s, n in counts.items()},
    }
    (out / "attributes.json").write_text(json.dumps(info, indent=1))
    return build
