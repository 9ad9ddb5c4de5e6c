"""The caption-accuracy oracle on synthetic clips after an h264 round trip, and on non-objects."""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest
import torch

from maskvid.datamodules.synthetic import BACKGROUNDS, SIZES, SPEEDS, all_combos, render_video
from maskvid.datamodules.video_io import decode_all, encode_mp4
from maskvid.metrics.oracle import NO_OBJECT, STATIC, caption_accuracy, recover

BACKGROUND_NAMES = list(BACKGROUNDS)


def round_trip(video: np.ndarray) -> np.ndarray:
    """What a model trained on the shards sees: the clip after h264 encoding and decoding."""
    return decode_all(encode_mp4(video, fps=8)[0])


def clips(size: int, attrs_list: list[dict], frames: int = 17) -> list[np.ndarray]:
    return [
        round_trip(render_video(a, size, frames, np.random.default_rng([size, i])))
        for i, a in enumerate(attrs_list)
    ]


def test_accurate_on_every_combination_at_64():
    # 96 triples x 2 speeds x 2 sizes = 384 clips, backgrounds in turn.
    attrs_list = [
        {"colour": c, "shape": s, "direction": d, "speed": sp, "size": sz,
         "background": BACKGROUND_NAMES[i % len(BACKGROUND_NAMES)]}
        for i, ((c, s, d), sp, sz) in enumerate(product(all_combos(), SPEEDS, SIZES))
    ]
    result = caption_accuracy(clips(64, attrs_list), attrs_list)
    assert result["n"] == 384
    assert result["joint"] >= 0.99, result
    assert min(result["colour"], result["shape"], result["direction"]) >= result["joint"]


@pytest.mark.parametrize("size", [32, 128])
def test_accurate_at_other_sizes(size):
    rng = np.random.default_rng(size)
    combos = all_combos()
    attrs_list = [
        {"colour": c, "shape": s, "direction": d, "speed": SPEEDS[rng.integers(2)],
         "size": SIZES[rng.integers(2)], "background": BACKGROUND_NAMES[rng.integers(4)]}
        for c, s, d in (combos[i % len(combos)] for i in range(128))
    ]
    result = caption_accuracy(clips(size, attrs_list, frames=9), attrs_list)
    assert result["joint"] >= 0.99, result


@pytest.mark.parametrize(
    "video",
    [
        np.random.default_rng(0).integers(0, 256, (17, 64, 64, 3), dtype=np.uint8),
        round_trip(np.random.default_rng(1).integers(0, 256, (17, 64, 64, 3), dtype=np.uint8)),
        np.zeros((17, 64, 64, 3), np.uint8),
        np.full((9, 32, 32, 3), (200, 40, 40), np.uint8),
    ],
    ids=["noise", "noise-h264", "black", "flat-red"],
)
def test_no_object_in_noise_or_blank_frames(video):
    result = recover(video)
    assert (result.colour, result.shape, result.direction) == (NO_OBJECT, NO_OBJECT, NO_OBJECT)


def test_still_object_is_static():
    attrs = {"colour": "cyan", "shape": "triangle", "direction": "down", "background": "navy"}
    frame = render_video(attrs, 64, frames=2, rng=np.random.default_rng(0))[:1]
    result = recover(round_trip(np.repeat(frame, 17, axis=0)))
    assert (result.colour, result.shape, result.direction) == ("cyan", "triangle", STATIC)
    assert result.displacement == pytest.approx((0.0, 0.0), abs=0.01)


def test_accepts_torch_tensors_and_scores_each_attribute():
    attrs = {"colour": "orange", "shape": "square", "direction": "up", "speed": "fast"}
    video = round_trip(render_video(attrs, 64, 17, np.random.default_rng(0)))
    result = recover(torch.from_numpy(video))
    assert (result.colour, result.shape, result.direction) == ("orange", "square", "up")
    assert result.displacement[1] < -0.3 and result.object_frames == 1.0
    wrong = {**attrs, "colour": "red"}
    assert caption_accuracy([video, video], [attrs, wrong]) == {
        "colour": 0.5, "shape": 1.0, "direction": 1.0, "joint": 0.5, "n": 2}


def test_rejects_non_video_input():
    for bad in (np.zeros((17, 64, 64, 3), np.float32), np.zeros((64, 64, 3), np.uint8),
                np.zeros((0, 64, 64, 3), np.uint8)):
        with pytest.raises(ValueError):
            recover(bad)
