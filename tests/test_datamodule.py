"""VideoDataModule: batch contract, clip decoding, determinism, resume, bad data, val split."""

from __future__ import annotations

import logging

import pytest
import torch

from maskvid.datamodules.errors import DataError
from maskvid.datamodules.streams import ValStream, expand_shards
from maskvid.datamodules.video_datamodule import VideoDataModule
from tests.conftest import make_bad_shards, mp4_item, png_item, ramp_video, write_shards


def make_dm(shards: str, **kw) -> VideoDataModule:
    args = dict(train_shards=shards, val_shards=shards, num_frames=8, resolution=16, batch_size=4, num_workers=0)
    args.update(kw)
    return VideoDataModule(**args)


def take(loader, n: int, consume: bool = True) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if consume and hasattr(loader, "mark_consumed"):
            loader.mark_consumed(batch["meta"]["batch_index"])
        if len(out) == n:
            break
    return out


def level(batch_video: torch.Tensor) -> torch.Tensor:
    """Grey level (0..255) of each frame's right half (the left quarter is a red marker)."""
    right = batch_video[:, 1, :, :, batch_video.shape[-1] // 2 :]
    return ((right.mean(dim=(-1, -2)) + 1) * 127.5).round()


def test_batch_contract(clean_shards):
    batch = take(make_dm(clean_shards).train_dataloader(), 1)[0]
    video = batch["video"]
    assert video.shape == (4, 3, 8, 16, 16) and video.dtype == torch.float32
    assert video.min() >= -1.0 and video.max() <= 1.0
    assert batch["frame_mask"].shape == (4, 8) and batch["frame_mask"].dtype == torch.bool
    assert len(batch["caption"]) == 4 and all(c.startswith("clip number") for c in batch["caption"])
    assert len(batch["meta"]["key"]) == 4 and all(u.endswith(".tar") for u in batch["meta"]["url"])
    # Frames are consecutive source frames (stride 1): the grey ramp rises 8 levels per frame.
    steps = level(video).diff(dim=1)
    real = batch["frame_mask"][:, 1:]  # padded frames repeat the last one (tested below)
    assert torch.all((steps[real] - 8).abs() <= 2), steps


def test_normalize_on_device_gives_same_values(clean_shards):
    a = take(make_dm(clean_shards).train_dataloader(), 1)[0]
    dm = make_dm(clean_shards, normalize_on_device=True)
    b = take(dm.train_dataloader(), 1)[0]
    assert b["video"].dtype == torch.uint8
    b = dm.on_after_batch_transfer(b, 0)
    assert torch.equal(a["video"], b["video"])


def test_stride_and_fps(tmp_path):
    shards = write_shards(tmp_path, [mp4_item(f"k{i}", ramp_video(i, 24), "c", fps=8) for i in range(4)])
    for kw, expected in [({"frame_stride": 2}, 16), ({"fps": 4.0}, 16), ({"fps": 8.0}, 8)]:
        batch = take(make_dm(shards, num_frames=6, **kw).train_dataloader(), 1)[0]
        steps = level(batch["video"]).diff(dim=1)
        assert torch.all((steps - expected).abs() <= 2), (kw, steps)


def test_short_video_padded_or_skipped_and_image(tmp_path):
    items = [mp4_item("short", ramp_video(0, 3), "short one"), png_item("img", "an image")]
    shards = write_shards(tmp_path, items)
    dm = make_dm(shards, batch_size=2)
    batch = next(iter(dm.val_dataloader()))
    by_key = dict(zip(batch["meta"]["key"], range(2)))
    short, img = by_key["short"], by_key["img"]
    assert batch["frame_mask"][short].tolist() == [True] * 3 + [False] * 5
    # Padding repeats the last real frame.
    assert torch.equal(batch["video"][short, :, 3], batch["video"][short, :, 2])
    assert torch.equal(batch["video"][short, :, 7], batch["video"][short, :, 2])
    assert batch["frame_mask"][img].tolist() == [True] + [False] * 7
    red = batch["video"][img, :, 0].mean(dim=(-1, -2))
    assert red[0] > 0.4 and red[1] < -0.4
    # With short_videos="skip" the short video is dropped and counted.
    batches = list(make_dm(shards, batch_size=2, short_videos="skip").val_dataloader())
    assert [k for b in batches for k in b["meta"]["key"]] == ["img"]
    assert batches[-1]["meta"]["skipped"] == 1


def test_rotation_is_honoured(tmp_path):
    import av
    import io

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        s.set_display_rotation(90)
        for f in ramp_video(0, 8, width=64, height=32):
            f[:8] = (0, 255, 0)  # green marker on the stored frame's top edge
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    shards = write_shards(tmp_path, [{"__key__": "rot", "mp4": buf.getvalue(), "txt": "rotated"}])
    video = next(iter(make_dm(shards, batch_size=1, resolution=32).val_dataloader()))["video"][0]
    green = video[1, 0]  # [H, W] green channel of frame 0 (upright 32x64, center-cropped to 32x32)
    # Displayed 90 degrees counter-clockwise: the stored top edge becomes the left edge.
    assert green[:, :4].mean() > 0.9 and green[:, -4:].mean() < 0.0


def test_stream_is_deterministic_and_rank_dependent(clean_shards):
    def keys(**kw):
        dm = make_dm(clean_shards, num_workers=2, **kw)
        return [b["meta"]["key"] for b in take(dm.train_dataloader(), 5)], dm

    a, _ = keys()
    b, _ = keys()
    assert a == b
    assert keys(seed=1)[0] != a
    dm = make_dm(clean_shards, num_workers=2)
    dm.trainer = None
    ds_loader = dm.train_dataloader()
    ds_loader.dataset.rank = 1
    assert [x["meta"]["key"] for x in take(ds_loader, 5)] != a


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("batches_per_epoch", [None, 4])
def test_resume_from_state_dict_continues_exactly(clean_shards, num_workers, batches_per_epoch):
    kw = dict(num_workers=num_workers, batches_per_epoch=batches_per_epoch)
    loader = make_dm(clean_shards, **kw).train_dataloader()
    full = take(loader, 3) + take(loader, 4)  # two "epochs" when batches_per_epoch=4
    reference = take(make_dm(clean_shards, **kw).train_dataloader(), 3)
    interrupted = make_dm(clean_shards, **kw).train_dataloader()
    consumed = take(interrupted, 3)
    assert [b["meta"]["key"] for b in consumed] == [b["meta"]["key"] for b in reference]
    state = interrupted.state_dict()
    assert state["batches"] == 3

    dm = make_dm(clean_shards, **kw)
    dm.load_state_dict({"train_loader": state})  # before the loader exists, as Lightning does
    resumed = take(dm.train_dataloader(), 4)
    assert len(resumed) == len(full[3:]) == 4  # zip would pass on nothing
    for x, y in zip(resumed, full[3:]):
        assert x["meta"]["key"] == y["meta"]["key"]
        assert torch.equal(x["video"], y["video"])
        assert x["meta"]["batch_index"] == y["meta"]["batch_index"]


def test_prefetched_but_unconsumed_batches_are_not_skipped_on_resume(clean_shards):
    loader = make_dm(clean_shards).train_dataloader()
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    loader.mark_consumed(first[1]["meta"]["batch_index"])  # batch 2 was only prefetched
    assert loader.state_dict()["batches"] == 2
    resumed = make_dm(clean_shards).train_dataloader()
    resumed.load_state_dict(loader.state_dict())
    assert next(iter(resumed))["meta"]["key"] == first[2]["meta"]["key"]


@pytest.fixture
def bad_shards(tmp_path) -> str:
    return make_bad_shards(tmp_path)


def test_bad_samples_are_skipped_counted_and_named(bad_shards, caplog):
    with caplog.at_level(logging.WARNING, logger="maskvid.data"):
        batches = list(make_dm(bad_shards, batch_size=3).val_dataloader())
    keys = [k for b in batches for k in b["meta"]["key"]]
    assert sorted(keys) == [f"good{i:02d}" for i in range(12)]
    assert batches[-1]["meta"]["skipped"] == 6
    text = caplog.text
    for key in ["truncated", "garbage", "nocaption", "emptycaption", "badjson", "novideo"]:
        assert f"key={key} " in text
    assert "shard-000000.tar" in text

    # The endless train stream replaces bad samples and keeps going, deterministically.
    dm = make_dm(bad_shards, batch_size=3)
    loader = dm.train_dataloader()
    batches = take(loader, 12)
    assert all(k.startswith("good") for b in batches for k in b["meta"]["key"])
    assert loader.skipped > 0 and dm.skipped == loader.skipped
    again = take(make_dm(bad_shards, batch_size=3).train_dataloader(), 12)
    assert [b["meta"]["key"] for b in again] == [b["meta"]["key"] for b in batches]
    # ... and resumes exactly even though positions were replaced.
    state = dict(loader.state_dict(), batches=5)
    resumed = make_dm(bad_shards, batch_size=3).train_dataloader()
    resumed.load_state_dict(state)
    assert [b["meta"]["key"] for b in take(resumed, 7)] == [b["meta"]["key"] for b in batches[5:]]


def test_missing_caption_keep_policy(bad_shards):
    batches = list(make_dm(bad_shards, batch_size=3, missing_caption="keep").val_dataloader())
    captions = dict(zip([k for b in batches for k in b["meta"]["key"]], [c for b in batches for c in b["caption"]]))
    assert captions["nocaption"] == "" and captions["emptycaption"] == ""


def test_all_bad_data_raises_clear_error(tmp_path):
    shards = write_shards(tmp_path, [{"__key__": f"b{i}", "mp4": b"junk", "txt": "x"} for i in range(4)])
    with pytest.raises(DataError, match="consecutive bad samples"):
        take(make_dm(shards, batch_size=2).train_dataloader(), 1)


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 1), (2, 3)])
def test_val_split_sees_each_sample_once(clean_shards, world, workers):
    """Shard-level split (5 shards >= parts) and sample-level split (fewer shards than parts)."""
    dm = make_dm(clean_shards)
    urls = expand_shards(clean_shards)
    seen = []
    import torch.utils.data as tud

    for rank in range(world):
        ds = ValStream(urls, dm.decoder, rank=rank, world_size=world)
        for worker in range(workers):
            info = tud._utils.worker.WorkerInfo(id=worker, num_workers=workers, seed=0, dataset=ds)
            tud._utils.worker._worker_info = info
            try:
                seen += [s["meta"]["key"] for s in ds]
            finally:
                tud._utils.worker._worker_info = None
    assert sorted(seen) == [f"v{i:03d}" for i in range(40)]


