"""The train and val sample streams over WebDataset shards.

Train: an infinite, resampled stream that is a pure function of (seed, rank, worker, position).
Per (rank, logical worker) the raw samples come in *groups*: group g reads `mix_shards` shards
(distinct when there are enough) drawn by an RNG seeded from (seed, rank, worker, g),
interleaves them, and shuffles them through a buffer seeded the same way. Output j is decoded with an RNG seeded from
(seed, rank, worker, j). Resuming at output j therefore needs no saved per-rank state: walk the
group sizes (from `shards.json` or the tar listing) to find the group, replay that one group
without decoding, and continue. Lightning only keeps rank 0's non-tensor state for sharded
checkpoints, which is why the position must be derivable rather than stored.

A bad sample at raw position j is replaced by the next good one (j+1, ...), so positions never
drift when data is bad; each bad sample is counted once and logged with its shard and key. A
sample whose tar member path is absolute or contains `..` is bad too (its key never reaches a
file name); shards are only ever read in memory, never extracted.

Val: a finite stream in which every sample is seen exactly once across ranks and workers: whole
shards are dealt out when there are enough of them, otherwise samples are dealt round-robin.

Records video2dataset writes for videos it failed to fetch (`samples.download_failure`) are not
samples: both the reader and the shard sizes leave them out, so positions stay consistent, and
each shard's count of them is logged once. Other files beside the tars (video2dataset's
`_stats.json` and `.parquet`, our `shards.json`) are never taken for shards.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import Counter, deque
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset import shardlists, tariterators

from maskvid.datamodules.errors import DataError
from maskvid.datamodules.samples import (
    TEXT_FIELDS,
    BadSample,
    SampleDecoder,
    check_member_key,
    download_failure,
)
from maskvid.datamodules.shard_writer import INDEX_NAME

log = logging.getLogger("maskvid.data")

ShardSpec = Union[str, Sequence[str]]
MAX_CONSECUTIVE_BAD = 1000


def expand_shards(spec: ShardSpec) -> list[str]:
    """Shard URLs from a brace pattern, '::'-joined list, directory, list, or any wds URL."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in items:
        item = str(item)
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).glob("*.tar"))
            if not found:
                raise DataError(f"no .tar shards in directory {item}")
            urls.extend(found)
            continue
        urls.extend(shardlists.expand_urls(item))
    if not urls:
        raise DataError(f"no shards match {spec!r}")
    missing = [u for u in urls if _is_local(u) and not os.path.exists(_local_path(u))]
    if missing:
        raise DataError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")
    return urls


def _is_local(url: str) -> bool:
    return url.startswith("file://") or ("://" not in url and not url.startswith("pipe:"))


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


@lru_cache(maxsize=256)
def _index_sizes(directory: str) -> dict[str, int]:
    """Sample counts per shard name from the writer's index in `directory` ({} if none)."""
    try:
        entries = json.loads((Path(directory) / INDEX_NAME).read_text())["shards"]
        return {e["url"]: int(e["nsamples"]) for e in entries}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


@lru_cache(maxsize=4096)
def shard_size(url: str) -> int:
    """Samples in a shard: from the writer's index beside it, else by listing the tar."""
    if _is_local(url):
        path = Path(_local_path(url))
        sizes = _index_sizes(str(path.parent))
        if path.name in sizes:
            return sizes[path.name]
        try:
            return _count_samples(path)
        except (tarfile.TarError, OSError):
            return 0
    return sum(1 for _ in _read_shard(url))


def _count_samples(path: Path) -> int:
    """Samples in a local tar from its member headers, grouped by key as webdataset groups them,
    less video2dataset's failed-download records (only their small json members are read)."""
    runs: list[list] = []  # [key, its extensions, its json member or None] per sample
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = tariterators.base_plus_ext(member.name)
            if key is None:
                continue
            if not runs or runs[-1][0] != key:
                runs.append([key, set(), None])
            ext = ext.lower()
            runs[-1][1].add(ext)
            if ext == "json":
                runs[-1][2] = member
        count = 0
        for _, exts, json_member in runs:
            data = None
            if json_member is not None and exts <= TEXT_FIELDS:
                handle = tar.extractfile(json_member)
                data = handle.read() if handle is not None else None
            count += download_failure(exts, data) is None
    return count


