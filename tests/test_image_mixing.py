"""Joint image-video training (issue 35, item 2): image shards mixed into the train stream at a
configured ratio, images as 1-frame clips, and resume exact anywhere in the mixed stream."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from maskvid.datamodules.mixing import MIX_BLOCK, MixedStream, images_before
from maskvid.datamodules.streams import TrainStream
from maskvid.datamodules.video_datamodule import VideoDataModule
from tests.conftest import write_shards
from tests.test_datamodule import take


def fake_shards(tmp_path, name: str, n: int) -> list[str]:
    """n tiny raw samples (no media) over 4 shards: the streams' bookkeeping without decoding."""
    out = write_shards(tmp_path / name, [{"__key__": f"{name}{i:04d}", "txt": name} for i in range(n)],
                       samples_per_shard=max(1, n // 4))
    return sorted(str(p) for p in (tmp_path / name).glob("*.tar"))


def by_key(raw: dict, rng) -> dict:
    """A decoder that keeps the key (and draws from the rng, as clip crops do)."""
    return {"key": raw["__key__"], "draw": int(rng.integers(1 << 30)),
            "meta": {"key": raw["__key__"], "url": raw["__url__"], "info": {}}}


def mixed(tmp_path, ratio: float, seed: int = 0, rank: int = 0) -> MixedStream:
    videos = TrainStream(fake_shards(tmp_path, "video", 60), by_key, seed=seed, rank=rank, shuffle_buffer=16)
    images = TrainStream(fake_shards(tmp_path, "image", 40), by_key, seed=seed, rank=rank, shuffle_buffer=16,
                         stream=1)
    return MixedStream(videos, images, ratio)


def first(stream, n: int, worker: int = 0, position: int = 0) -> list[dict]:
    it = stream.samples(worker, position)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.73])
def test_the_mixed_stream_yields_the_configured_ratio(tmp_path, ratio):
    n = 20 * MIX_BLOCK
    samples = first(mixed(tmp_path, ratio), n + 100)
    is_image = np.array([s["meta"]["stream"] == "image" for s in samples])
    assert all(s["key"].startswith(s["meta"]["stream"]) for s in samples)  # each from its own shards
    # Exact at every block boundary (floor(n * ratio)), and within one block's images anywhere.
    counts = np.cumsum(is_image)
    for blocks in range(1, 21):
        assert counts[blocks * MIX_BLOCK - 1] == int(blocks * MIX_BLOCK * ratio)
    positions = np.arange(1, len(counts) + 1)
    assert np.abs(counts - positions * ratio).max() <= MIX_BLOCK * ratio + 1
    # Not a fixed pattern: the places differ from block to block and between ranks.
    assert not np.array_equal(is_image[:MIX_BLOCK], is_image[MIX_BLOCK : 2 * MIX_BLOCK])
    other_rank = first(mixed(tmp_path, ratio, rank=1), MIX_BLOCK)
    assert [s["meta"]["stream"] for s in other_rank] != [s["meta"]["stream"] for s in samples[:MIX_BLOCK]]
    # Each sub-stream is read in its own order, without gaps: the video stream alone.
    alone = TrainStream(fake_shards(tmp_path, "video", 60), by_key, seed=0, shuffle_buffer=16)
    videos = [s["key"] for s in samples if s["meta"]["stream"] == "video"]
    assert videos == [s["key"] for s in first(alone, len(videos))]


def test_resuming_anywhere_gives_the_uninterrupted_samples(tmp_path):
    stream = mixed(tmp_path, 0.3)
    full = first(stream, 3 * MIX_BLOCK)
    for position in (1, 37, MIX_BLOCK - 1, MIX_BLOCK, MIX_BLOCK + 101, 2 * MIX_BLOCK + 5):
        assert images_before(0, 0, 0, position, 0.3) == sum(s["meta"]["stream"] == "image" for s in full[:position])
        resumed = first(mixed(tmp_path, 0.3), 60, position=position)
        expected = full[position : position + 60]
        assert [(s["key"], s["draw"], s["meta"]["position"]) for s in resumed] == [
            (s["key"], s["draw"], s["meta"]["position"]) for s in expected], position