def test_expand_shards_forms(clean_shards):
    from pathlib import Path

    tars = sorted(str(p) for p in Path(clean_shards).glob("*.tar"))
    assert expand_shards(clean_shards) == tars
    assert expand_shards(f"{clean_shards}/shard-{{000000..000004}}.tar") == tars
    assert expand_shards("::".join(tars[:2])) == tars[:2]
    assert expand_shards(tars[:3]) == tars[:3]
    with pytest.raises(DataError, match="do not exist"):
        expand_shards(f"{clean_shards}/shard-{{000000..000009}}.tar")
    # pipe: URLs stream through a shell command, as for object stores.
    dm = make_dm(f"pipe:cat {tars[0]}", batch_size=2)
    assert len(list(dm.val_dataloader())) == 4


def test_bad_options_fail_early():
    with pytest.raises(ValueError, match="short"):
        VideoDataModule(train_shards="x", short_videos="drop")
    with pytest.raises(ValueError):
        VideoDataModule(train_shards="x", num_frames=0)
    with pytest.raises(ValueError, match="train_shards is not set"):
        VideoDataModule().train_dataloader()


def test_clip_pixels_equal_plain_pyav_conversion():
    """The clip decoder reuses one swscale context per video (benchmarks/data_throughput.py); its
    pixels must equal PyAV's per-frame `to_ndarray(width=, height=)`, bit for bit."""
    import io

    import av
    import numpy as np

    from maskvid.datamodules.clips import ClipSpec, decode_clip
    from maskvid.datamodules.video_io import encode_mp4

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:96, 0:128]
    frames = [((np.sin(0.07 * xx + 0.05 * yy + 0.4 * t)[..., None] * 90 + 120)
               + rng.integers(0, 30, (96, 128, 3))).clip(0, 255).astype(np.uint8) for t in range(10)]
    data, _ = encode_mp4(frames, fps=8)
    clip, mask = decode_clip(data, ClipSpec(num_frames=6, size=48))
    with av.open(io.BytesIO(data)) as container:
        # Short side 96 -> 48: 64x48, center-cropped to 48x48.
        plain = [f.to_ndarray(format="rgb24", width=64, height=48)[:, 8:56] for _, f in zip(range(6), container.decode(video=0))]
    assert mask.all() and clip.shape == (6, 48, 48, 3)
    np.testing.assert_array_equal(clip, np.stack(plain))


