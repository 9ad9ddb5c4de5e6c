"""`maskvid data shards`: many containers and codecs in, h264 shards out, bad inputs reported.

The videos are tiny (at most 64x48, 6-16 frames) and generated per test session with PyAV.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds

import maskvid.datamodules.shards as shards
from maskvid.datamodules.shards import (
    BAD_MANIFEST_LINE,
    CORRUPT,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_FILE,
    NO_VIDEO,
    ZERO_FRAMES,
    EncodeOptions,
    encode_one,
    sample_keys,
)
from maskvid.datamodules.video_io import decode_all
from maskvid.launch.cli import main
from tests.media_fixtures import (
    has_encoder,
    strip_to_header,
    truncate,
    write_audio,
    write_image,
    write_video,
)

REPO = Path(__file__).resolve().parents[1]

# source path -> (encoder, width, height, frames, codec name the json reports)
GOOD_VIDEOS = {
    "clips/a.mp4": ("libx264", 64, 48, 8, "h264"),
    "clips/a.webm": ("libvpx-vp9", 48, 32, 6, "vp9"),
    "clips/nested/c.mkv": ("libx265", 64, 48, 8, "hevc"),
    "d.avi": ("mpeg4", 32, 32, 8, "mpeg4"),
    "e.mov": ("mjpeg", 64, 48, 6, "mjpeg"),
    "f.gif": ("gif", 40, 30, 6, "gif"),
}
FPS = 8
BAD_VIDEOS = {
    "broken/truncated.mp4": CORRUPT,  # cut before the index: FFmpeg finds no stream
    "broken/midway.mp4": CORRUPT,  # index first, data cut: decoding fails after 16 frames
    "broken/empty.mp4": CORRUPT,  # 0 bytes
    "broken/notes.mp4": CORRUPT,  # text with a video suffix
    "broken/voice.m4a": NO_VIDEO,
    "broken/none.mkv": ZERO_FRAMES,
}
CAPTION_PROBLEMS = {"uncaptioned.mp4": MISSING_CAPTION, "blank.mp4": EMPTY_CAPTION}


def caption_of(source: str) -> str:
    return f"caption for {source}"


def key_of(source: str) -> str:
    return sample_keys([source])[0]


def write_caption(video: Path, text: str, specific: bool = False) -> None:
    """Sidecar `clip.txt`, or `clip.mp4.txt` when two videos share a stem."""
    sidecar = video.with_name(video.name + ".txt") if specific else video.with_suffix(".txt")
    sidecar.write_text(text)


def make_video_folder(root: Path) -> dict[str, tuple]:
    """Good, bad, uncaptioned and ignorable files under `root`; returns the good ones."""
    good = {k: v for k, v in GOOD_VIDEOS.items() if has_encoder(v[0])}
    for source, (encoder, w, h, n, _) in good.items():
        path = root / source
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, codec=encoder, width=w, height=h, frames=n, fps=FPS)
        # Surrounding whitespace is stripped from captions.
        write_caption(path, f"  {caption_of(source)} \n", specific=source == "clips/a.webm")
    write_image(root / "g.png", 20, 20)
    write_caption(root / "g.png", caption_of("g.png"))
    write_video(root / "rot.mp4", width=64, height=32, frames=8, fps=FPS, rotation=90)
    write_caption(root / "rot.mp4", caption_of("rot.mp4"))
    good.update({"g.png": ("png", 20, 20, 1, "png"), "rot.mp4": ("libx264", 32, 64, 8, "h264")})

    broken = root / "broken"
    broken.mkdir()
    truncate(write_video(broken / "truncated.mp4", frames=12), keep=0.6)
    midway = write_video(broken / "midway.mp4", codec="mjpeg", frames=24,
                         container_options={"movflags": "faststart"})
    truncate(midway, keep=0.7)
    (broken / "empty.mp4").write_bytes(b"")
    (broken / "notes.mp4").write_text("these are my notes, not a video\n")
    write_audio(broken / "voice.m4a")
    strip_to_header(write_video(broken / "none.mkv"))
    for source in BAD_VIDEOS:
        write_caption(root / source, caption_of(source))

    write_video(root / "uncaptioned.mp4", frames=6)
    write_video(root / "blank.mp4", frames=6)
    write_caption(root / "blank.mp4", " \n")

    # Never inputs: sidecar-like files and hidden files or folders.
    (broken / "readme.md").write_text("# notes\n")
    write_video(root / ".hidden.mp4", frames=6)
    (root / ".cache").mkdir()
    write_video(root / ".cache" / "x.mp4", frames=6)
    return good


def build(videos: Path, out: Path, *extra: str) -> int:
    return main(["data", "shards", "--videos", str(videos), "--out", str(out), "--quiet", *extra])


def read_samples(pattern: str) -> list[dict[str, Any]]:
    """Raw samples (bytes per field) in shard order."""
    return list(wds.WebDataset(pattern, shardshuffle=False))


def report_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


def skipped_reasons(report: dict[str, Any]) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in report["skipped"]}


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory) -> tuple[Path, dict[str, tuple]]:
    root = tmp_path_factory.mktemp("videos")
    return root, make_video_folder(root)


@pytest.fixture(scope="module")
def built(video_folder, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """The folder built in process (--workers 0) with default options."""
    root, _ = video_folder
    out = tmp_path_factory.mktemp("out") / "shards"
    assert build(root, out, "--workers", "0") == 0
    return out, report_of(out)


@pytest.fixture(scope="module")
def built_parallel(video_folder, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """The same folder with two worker processes and 3 samples per shard."""
    root, _ = video_folder
    out = tmp_path_factory.mktemp("out") / "shards"
    assert build(root, out, "--workers", "2", "--samples-per-shard", "3") == 0
    return out, report_of(out)


def test_every_good_video_is_written_upright_with_caption_and_metadata(video_folder, built):
    root, good = video_folder
    out, report = built
    samples = read_samples(report["pattern"])
    assert [s["__key__"] for s in samples] == [key_of(src) for src in sorted(good)]
    for sample, source in zip(samples, sorted(good)):
        _, width, height, frames, codec = good[source]
        assert sample["txt"].decode() == caption_of(source)
        meta = json.loads(sample["json"])
        assert meta["source"] == source
        assert meta["source_codec"] == codec
        assert (meta["width"], meta["height"], meta["num_frames"]) == (width, height, frames)
        assert meta["fps"] == pytest.approx(meta["source_fps"])
        assert meta["duration"] == pytest.approx(frames / meta["fps"])
        assert decode_all(sample["mp4"]).shape == (frames, height, width, 3)
    assert report["counts"]["written"] == len(good)
    assert report["shards"] == [{"path": "shard-000000.tar", "num_samples": len(good)}]


def test_rotation_metadata_is_applied(built):
    out, report = built
    sample = next(s for s in read_samples(report["pattern"]) if s["__key__"] == "rot_mp4")
    frame = decode_all(sample["mp4"])[0].astype(int)
    assert frame.shape == (64, 32, 3)  # 64x32 stored, rotated 90 degrees for display
    # The source's red top-left marker ends bottom-left after a 90 degree counter-clockwise turn.
    red, green, blue = frame[-4:, :4].reshape(-1, 3).mean(axis=0)
    assert red > 150 and green < 60 and blue < 60
    assert frame[:4, :4, 2].mean() > 60


def test_bad_inputs_are_reported_with_their_reason(built):
    _, report = built
    expected = {**BAD_VIDEOS, **CAPTION_PROBLEMS}
    assert skipped_reasons(report) == expected
    assert all(s["detail"] for s in report["skipped"])
    assert report["counts"]["skipped"] == len(expected)
    assert report["counts"]["skipped_by_reason"][CORRUPT] == 4
    assert report["options"]["crf"] == 18 and report["options"]["empty_caption"] == "skip"
    # Ignored files are neither written nor reported.
    listed = {s["path"] for s in report["skipped"]}
    assert not any("readme" in p or "hidden" in p or ".cache" in p for p in listed)


def test_parallel_build_matches_in_process_build(built, built_parallel):
    samples = read_samples(built[1]["pattern"])
    parallel = read_samples(built_parallel[1]["pattern"])
    assert [s["__key__"] for s in parallel] == [s["__key__"] for s in samples]
    for a, b in zip(samples, parallel):
        assert (a["txt"], a["json"]) == (b["txt"], b["json"])
        # Not the mp4 bytes: libx264 output on frames this tiny varies from run to run even in
        # one process (it does not at 256x192), so compare what the videos show.
        frames_a, frames_b = decode_all(a["mp4"]), decode_all(b["mp4"])
        assert frames_a.shape == frames_b.shape
        assert np.abs(frames_a.astype(int) - frames_b).mean() < 3
    assert built_parallel[1]["skipped"] == built[1]["skipped"]


def test_samples_per_shard_splits_the_output(built_parallel):
    out, report = built_parallel
    written = report["counts"]["written"]
    num_shards = math.ceil(written / 3)
    assert [s["num_samples"] for s in report["shards"]] == [
        min(3, written - start) for start in range(0, written, 3)
    ]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [
        f"shard-{i:06d}.tar" for i in range(num_shards)
    ]
    assert report["pattern"] == str(out / f"shard-{{000000..{num_shards - 1:06d}}}.tar")
    index = json.loads((out / "shards.json").read_text())
    assert index["num_samples"] == written


def test_keep_empty_captions_writes_them_with_an_empty_caption(video_folder, tmp_path):
    root, good = video_folder
    assert build(root, tmp_path / "out", "--workers", "0", "--empty-caption", "keep") == 0
    report = report_of(tmp_path / "out")
    captions = {s["__key__"]: s["txt"].decode() for s in read_samples(report["pattern"])}
    assert captions["uncaptioned_mp4"] == "" and captions["blank_mp4"] == ""
    assert len(captions) == len(good) + 2
    kept = {s["path"]: s["reason"] for s in report["kept_empty_captions"]}
    assert kept == CAPTION_PROBLEMS
    assert skipped_reasons(report) == BAD_VIDEOS


def test_fps_max_size_and_max_frames(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "long.mp4", width=64, height=48, frames=16, fps=8)  # 2 seconds
    write_caption(videos / "long.mp4", "a long clip")

    assert build(videos, tmp_path / "resampled", "--fps", "4", "--max-size", "24") == 0
    [sample] = read_samples(report_of(tmp_path / "resampled")["pattern"])
    meta = json.loads(sample["json"])
    assert (meta["fps"], meta["num_frames"], meta["duration"]) == (4.0, 8, 2.0)
    assert (meta["width"], meta["height"]) == (32, 24)
    assert (meta["source_width"], meta["source_height"], meta["source_fps"]) == (64, 48, 8.0)
    assert decode_all(sample["mp4"]).shape == (8, 24, 32, 3)

    assert build(videos, tmp_path / "capped", "--max-frames", "5") == 0
    report = report_of(tmp_path / "capped")
    [sample] = read_samples(report["pattern"])
    assert json.loads(sample["json"])["num_frames"] == 5
    assert report["warnings"] == []  # a cap is not a truncated file


def test_manifest_input(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    (folder / "videos").mkdir(parents=True)
    write_video(folder / "videos" / "x.mp4", frames=6)
    write_video(folder / "videos" / "y.mp4", width=32, height=32, frames=7)
    lines = [
        '{"path": "videos/x.mp4", "caption": "  first "}',
        '{"path": "videos/x.mp4", "caption": oops',
        "",
        '{"path": "videos/missing.mp4", "caption": "gone"}',
        '{"path": "videos/y.mp4", "caption": "second"}',
        "[1, 2]",
        '{"path": "videos/x.mp4", "caption": "first again"}',
        '{"path": "videos/y.mp4"}',
        '{"path": "videos/y.mp4", "caption": 5}',
    ]
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)  # paths resolve against the manifest's folder, not the cwd
    assert build(Path("data/manifest.jsonl"), Path("out"), "--workers", "0") == 0

    report = report_of(tmp_path / "out")
    samples = read_samples(report["pattern"])
    assert [(s["__key__"], s["txt"].decode()) for s in samples] == [
        ("videos_x_mp4", "first"),
        ("videos_y_mp4", "second"),
        ("videos_x_mp4-2", "first again"),
    ]
    assert json.loads(samples[1]["json"])["source"] == "videos/y.mp4"
    assert [(s["path"], s["reason"]) for s in report["skipped"]] == [
        ("manifest.jsonl:2", BAD_MANIFEST_LINE),
        ("videos/missing.mp4", MISSING_FILE),
        ("manifest.jsonl:6", BAD_MANIFEST_LINE),
        ("videos/y.mp4", MISSING_CAPTION),
        ("manifest.jsonl:9", BAD_MANIFEST_LINE),
    ]
    assert report["skipped"][0]["detail"].startswith("line 2: not valid JSON")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`maskvid ...` in a fresh interpreter, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "maskvid.launch.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_existing_shards_are_not_overwritten_without_overwrite(tmp_path, monkeypatch, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "one.mp4", frames=6)
    write_caption(videos / "one.mp4", "one")
    out = tmp_path / "out"
    args = ["data", "shards", "--videos", str(videos), "--out", str(out), "--workers", "0"]

    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    summary = one_line(first.stdout)
    assert summary.startswith(f"1 written to {out}/shard-000000.tar, 0 skipped")
    shard = out / "shard-000000.tar"
    before = shard.read_bytes()

    again = run_cli(*args, "--quiet")
    assert again.returncode == 2
    error = one_line(again.stderr)
    assert error.startswith("maskvid data: error:") and "--overwrite" in error
    assert shard.read_bytes() == before

    # The refusal comes before any decoding: a build that would decode fails on the check first.
    monkeypatch.setattr(shards, "encode_one", lambda *a: pytest.fail("decoded before the check"))
    assert main([*args, "--quiet"]) == 2
    assert "--overwrite" in one_line(capsys.readouterr().err)
    monkeypatch.undo()

    write_caption(videos / "one.mp4", "one, rewritten")
    assert main([*args, "--quiet", "--overwrite"]) == 0
    [sample] = read_samples(str(shard))
    assert sample["txt"] == b"one, rewritten"
    assert not list(out.glob(".partial-*"))


def test_nothing_usable_is_an_error(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "notes.mp4").write_text("not a video")
    write_caption(videos / "notes.mp4", "notes")
    (videos / "empty.webm").write_bytes(b"")
    write_caption(videos / "empty.webm", "empty")
    assert build(videos, tmp_path / "out") == 2
    error = one_line(capsys.readouterr().err)
    assert error.startswith("maskvid data: error: no usable videos") and "2 unreadable" in error
    assert skipped_reasons(report_of(tmp_path / "out")) == {
        "empty.webm": CORRUPT, "notes.mp4": CORRUPT
    }
    assert not list((tmp_path / "out").glob("*.tar"))

    (tmp_path / "only-captions").mkdir()
    (tmp_path / "only-captions" / "a.txt").write_text("a caption without a video")
    assert build(tmp_path / "only-captions", tmp_path / "out2") == 2
    assert "no input files found" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out2").exists()

    assert build(tmp_path / "does-not-exist", tmp_path / "out3") == 2
    assert "does not exist" in one_line(capsys.readouterr().err)


def test_unwritable_output_is_an_error(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "one.mp4", frames=6)
    write_caption(videos / "one.mp4", "one")
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")

    assert build(videos, blocker / "out") == 2
    assert "not writable" in one_line(capsys.readouterr().err)

    out = tmp_path / "out"
    assert build(videos, out, "--report", str(blocker / "report.json")) == 2
    assert "cannot write the report" in one_line(capsys.readouterr().err)
    assert list(out.iterdir()) == []  # staging cleaned up, nothing written


def test_output_inside_the_input_folder_is_not_read_back(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "one.mp4", frames=6)
    write_caption(videos / "one.mp4", "one")
    assert build(videos, videos / "shards", "--workers", "0") == 0
    assert build(videos, videos / "shards", "--workers", "0", "--overwrite") == 0
    report = report_of(videos / "shards")
    assert report["counts"]["written"] == 1 and report["skipped"] == []


def test_silently_truncated_video_is_written_with_a_warning(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    # Matroska cut mid-stream: FFmpeg ends early without an error.
    truncate(write_video(videos / "cut.mkv", frames=24), keep=0.8)
    write_caption(videos / "cut.mkv", "cut short")
    assert build(videos, tmp_path / "out", "--workers", "0") == 0
    report = report_of(tmp_path / "out")
    assert report["counts"]["written"] == 1
    [warning] = report["warnings"]
    assert warning["path"] == "cut.mkv" and "truncated" in warning["detail"]


def test_unexpected_error_becomes_a_skip(tmp_path, monkeypatch):
    video = write_video(tmp_path / "one.mp4", frames=6)

    def explode(*args, **kwargs):
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(shards, "encode_mp4", explode)
    skip = encode_one(video, "one.mp4", EncodeOptions())
    assert (skip.reason, skip.detail) == (CORRUPT, "RuntimeError: encoder exploded")


def test_sample_keys_are_unique_and_dot_free():
    keys = sample_keys(["a.mp4", "a.webm", "x/a.mp4", "x_a.mp4", "x_a.mp4", "été 1.mov"])
    assert keys == ["a_mp4", "a_webm", "x_a_mp4", "x_a_mp4-2", "x_a_mp4-3", "été_1_mov"]
    assert not any("." in k or "/" in k for k in keys)


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "shards", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "maskvid data shards --videos" in text and "--empty-caption" in text
    assert all(option in text for option in ("--fps", "--max-size", "--workers"))
