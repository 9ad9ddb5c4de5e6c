"""Shared fixtures: small video shards made on the fly (nothing is downloaded or checked in)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskvid.datamodules.shard_writer import ShardSink
from maskvid.datamodules.video_io import encode_mp4

REPO = Path(__file__).resolve().parents[1]


def ramp_video(index: int, num_frames: int, width: int = 48, height: int = 32) -> list[np.ndarray]:
    """Frame k is a flat grey of level 20 + 8k (so frame order is readable back), with a red
    left edge marking which way is up/left after rotation."""
    frames = []
    for k in range(num_frames):
        f = np.full((height, width, 3), 20 + 8 * k, np.uint8)
        f[:, : width // 4, 0] = 255
        frames.append(f)
    return frames


def write_shards(out: Path, items: list[dict], samples_per_shard: int = 8) -> str:
    """items: dicts with key, and mp4 bytes or frames, caption, meta; raw entries are passed as is."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(items), samples_per_shard):
        path = out / f"shard-{s // samples_per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for item in items[s : s + samples_per_shard]:
                w.write(item)
        shards.append(path)
    return str(out)


def mp4_item(key: str, frames: list[np.ndarray], caption: str, fps: float = 8.0, **meta) -> dict:
    data, n = encode_mp4(frames, fps=fps)
    return {"__key__": key, "mp4": data, "txt": caption, "json": {"fps": fps, "num_frames": n, **meta}}


def png_item(key: str, caption: str, colour=(200, 40, 40), size=(40, 30)) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return {"__key__": key, "png": buf.getvalue(), "txt": caption}


def make_bad_shards(tmp_path: Path) -> str:
    """12 good clips interleaved with 6 bad samples of different kinds, over 3 shards."""
    good = [mp4_item(f"good{i:02d}", ramp_video(i, 10), f"good {i}") for i in range(12)]
    ok_mp4 = good[0]["mp4"]
    bad = [
        {"__key__": "truncated", "mp4": ok_mp4[: len(ok_mp4) // 2], "txt": "t"},
        {"__key__": "garbage", "mp4": b"\x00\x01garbage" * 50, "txt": "g"},
        {"__key__": "nocaption", "mp4": ok_mp4},
        {"__key__": "emptycaption", "mp4": ok_mp4, "txt": "   "},
        {"__key__": "badjson", "mp4": ok_mp4, "txt": "j", "json": b"{not json"},
        {"__key__": "novideo", "txt": "only text"},
    ]
    items = []
    for i, g in enumerate(good):
        items.append(g)
        if i < len(bad):
            items.append(bad[i])
    return write_shards(tmp_path, items, samples_per_shard=6)


@pytest.fixture(scope="session")
def clean_shards(tmp_path_factory) -> str:
    """40 ramp videos of 6..29 frames over 5 shards (+ the writer's shards.json index)."""
    out = tmp_path_factory.mktemp("clean")
    rng = np.random.default_rng(0)
    with ShardSink(out, samples_per_shard=8) as sink:
        for i in range(40):
            n = int(rng.integers(6, 30))
            data, _ = encode_mp4(ramp_video(i, n), fps=8)
            sink.write(f"v{i:03d}", data, f"clip number {i}", {"fps": 8, "num_frames": n, "i": i})
    return str(out)


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `maskvid ...` in a fresh interpreter (as a user would), tests importable."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "maskvid.launch.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def metrics_rows(root: Path) -> list[dict]:
    """The rows of the one CSVLogger metrics.csv under a run directory."""
    import csv

    (path,) = root.rglob("metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))