class _ThreadsSeen(torch.utils.data.Dataset):
    """Each item: the decoder threads a clip decoded in this process (or worker) would get."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        from maskvid.datamodules.clips import _worker_threads

        return _worker_threads()


@pytest.fixture
def node(monkeypatch):
    """A 16-CPU affinity mask, no launcher variables: the test sets the ones it needs."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    return monkeypatch


def test_decode_threads_share_the_affinity_among_local_ranks_and_workers(node):
    from maskvid.datamodules.cpus import decode_threads, local_world_size, usable_cpus

    assert usable_cpus() == 16 and local_world_size() == 1
    assert decode_threads(0) == 16 and decode_threads(4) == 4
    node.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, or maskvid's strategies under Lightning
    assert decode_threads(2) == 2 and decode_threads(0) == 4
    assert decode_threads(8) == 1  # never 0: 16 CPUs, 32 workers
    node.delenv("LOCAL_WORLD_SIZE")
    node.setenv("SLURM_TASKS_PER_NODE", "8(x2)")
    assert local_world_size() == 8 and decode_threads(2) == 1
    node.setenv("SLURM_NTASKS_PER_NODE", "2")
    assert decode_threads(2) == 4
    node.setattr("os.sched_getaffinity", lambda pid: {3, 5})  # pinned to two cores of a big machine
    assert usable_cpus() == 2 and decode_threads(1) == 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_clip_decoder_threads_in_workers(node, num_workers):
    """What a DataLoader worker (forked, inheriting the mask and the environment) hands FFmpeg."""
    node.setenv("LOCAL_WORLD_SIZE", "2")
    loader = torch.utils.data.DataLoader(_ThreadsSeen(), batch_size=None, num_workers=num_workers)
    assert sorted(int(t) for t in loader) == [16 // (2 * max(1, num_workers))] * 4


def test_decoded_clip_gets_those_threads(node):
    import av

    from maskvid.datamodules import clips
    from maskvid.datamodules.video_io import encode_mp4
    from tests.conftest import ramp_video

    node.setenv("LOCAL_WORLD_SIZE", "8")
    seen = []
    opened = clips._video_stream

    def spy(container):
        stream = opened(container)
        seen.append(stream)
        return stream

    node.setattr(clips, "_video_stream", spy)
    data, _ = encode_mp4(ramp_video(0, 6), fps=8)
    frames, mask = clips.decode_clip(data, clips.ClipSpec(num_frames=4, size=16))
    assert frames.shape == (4, 16, 16, 3) and mask.all()
    assert [s.codec_context.thread_count for s in seen] == [2]
    assert isinstance(seen[0], av.video.stream.VideoStream)