# Shards whose failed-download records were already logged by this process (logged once each).
_noted_failures: set[str] = set()


def _read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard; a broken or truncated shard ends early with a warning."""

    def handler(exn: Exception) -> bool:
        log.warning("shard %s: stopped reading after error: %s", url, exn)
        return False

    failures: Counter[str] = Counter()
    for raw in tariterators.tarfile_samples([{"url": url}], handler=handler):
        status = download_failure(raw, raw.get("json"))
        if status is None:
            yield raw
        else:
            failures[status] += 1
    if failures and url not in _noted_failures:
        _noted_failures.add(url)
        statuses = ", ".join(f"{n} {status}" for status, n in failures.most_common())
        log.info("shard %s: left out %d failed-download record(s) of video2dataset (%s)",
                 url, sum(failures.values()), statuses)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class TrainStream(IterableDataset):
    """Infinite, resampled, resumable stream of decoded samples for one rank."""

    def __init__(
        self,
        urls: list[str],
        decoder: SampleDecoder,
        seed: int = 0,
        batch_size: int = 1,
        mix_shards: int = 4,
        shuffle_buffer: int = 256,
        rank: int = 0,
        world_size: int = 1,
        stream: int = 0,
    ) -> None:
        """stream: tells apart streams that share a seed (a mixture's video and image streams):
        a nonzero id joins every RNG seed, so their shard picks and shuffles are independent."""
        super().__init__()
        self.urls = urls
        self.decoder = decoder
        self.seed = seed
        self.stream = stream
        self.batch_size = batch_size
        self.mix_shards = max(1, mix_shards)
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.rank = rank
        self.world_size = world_size
        self.start_batch = 0  # batches this rank already consumed; set by the loader on resume
        self.skipped = 0

    def _stream_id(self) -> list[int]:
        # Stream 0 adds nothing: a plain stream draws exactly what it drew before streams had ids.
        return [self.stream] if self.stream else []

    # ---- raw positions -------------------------------------------------------------------
    def _group_shards(self, worker: int, group: int) -> tuple[list[str], np.random.Generator]:
        """Group g's shards (distinct when there are enough) and the RNG that shuffles them."""
        rng = np.random.default_rng([self.seed, self.rank, worker, group, 0x6E0, *self._stream_id()])
        n = len(self.urls)
        picks = rng.choice(n, size=self.mix_shards, replace=n < self.mix_shards)
        return [self.urls[i] for i in picks], rng

    def _group(self, worker: int, group: int) -> Iterator[dict[str, Any]]:
        """Group g's raw samples: its shards interleaved at random, through a shuffle buffer."""
        urls, rng = self._group_shards(worker, group)
        live = [_read_shard(u) for u in urls]
        buffer: list[dict[str, Any]] = []
        while live:
            i = int(rng.integers(len(live)))
            try:
                buffer.append(next(live[i]))
            except StopIteration:
                live.pop(i)
                continue
            if len(buffer) >= self.shuffle_buffer:
                yield _pop_random(buffer, rng)
        while buffer:
            yield _pop_random(buffer, rng)

    def _locate(self, worker: int, position: int) -> tuple[int, int]:
        """(group, offset) of raw position `position`, by walking group sizes."""
        group = 0
        empty_run = 0
        while True:
            size = sum(shard_size(u) for u in self._group_shards(worker, group)[0])
            if position < size:
                return group, position
            position -= size
            group += 1
            empty_run = empty_run + 1 if size == 0 else 0
            if empty_run > 100:
                raise DataError("train shards hold no readable samples")

    def raw_samples(self, worker: int, position: int) -> Iterator[dict[str, Any]]:
        group, offset = self._locate(worker, position) if position else (0, 0)
        empty_run = 0
        while True:
            n = 0
            for n, raw in enumerate(self._group(worker, group), start=1):
                if n > offset:
                    yield raw
            empty_run = empty_run + 1 if n == 0 else 0
            if empty_run > 100:
                raise DataError(f"train shards hold no readable samples (e.g. {self.urls[0]})")
            group, offset = group + 1, 0

    # ---- decoded samples -----------------------------------------------------------------
    def samples(self, worker: int, position: int) -> Iterator[dict[str, Any]]:
        """Decoded samples from `position` on; bad ones are replaced by the next good one."""
        raw_iter = self.raw_samples(worker, position)
        ahead: deque[list] = deque()  # [raw sample, known bad?]
        while True:
            rng = np.random.default_rng([self.seed, self.rank, worker, position, 0xC11, *self._stream_id()])
            i = 0
            while True:
                if i == len(ahead):
                    ahead.append([next(raw_iter), False])
                raw, bad = ahead[i]
                if not bad:
                    try:
                        check_member_key(raw)
                        sample = self.decoder(raw, rng)
                        break
                    except BadSample as e:
                        ahead[i][1] = True
                        self.skipped += 1
                        log.warning(
                            "skipping bad sample key=%s shard=%s: %s",
                            raw.get("__key__"), raw.get("__url__"), e,
                        )
                i += 1
                if i > MAX_CONSECUTIVE_BAD:
                    raise DataError(
                        f"{MAX_CONSECUTIVE_BAD} consecutive bad samples (last in {raw.get('__url__')}); "
                        "are these video shards?"
                    )
            sample["meta"].update(worker=worker, position=position, skipped=self.skipped)
            yield sample
            ahead.popleft()
            position += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, position = logical_start(self.start_batch, self.batch_size)
        self.skipped = 0
        return self.samples(worker, position)


def logical_start(start_batch: int, batch_size: int) -> tuple[int, int]:
    """(logical worker, sample position) this DataLoader worker starts at, `start_batch` batches
    into the rank's stream. A fresh DataLoader iterator starts at physical worker 0, but batch
    `start_batch` belongs to logical worker start_batch % W; rotating the ids keeps the
    uninterrupted order."""
    physical, num_workers = _worker()
    worker = (physical + start_batch) % num_workers
    consumed = max(0, -(-(start_batch - worker) // num_workers))
    return worker, consumed * batch_size


def _pop_random(buffer: list, rng: np.random.Generator) -> Any:
    i = int(rng.integers(len(buffer)))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()


class ValStream(IterableDataset):
    """Finite stream: every sample exactly once across all ranks and workers, first frames first."""

    def __init__(self, urls: list[str], decoder: SampleDecoder, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.urls = urls
        self.decoder = decoder
        self.rank = rank
        self.world_size = world_size
        self.skipped = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        physical, num_workers = _worker()
        parts = self.world_size * num_workers
        part = self.rank * num_workers + physical
        self.skipped = 0
        if len(self.urls) >= parts:
            raws = (raw for url in self.urls[part::parts] for raw in _read_shard(url))
        else:
            raws = (
                raw
                for i, raw in enumerate(r for url in self.urls for r in _read_shard(url))
                if i % parts == part
            )
        # Each sample goes out once the next good one is decoded (or the stream has ended), carrying
        # the skips up to there: bad samples after the last good one are then counted too.
        pending = None
        for raw in raws:
            try:
                check_member_key(raw)
                sample = self.decoder(raw, None)
            except BadSample as e:
                self.skipped += 1
                log.warning("skipping bad sample key=%s shard=%s: %s", raw.get("__key__"), raw.get("__url__"), e)
                continue
            if pending is not None:
                pending["meta"]["skipped"] = self.skipped
                yield pending
            sample["meta"].update(worker=physical, position=-1)
            pending = sample
        if pending is not None:
            pending["meta"]["skipped"] = self.skipped
            yield pending