def test_ratio_one_reads_images_only_and_bad_ratios_are_refused(tmp_path):
    images = TrainStream(fake_shards(tmp_path, "image", 40), by_key, shuffle_buffer=16, stream=1)
    assert {s["meta"]["stream"] for s in first(MixedStream(None, images, 1.0), 50)} == {"image"}
    with pytest.raises(ValueError, match="needs a video stream"):
        MixedStream(None, images, 0.5)
    with pytest.raises(ValueError, match="image_shards is not set"):
        VideoDataModule(train_shards="x", image_ratio=0.5)
    with pytest.raises(ValueError, match="image_ratio is 0"):
        VideoDataModule(train_shards="x", image_shards="y")
    with pytest.raises(ValueError, match="within"):
        VideoDataModule(train_shards="x", image_shards="y", image_ratio=1.5)


def image_item(key: str, fmt: str, colour: tuple[int, int, int]) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt],
                                            quality=95)
    return {"__key__": key, fmt: buf.getvalue(), "txt": f"a picture {key}"}


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> str:
    """24 flat-colour jpg/png/webp images over 3 shards."""
    items = [image_item(f"img{i:02d}", ("jpg", "png", "webp")[i % 3], (40 + 8 * i, 200, 30)) for i in range(24)]
    return write_shards(tmp_path_factory.mktemp("images"), items, samples_per_shard=8)


def dm(clean_shards, image_shards, **kw) -> VideoDataModule:
    args = dict(train_shards=clean_shards, image_shards=image_shards, image_ratio=0.4, num_frames=5,
                resolution=16, batch_size=4, num_workers=0)
    return VideoDataModule(**{**args, **kw})


def test_images_arrive_as_one_frame_clips_among_the_videos(clean_shards, image_shards):
    batches = take(dm(clean_shards, image_shards).train_dataloader(), 10)
    streams = [s for b in batches for s in b["meta"]["stream"]]
    assert 0 < streams.count("image") < len(streams)
    # The first 40 positions hold floor(40 * 0.4) = 16 images only at a block boundary; here,
    # within one block, the count is what the places say.
    assert streams.count("image") == images_before(0, 0, 0, 40, 0.4)
    for batch in batches:
        for i, (stream, key) in enumerate(zip(batch["meta"]["stream"], batch["meta"]["key"])):
            mask = batch["frame_mask"][i]
            if stream == "image":
                assert key.startswith("img") and batch["caption"][i] == f"a picture {key}"
                assert mask.tolist() == [True, False, False, False, False]
                clip = batch["video"][i]
                assert all(torch.equal(clip[:, k], clip[:, 0]) for k in range(1, 5))  # padding: copies
                green = clip[1, 0].mean()
                assert green > 0.5  # the picture's colour, not a video's grey ramp
            else:
                assert key.startswith("v") and bool(mask[1])  # videos have at least 6 frames


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mixed_loader_resumes_exactly(clean_shards, image_shards, num_workers):
    loader = dm(clean_shards, image_shards, num_workers=num_workers).train_dataloader()
    full = take(loader, 7)
    interrupted = dm(clean_shards, image_shards, num_workers=num_workers).train_dataloader()
    take(interrupted, 3)
    state = interrupted.state_dict()
    assert state["batches"] == 3 and state["image_ratio"] == 0.4
    resumed_dm = dm(clean_shards, image_shards, num_workers=num_workers)
    resumed_dm.load_state_dict({"train_loader": state})
    resumed = take(resumed_dm.train_dataloader(), 4)
    assert len(resumed) == 4
    for x, y in zip(resumed, full[3:]):
        assert x["meta"]["key"] == y["meta"]["key"] and x["meta"]["stream"] == y["meta"]["stream"]
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["frame_mask"], y["frame_mask"])
    assert any("image" in b["meta"]["stream"] for b in resumed)
    # A resume with another ratio is flagged: same position, other samples.
    with pytest.warns(UserWarning, match="image_ratio changed"):
        dm(clean_shards, image_shards, image_ratio=0.5).load_state_dict({"train_loader": state})


def test_image_ratio_one_needs_no_video_shards(image_shards):
    batches = take(VideoDataModule(image_shards=image_shards, image_ratio=1.0, num_frames=3, resolution=16,
                                   batch_size=4, num_workers=0).train_dataloader(), 3)
    assert all(s == "image" for b in batches for s in b["meta"]["stream"])
    assert all(b["frame_mask"].tolist() == [[True, False, False]] * 4 for b in batches)
