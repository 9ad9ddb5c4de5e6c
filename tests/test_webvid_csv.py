"""`maskvid data shards --csv`: a WebVid-style CSV whose rows name videos already on disk.

Rows are matched to files by videoid (flat or under page_dir), by contentUrl's file name, or by a
path column; missing, corrupt and unparsable rows are skipped and reported, never fatal; a header
lacking the needed columns is a one-line error. The videos are tiny h264 mp4s made with PyAV.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

from maskvid.datamodules.shards import (
    BAD_MANIFEST_LINE,
    CORRUPT,
    EMPTY_CAPTION,
    MISSING_FILE,
    build_shards,
)
from maskvid.launch.cli import main
from tests.media_fixtures import write_video

URL = "https://ak.picdn.net/shutterstock/videos/{}/preview/{}"
HEADER = b"videoid,contentUrl,duration,page_dir,name\n"
ROWS = [  # line 2 onwards
    b'1001,' + URL.format(1001, "stock-footage-dog.mp4").encode() + b',PT00H00M11S,000001_000050,A dog runs\n',
    b'1002,' + URL.format(1002, "stock-footage-cat.mp4").encode() + b',PT00H00M09S,000001_000050,A cat sleeps\n',
    b'1003,' + URL.format(1003, "stock-footage-waves.mp4").encode() + b',PT00H00M20S,000002_000050,Waves\n',
    b'1004,' + URL.format(1004, "stock-footage-gone.mp4").encode() + b',PT00H00M05S,000002_000050,Never downloaded\n',
    b'1005,' + URL.format(1005, "stock-footage-bad.mp4").encode() + b',PT00H00M05S,000002_000050,Corrupt file\n',
    b'1006,' + URL.format(1006, "stock-footage-blank.mp4").encode() + b',PT00H00M05S,000002_000050,   \n',
    b'1007,' + URL.format(1007, "x.mp4").encode() + b',PT00H00M05S,000002_000050,Caf\xe9 in Latin-1\n',
    b',,PT00H00M05S,,A row that names no video\n',
    b'1008,' + URL.format(1008, "stock-footage-quote.mp4").encode()
    + b',PT00H00M07S,000003_000050,"A cat, ""curious"", looks up"\n',
]
CAPTIONS = {"1001": "A dog runs", "1002": "A cat sleeps", "1003": "Waves", "1008": 'A cat, "curious", looks up'}


@pytest.fixture
def webvid(tmp_path) -> tuple[Path, Path]:
    """results.csv and a videos folder as WebVid downloads leave it, with gaps and a bad file."""
    videos = tmp_path / "videos"
    (videos / "000001_000050").mkdir(parents=True)
    write_video(videos / "1001.mp4", frames=8)  # <videos>/<videoid>.mp4
    write_video(videos / "000001_000050" / "1002.mp4", frames=9)  # <videos>/<page_dir>/<videoid>.mp4
    write_video(videos / "stock-footage-waves.mp4", frames=10)  # contentUrl's file name
    (videos / "1005.mp4").write_text("not a video")
    write_video(videos / "1006.mp4", frames=8)
    write_video(videos / "1008.mp4", frames=8)
    csv_path = tmp_path / "results.csv"
    csv_path.write_bytes(HEADER + b"".join(ROWS))
    return csv_path, videos


def samples_of(out: Path) -> list[dict]:
    return list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False))


def test_rows_are_matched_written_in_order_and_bad_rows_reported(webvid, tmp_path, capsys):
    csv_path, videos = webvid
    out = tmp_path / "shards"
    assert main(["data", "shards", "--csv", str(csv_path), "--videos", str(videos), "--out", str(out),
                 "--workers", "0", "--quiet"]) == 0
    summary, details = capsys.readouterr().out.strip().splitlines()
    assert summary.startswith(f"4 written to {out}/shard-000000.tar, 5 skipped, see {out}/report.json")
    assert details == ("skipped: 1 missing file, 1 unreadable or corrupt, 1 empty caption, "
                       "2 bad manifest line; first: 1004, 1005, 1006, results.csv:8, results.csv:9")

    samples = samples_of(out)
    assert [s["__key__"] for s in samples] == list(CAPTIONS)
    assert {s["__key__"]: s["txt"].decode() for s in samples} == CAPTIONS
    meta = json.loads(samples[2]["json"])
    assert meta["videoid"] == "1003" and meta["url"] == URL.format(1003, "stock-footage-waves.mp4")
    assert meta["num_frames"] == 10 and meta["width"] == 64 and meta["height"] == 48

    report = json.loads((out / "report.json").read_text())
    assert report["input"] == str(csv_path) and report["counts"]["written"] == 4
    assert [(s["path"], s["reason"]) for s in report["skipped"]] == [
        ("1004", MISSING_FILE), ("1005", CORRUPT), ("1006", EMPTY_CAPTION),
        ("results.csv:8", BAD_MANIFEST_LINE), ("results.csv:9", BAD_MANIFEST_LINE),
    ]
    missing, _, _, utf8, nameless = report["skipped"]
    assert missing["detail"] == ("not found: 1004.mp4, 000002_000050/1004.mp4, "
                                 "stock-footage-gone.mp4")
    assert utf8["detail"] == "line 8: not valid UTF-8"
    assert nameless["detail"] == "line 9: no videoid, contentUrl, path value"


def test_a_path_column_and_a_caption_column(tmp_path):
    videos = tmp_path / "videos"
    (videos / "clips").mkdir(parents=True)
    write_video(videos / "clips" / "p.mp4", frames=8)
    elsewhere = write_video(tmp_path / "elsewhere.mp4", frames=8)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(f"path,caption\nclips/p.mp4,relative\n{elsewhere},absolute\nclips/gone.mp4,gone\n")
    out = tmp_path / "shards"
    report = build_shards(videos, out, csv=csv_path, workers=0, progress=False)
    assert report.written == 2
    assert [s["txt"].decode() for s in samples_of(out)] == ["relative", "absolute"]
    assert [(s.path, s.reason) for s in report.skipped] == [("clips/gone.mp4", MISSING_FILE)]


def test_an_unparsable_row_is_skipped_and_the_rows_after_it_are_read(tmp_path, monkeypatch):
    import csv

    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("1", "3"):
        write_video(videos / f"{name}.mp4", frames=8)
    csv_path = tmp_path / "results.csv"
    csv_path.write_text("videoid,name\n1,short\n2," + "x" * 80 + "\n3,fine\n")
    limit = csv.field_size_limit(40)  # the csv module rejects the long row
    try:
        report = build_shards(videos, tmp_path / "out", csv=csv_path, workers=0, progress=False)
    finally:
        csv.field_size_limit(limit)
    assert [s["txt"].decode() for s in samples_of(tmp_path / "out")] == ["short", "fine"]
    [bad] = report.skipped
    assert (bad.path, bad.reason) == ("results.csv:3", BAD_MANIFEST_LINE)
    assert "field larger than field limit" in bad.detail


@pytest.mark.parametrize("header,expected", [
    ("id,url,title", ["lacks a caption column (name or caption) and a column that locates each video "
                      "(videoid, contentUrl or path)", "its columns: id, url, title"]),
    ("videoid,contentUrl,duration", ["lacks a caption column (name or caption);"]),
    ("name,duration", ["lacks a column that locates each video (videoid, contentUrl or path)"]),
])
def test_a_header_without_the_needed_columns_is_a_one_line_error(webvid, tmp_path, capsys, header, expected):
    _, videos = webvid
    csv_path = tmp_path / "other.csv"
    csv_path.write_text(header + "\n1,2,3\n")
    out = tmp_path / "shards"
    assert main(["data", "shards", "--csv", str(csv_path), "--videos", str(videos), "--out", str(out)]) == 2
    [error] = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("maskvid data: error: --csv other.csv ")
    assert all(part in error for part in expected), error
    assert not out.exists()  # refused before anything was decoded or written


def test_missing_or_empty_csv_and_missing_videos_folder(webvid, tmp_path, capsys):
    csv_path, videos = webvid
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    cases = [
        (["--csv", str(tmp_path / "nope.csv"), "--videos", str(videos)], "does not exist"),
        (["--csv", str(empty), "--videos", str(videos)], "is empty"),
        (["--csv", str(csv_path), "--videos", str(tmp_path / "no-videos")], "does not exist"),
        (["--csv", str(csv_path), "--videos", str(csv_path)], "must be the folder"),
    ]
    for args, message in cases:
        assert main(["data", "shards", *args, "--out", str(tmp_path / "out")]) == 2
        [error] = capsys.readouterr().err.strip().splitlines()
        assert message in error, error


def test_progress_bar_while_matching_rows(webvid, tmp_path, capsys):
    csv_path, videos = webvid
    build_shards(videos, tmp_path / "out", csv=csv_path, workers=0, progress=True)
    err = capsys.readouterr().err
    assert "matching CSV rows" in err and "9 rows" in err


def test_help_explains_the_csv_input(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "shards", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--csv results_2M_train.csv --videos" in text
    for words in ("videoid", "contentUrl", "page_dir", "name (or caption)", "Nothing is downloaded",
                  "video2dataset"):
        assert words in text, words
