"""Shards written by video2dataset train as they are: same reader, same decoder as ours.

The fixture copies video2dataset's layout: tars named `00000.tar` with 9-digit keys, `mp4` + `txt`
+ `json` (url, caption, key, status, WebVid's extra columns) per sample, records of failed
downloads (`txt` + `json` with status `failed_to_download`, no mp4), an audio member, and
`_stats.json` / `.parquet` files beside the tars. The videos are real h264 mp4s made with PyAV.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import webdataset as wds

from maskvid.datamodules.streams import expand_shards, shard_size
from maskvid.datamodules.video_datamodule import VideoDataModule
from maskvid.launch.cli import main
from tests.media_fixtures import write_audio, write_video

FAILED = "failed_to_download"
# key -> (caption in txt, or None for no txt member; caption in the json; frames; status)
SHARDS = {
    "00000": {
        "000000000": ("a dog runs on the beach", "a dog runs on the beach", 10, "success"),
        "000000001": ("lost video", "lost video", 0, FAILED),
        "000000002": ("", "caption only in the json", 12, "success"),
        "000000003": ("with an audio track", "with an audio track", 8, "success"),
    },
    "00001": {
        "000010000": (None, "no txt member at all", 9, "success"),
        "000010001": ("another lost one", "another lost one", 0, FAILED),
        "000010002": ("waves at sunset", "waves at sunset", 11, "success"),
        "000010003": ("  spaces around  ", "  spaces around  ", 8, "success"),
    },
}
EXPECTED = {  # the caption each good sample trains with
    "000000000": "a dog runs on the beach",
    "000000002": "caption only in the json",
    "000000003": "with an audio track",
    "000010000": "no txt member at all",
    "000010002": "waves at sunset",
    "000010003": "spaces around",
}


def v2d_meta(key: str, caption: str, status: str) -> bytes:
    """The json video2dataset writes: the input row's columns, key, status, error message."""
    meta = {
        "url": f"https://example.invalid/videos/{key}.mp4",
        "caption": caption,
        "videoid": str(int(key) + 1000),
        "page_idx": "1",
        "page_dir": "000001_000050",
        "duration": "PT00H00M11S",
        "key": key,
        "status": status,
        "error_message": None if status == "success" else "HTTP Error 404: Not Found",
        "yt_meta_dict": None,
    }
    return json.dumps(meta, indent=4).encode()


def write_v2d_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    audio = write_audio(root.parent / "tone.m4a").read_bytes()
    for shard, samples in SHARDS.items():
        with wds.TarWriter(str(root / f"{shard}.tar")) as tar:
            for key, (txt, caption, frames, status) in samples.items():
                sample = {"__key__": key, "json": v2d_meta(key, caption, status)}
                if txt is not None:
                    sample["txt"] = txt.encode()
                if status == "success":
                    video = write_video(root.parent / f"{key}.mp4", frames=frames)
                    sample["mp4"] = video.read_bytes()
                if key == "000000003":
                    sample["m4a"] = audio
                tar.write(sample)
        stats = {"count": len(samples), "successes": 3, "failed_to_download": 1,
                 "failed_to_subsample": 0, "status_dict": {"success": 3, FAILED: 1}}
        (root / f"{shard}_stats.json").write_text(json.dumps(stats, indent=4))
        write_parquet(root / f"{shard}.parquet", samples)
    return root


