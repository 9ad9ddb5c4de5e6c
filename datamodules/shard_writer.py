"""Writes WebDataset tar shards atomically: into a hidden staging folder, renamed into place.

A crash or Ctrl-C mid-build therefore never leaves a half-written shard set that looks complete,
and existing shards are only replaced when the caller asked for it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from maskvid.datamodules.errors import DataError

INDEX_NAME = "shards.json"


@dataclass
class ShardInfo:
    path: str
    num_samples: int


def brace_pattern(out_dir: str | os.PathLike, prefix: str, n: int) -> str:
    """The brace pattern a datamodule takes for shards 0..n-1 written by ShardSink."""
    if n <= 1:
        return str(Path(out_dir) / f"{prefix}-000000.tar")
    return str(Path(out_dir) / f"{prefix}-{{000000..{n - 1:06d}}}.tar")


class ShardSink:
    """Collects samples into `<out_dir>/<prefix>-NNNNNN.tar` shards of `samples_per_shard` each.

    Each sample is stored as `<key>.mp4`, `<key>.txt` (caption) and `<key>.json` (metadata).
    On `close()` the shards and an index (`shards.json`, sample counts per shard) appear at once.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        samples_per_shard: int = 1000,
        prefix: str = "shard",
        overwrite: bool = False,
        mtime: float | None = None,
    ) -> None:
        """mtime: timestamp stored for every tar member; a fixed value makes shards reproducible
        byte for byte (None stamps the current time)."""
        if samples_per_shard < 1:
            raise DataError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.overwrite = overwrite
        self.mtime = mtime
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._staging = Path(tempfile.mkdtemp(prefix=f".partial-{prefix}-", dir=self.out_dir))
        except OSError as e:
            raise DataError(f"output directory {self.out_dir} is not writable: {e.strerror or e}") from e
        self._writer: wds.TarWriter | None = None  # set before abort() can run below
        self._existing = self.existing_shards()
        if self._existing and not overwrite:
            self.abort()
            raise DataError(
                f"{self.out_dir} already holds {len(self._existing)} '{prefix}-*.tar' shards; "
                "pass --overwrite to replace them"
            )
        self.shards: list[ShardInfo] = []
        self._count = 0
        self._keys: set[str] = set()

    def existing_shards(self) -> list[Path]:
        return sorted(self.out_dir.glob(f"{self.prefix}-*.tar"))

    def _open_next(self) -> None:
        self._close_current()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self.shards.append(ShardInfo(str(self.out_dir / name), 0))
        self._writer = wds.TarWriter(str(self._staging / name), mtime=self.mtime)

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write(self, key: str, mp4: bytes, caption: str, meta: dict[str, Any]) -> None:
        """A video sample: mp4 + txt + json."""
        self.write_sample(key, {"mp4": mp4, "txt": caption, "json": meta})

    def write_sample(self, key: str, fields: dict[str, Any]) -> None:
        """Any sample: extension -> bytes, str or JSON-able dict (token shards use this)."""
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if "." in key:
            raise ValueError(f"sample key {key!r} must not contain '.' (WebDataset splits on it)")
        self._keys.add(key)
        if self._writer is None or self.shards[-1].num_samples >= self.samples_per_shard:
            self._open_next()
        self._writer.write({"__key__": key, **fields})
        self.shards[-1].num_samples += 1
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def close(self) -> list[ShardInfo]:
        """Move the finished shards into place (replacing old ones only with overwrite)."""
        self._close_current()
        if self.overwrite:
            for old in self.existing_shards():
                old.unlink()
            (self.out_dir / INDEX_NAME).unlink(missing_ok=True)
        for info in self.shards:
            os.replace(self._staging / Path(info.path).name, info.path)
        index = {
            "pattern": brace_pattern(self.out_dir, self.prefix, len(self.shards)),
            "num_samples": self._count,
            "shards": [{"url": Path(s.path).name, "nsamples": s.num_samples} for s in self.shards],
        }
        tmp = self._staging / INDEX_NAME
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.out_dir / INDEX_NAME)
        shutil.rmtree(self._staging, ignore_errors=True)
        return self.shards

    def abort(self) -> None:
        """Drop everything written so far; existing shards are untouched."""
        self._close_current()
        shutil.rmtree(self._staging, ignore_errors=True)

    @property
    def pattern(self) -> str:
        return brace_pattern(self.out_dir, self.prefix, len(self.shards))

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