def write_parquet(path: Path, samples: dict) -> None:
    """video2dataset's per-shard metadata table; a placeholder file where pyarrow is missing."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1 placeholder: pyarrow is not installed PAR1")
        return
    pq.write_table(pa.table({"key": list(samples), "status": [s[3] for s in samples.values()]}), path)


@pytest.fixture(scope="module")
def v2d(tmp_path_factory) -> Path:
    return write_v2d_folder(tmp_path_factory.mktemp("v2d") / "dataset")


def make_dm(shards: str, **kw) -> VideoDataModule:
    args = dict(train_shards=shards, val_shards=shards, num_frames=8, resolution=16, batch_size=3,
                num_workers=0, mix_shards=2, shuffle_buffer=4)
    return VideoDataModule(**{**args, **kw})


def take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        loader.mark_consumed(batch["meta"]["batch_index"])
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_sidecar_files_are_not_shards_and_failed_downloads_are_not_samples(v2d):
    urls = expand_shards(str(v2d))
    assert urls == [str(v2d / "00000.tar"), str(v2d / "00001.tar")]
    assert expand_shards(f"{v2d}/{{00000..00001}}.tar") == urls
    # Counted from the tar listing (no shards.json here): the failed-download record is left out.
    assert [shard_size(u) for u in urls] == [3, 3]


def test_val_stream_yields_every_video_once_with_its_caption(v2d, caplog):
    with caplog.at_level(logging.INFO, logger="maskvid.data"):
        batches = list(make_dm(str(v2d)).val_dataloader())
    keys = [k for b in batches for k in b["meta"]["key"]]
    captions = [c for b in batches for c in b["caption"]]
    assert sorted(keys) == sorted(EXPECTED)
    assert dict(zip(keys, captions)) == EXPECTED
    for batch in batches:
        assert batch["video"].shape == (3, 3, 8, 16, 16) and batch["video"].dtype == torch.float32
        assert batch["frame_mask"].shape == (3, 8)
        assert all(info["status"] == "success" for info in batch["meta"]["info"])
    # Failed downloads are not bad samples: nothing counted as skipped, one note per shard.
    assert batches[-1]["meta"]["skipped"] == 0
    assert "skipping bad sample" not in caplog.text
    for shard in ("00000.tar", "00001.tar"):
        assert f"{shard}: left out 1 failed-download record(s) of video2dataset (1 {FAILED})" in caplog.text


def test_train_stream_batches_and_resumes_exactly(v2d):
    loader = make_dm(str(v2d)).train_dataloader()
    batches = take(loader, 6)
    for batch in batches:
        assert batch["video"].shape == (3, 3, 8, 16, 16)
        assert batch["video"].min() >= -1 and batch["video"].max() <= 1
        assert [EXPECTED[k] for k in batch["meta"]["key"]] == batch["caption"]
    assert loader.skipped == 0
    # Resuming needs shard sizes that match what the reader yields (failed records left out of both).
    resumed = make_dm(str(v2d)).train_dataloader()
    resumed.load_state_dict(dict(loader.state_dict(), batches=3))
    assert [b["meta"]["key"] for b in take(resumed, 3)] == [b["meta"]["key"] for b in batches[3:]]


def test_a_media_less_record_without_a_failed_status_is_still_a_bad_sample(tmp_path, caplog):
    """Only video2dataset's failure records are left out silently; our own broken samples are not."""
    good = write_video(tmp_path / "g.mp4", frames=8).read_bytes()
    with wds.TarWriter(str(tmp_path / "00000.tar")) as tar:
        tar.write({"__key__": "a", "mp4": good, "txt": b"good"})
        tar.write({"__key__": "b", "txt": b"lost its mp4", "json": b'{"status": "success"}'})
        tar.write({"__key__": "c", "txt": b"lost its mp4 too"})
        tar.write({"__key__": "d", "txt": b"nested", "json": b"[" * 100_000})  # must not crash the reader
    assert shard_size(str(tmp_path / "00000.tar")) == 4
    with caplog.at_level(logging.WARNING, logger="maskvid.data"):
        batches = list(make_dm(str(tmp_path), batch_size=1).val_dataloader())
    assert [b["meta"]["key"] for b in batches] == [["a"]] and batches[-1]["meta"]["skipped"] == 3
    assert all(f"key={key} " in caplog.text for key in "bcd")


def test_tokenize_reads_video2dataset_shards(v2d, tmp_path, capsys):
    from tests.stage2_fixtures import tiny_t5_dir, tiny_tokenizer, write_tokenizer_checkpoint

    tok = write_tokenizer_checkpoint(tmp_path / "tok.ckpt", tiny_tokenizer())
    t5 = tiny_t5_dir(tmp_path / "t5")
    out = tmp_path / "tokens"
    code = main(["data", "tokenize", "--tokenizer", str(tok), "--text-encoder", str(t5), "--shards", str(v2d),
                 "--out", str(out), "--max-length", "8", "--num-frames", "9", "--resolution", "32",
                 "--batch-size", "4", "--workers", "0", "--device", "cpu", "--quiet"])
    assert code == 0
    assert "wrote 6 token samples" in capsys.readouterr().out
    samples = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False))
    assert {s["__key__"]: s["txt"].decode() for s in samples} == EXPECTED
    assert all(json.loads(s["json"])["source_url"].endswith(".tar") for s in samples)


@pytest.mark.slow
def test_maskvid_fit_trains_on_video2dataset_shards(v2d, tmp_path):
    """The real command, as a user runs it on a video2dataset folder: no conversion step."""
    import yaml

    from tests.conftest import run_cli
    from tests.test_tokenizer_module import MODEL

    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump(MODEL))
    run = tmp_path / "run"
    out = run_cli("fit", "--config", "configs/trainer/cpu.yaml", "--config", str(config),
                  "--data.train_shards", str(v2d), "--data.val_shards", f"{v2d}/{{00000..00001}}.tar",
                  "--data.num_frames", "9", "--data.resolution", "32", "--data.batch_size", "2",
                  "--data.num_workers", "0", "--data.batches_per_epoch", "100", "--trainer.max_steps", "3",
                  "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
                  "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
                  timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "`max_steps=3` reached" in out.stderr
    assert len(list(run.rglob("*.ckpt"))) == 1
