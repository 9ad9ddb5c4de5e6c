"""Build WebDataset video shards from a user's captioned videos (`maskvid data shards`), or image
shards from captioned images (`--images`, for joint image-video training: `shard_images.py`).

Inputs come from a folder, scanned recursively, with a sidecar caption per video (`clip.txt`, or
`clip.mp4.txt` when two videos share a stem), from a JSONL manifest of
`{"path": ..., "caption": ...}` lines with paths relative to the manifest's folder, or from a CSV
such as WebVid's whose rows name local files (`shard_inputs.py`, `csv_manifest.py`). Each input is probed, decoded upright (rotation metadata applied), optionally resampled to a
frame rate and downscaled, re-encoded as h264 mp4, and written as a sample `mp4`/`txt`/`json`.

Every input that cannot be used is skipped with one of the `SKIP_REASONS` and listed in a JSON
report; one bad file never stops a build. Output order follows input order (sorted paths, or
manifest and CSV order) whatever the number of workers, and sample keys derive from the paths, so two
builds of the same input hold the same samples under the same keys in the same order.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from tqdm import tqdm

from maskvid.datamodules.cpus import usable_cpus
from maskvid.datamodules.csv_manifest import read_csv
from maskvid.datamodules.errors import DataError
from maskvid.datamodules.shard_inputs import (  # noqa: F401 - re-exported for callers and tests
    BAD_MANIFEST_LINE,
    CORRUPT,
    EMPTY_CAPTION,
    MANIFEST_SUFFIXES,
    MISSING_CAPTION,
    MISSING_FILE,
    NO_VIDEO,
    NOT_AN_IMAGE,
    SHORT_DECODE,
    SKIP_REASONS,
    ZERO_FRAMES,
    InputItem,
    Skip,
    read_manifest,
    sample_keys,
    scan_folder,
)
from maskvid.datamodules.shard_images import encode_image
from maskvid.datamodules.shard_writer import ShardSink
from maskvid.datamodules.video_io import VideoDecodeError, encode_mp4, iter_frames, probe

# Same fallback as video_io.iter_frames when a stream does not state a usable frame rate.
DEFAULT_FPS = 25.0
# A decode covering less than this share of the declared duration gets a warning (FFmpeg often
# ends a truncated file silently instead of raising).
SHORT_DECODE_RATIO = 0.9
DEFAULT_REPORT_NAME = "report.json"
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow",
                "slower", "veryslow", "placebo")


def default_workers() -> int:
    """Worker processes used when none are asked for: up to 4, never more than the CPUs this
    process may use (its affinity, not the machine's count)."""
    return min(4, usable_cpus())


@dataclass(frozen=True)
class EncodeOptions:
    """How each input is turned into a sample's mp4."""

    fps: Optional[float] = None
    """Resample to this frame rate (drops or repeats frames); None keeps the source rate."""
    max_size: Optional[int] = None
    """Downscale so the short side is at most this many pixels; None keeps the size."""
    max_frames: Optional[int] = None
    """Keep at most this many (output) frames per video; None keeps all."""
    crf: int = 18
    """libx264 constant rate factor: 0 is lossless, 18 visually lossless, 51 worst."""
    preset: str = "veryfast"
    """libx264 speed/size preset."""

    def validate(self) -> None:
        """Raise DataError for values that would only fail later, inside every worker."""
        if self.fps is not None and not self.fps > 0:
            raise DataError(f"--fps must be > 0, got {self.fps}")
        if self.max_size is not None and self.max_size < 2:
            raise DataError(f"--max-size must be >= 2, got {self.max_size}")
        if self.max_frames is not None and self.max_frames < 1:
            raise DataError(f"--max-frames must be >= 1, got {self.max_frames}")
        if not 0 <= self.crf <= 51:
            raise DataError(f"--crf must be within 0..51, got {self.crf}")
        if self.preset not in X264_PRESETS:
            choices = ", ".join(X264_PRESETS)
            raise DataError(f"--preset must be one of {choices}, got {self.preset!r}")


@dataclass(frozen=True)
class Encoded:
    """A sample ready for the shard: its media (h264 mp4, or an image) and json metadata."""

    media: bytes
    meta: dict[str, Any]
    warning: str = ""
    ext: str = "mp4"
    """The media's member extension in the sample: mp4, or jpg/png/webp for an image."""


@dataclass
class BuildReport:
    """What a build did; `to_dict()` is what is written to the report file."""

    input: str
    out: str
    options: dict[str, Any]
    pattern: Optional[str] = None
    shards: list[dict[str, Any]] = field(default_factory=list)
    written: int = 0
    skipped: list[Skip] = field(default_factory=list)
    kept_empty_captions: list[Skip] = field(default_factory=list)
    warnings: list[Skip] = field(default_factory=list)
    elapsed_s: float = 0.0
    report_path: str = ""

    def reason_counts(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "out": self.out,
            "pattern": self.pattern,
            "shards": self.shards,
            "counts": {
                "inputs": self.written + len(self.skipped),
                "written": self.written,
                "skipped": len(self.skipped),
                "kept_empty_caption": len(self.kept_empty_captions),
                "warnings": len(self.warnings),
                "skipped_by_reason": self.reason_counts(),
            },
            "options": self.options,
            "skipped": [asdict(s) for s in self.skipped],
            "kept_empty_captions": [asdict(s) for s in self.kept_empty_captions],
            "warnings": [asdict(s) for s in self.warnings],
            "elapsed_s": round(self.elapsed_s, 3),
        }


# --------------------------------------------------------------------------- collecting inputs


def collect_inputs(
    videos: Path, exclude: Iterable[Path] = (), csv: Optional[Path] = None, progress: bool = False,
    option: str = "--videos",
) -> tuple[list[InputItem], list[tuple[int, Skip]]]:
    """Inputs from a folder, a `.jsonl` manifest or a CSV whose rows name files in the folder
    `videos`, plus (line, skip) for manifest lines and CSV rows that name no usable file.
    option: the command-line option the input came from, for the errors."""
    if not videos.exists():
        raise DataError(f"{option} {videos} does not exist")
    if csv is not None:
        return read_csv(csv, videos, progress=progress)
    if videos.is_dir():
        return scan_folder(videos, exclude), []
    if videos.suffix.lower() in MANIFEST_SUFFIXES:
        return read_manifest(videos)
    kind = "images" if option == "--images" else "videos"
    raise DataError(f"{option} {videos} must be a folder of {kind} or a .jsonl manifest")



# --------------------------------------------------------------------------- encoding one input


def encode_one(path: Path, source: str, options: EncodeOptions) -> Encoded | Skip:
    """Probe, decode and re-encode one video. Never raises for bad input: returns a Skip.

    Runs in worker processes, so anything unexpected also becomes a Skip (`unreadable or
    corrupt`, with the exception as detail) rather than taking the pool down.
    """
    try:
        if not path.is_file():
            return Skip(source, MISSING_FILE, f"{path} is not a file")
        if path.stat().st_size == 0:
            return Skip(source, CORRUPT, "empty file (0 bytes)")
        info = probe(path)
        out_fps = options.fps or info.fps or DEFAULT_FPS
        frames = iter_frames(path, fps=options.fps, max_size=options.max_size,
                             max_frames=options.max_frames)
        first = next(frames, None)
        if first is None:
            return Skip(source, ZERO_FRAMES, "the video stream decodes to no frames")
        mp4, n = encode_mp4(itertools.chain([first], frames), out_fps, options.crf, options.preset)
    except VideoDecodeError as e:
        return Skip(source, e.reason, e.detail or e.reason)
    except FileNotFoundError as e:
        return Skip(source, MISSING_FILE, str(e))
    except Exception as e:  # noqa: BLE001 - one odd file must not stop the build
        return Skip(source, CORRUPT, f"{type(e).__name__}: {e}".splitlines()[0][:300])
    duration = n / out_fps
    meta = {
        "fps": out_fps,
        "num_frames": n,
        # encode_mp4 crops odd sizes by one pixel for yuv420.
        "width": first.shape[1] // 2 * 2,
        "height": first.shape[0] // 2 * 2,
        "duration": duration,
        "codec": "h264",
        "source": source,
        "source_codec": info.codec,
        "source_fps": info.fps,
        "source_width": info.width,
        "source_height": info.height,
        "source_duration": info.duration,
        "source_rotation": info.rotation,
    }
    warning = ""
    capped = options.max_frames is not None and n >= options.max_frames
    if not capped and duration < SHORT_DECODE_RATIO * info.duration:
        warning = (f"decoded {duration:.2f} s of the {info.duration:.2f} s the header declares; "
                   "the file may be truncated")
    return Encoded(mp4, meta, warning)


def encode_one_image(path: Path, source: str, options: EncodeOptions) -> Encoded | Skip:
    """An image input (`--images`): stored as is, or upright and within options.max_size."""
    result = encode_image(path, source, options.max_size)
    if isinstance(result, Skip):
        return result
    ext, data, meta = result
    return Encoded(data, meta, ext=ext)


def _encode_job(job: tuple[Path, str, EncodeOptions, bool]) -> Encoded | Skip:
    path, source, options, image = job
    return encode_one_image(path, source, options) if image else encode_one(path, source, options)


def _ignore_sigint() -> None:
    # Ctrl-C is handled once, in the parent, which then terminates the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def ordered_map(
    fn: Callable[[Any], Any], jobs: Iterable[Any], workers: int, window: int = 4
) -> Iterator[Any]:
    """`map(fn, jobs)` in input order over a process pool, with at most `window`×workers jobs in
    flight, so finished results never pile up in memory behind a slow one (Pool.imap would
    queue every result). workers <= 1 runs in this process.
    """
    if workers <= 1:
        yield from map(fn, jobs)
        return
    pending: deque = deque()
    todo = iter(jobs)
    with multiprocessing.get_context().Pool(workers, initializer=_ignore_sigint) as pool:
        for job in itertools.islice(todo, window * workers):
            pending.append(pool.apply_async(fn, (job,)))
        while pending:
            result = pending.popleft().get()
            for job in itertools.islice(todo, 1):
                pending.append(pool.apply_async(fn, (job,)))
            yield result


# --------------------------------------------------------------------------- the build


def _caption_issue(item: InputItem) -> Skip:
    """The report entry for an input whose caption is missing or empty."""
    reason = MISSING_CAPTION if item.caption is None else EMPTY_CAPTION
    return Skip(item.source, reason, item.caption_detail)


def plan_jobs(
    items: list[InputItem], empty_caption: str = "skip"
) -> tuple[list[tuple[InputItem, str]], list[tuple[int, Skip]]]:
    """Split inputs, without decoding anything, into (item, sample key) pairs to encode and
    (input order, skip) for missing files and, with empty_caption="skip", missing captions.
    """
    jobs: list[tuple[InputItem, str]] = []
    skipped: list[tuple[int, Skip]] = []
    for item, key in zip(items, sample_keys(i.source for i in items)):
        if not item.path.is_file():
            detail = f"{item.path} not found (or not a regular file)"
            skipped.append((item.order, Skip(item.source, MISSING_FILE, detail)))
        elif item.caption or empty_caption == "keep":
            jobs.append((item, key))
        else:
            skipped.append((item.order, _caption_issue(item)))
    return jobs, skipped


def _check_writable(report_path: Path) -> None:
    try:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=report_path.parent, prefix=".report-"):
            pass
    except OSError as e:
        raise DataError(f"cannot write the report {report_path}: {e.strerror or e}") from e


def _write_report(report: BuildReport, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def build_shards(
    videos: str | os.PathLike,
    out: str | os.PathLike,
    *,
    options: EncodeOptions = EncodeOptions(),
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    empty_caption: str = "skip",
    workers: Optional[int] = None,
    overwrite: bool = False,
    report_path: str | os.PathLike | None = None,
    progress: bool = True,
    csv: str | os.PathLike | None = None,
    images: bool = False,
) -> BuildReport:
    """Write `<out>/<prefix>-NNNNNN.tar` shards and a JSON report; return the report.

    videos: a folder of videos with sidecar captions or a `.jsonl` manifest; with `csv`, the
        folder the CSV's rows name files in (see csv_manifest.py).
    images: the inputs are images (a folder of images with sidecar captions, or a manifest):
        each sample holds jpg/png/webp, txt and json; other files are skipped as "not an image".

    empty_caption: "skip" leaves out videos with a missing or empty caption; "keep" writes them
        with caption "" (for unconditional training) and lists them under `kept_empty_captions`.
    workers: processes that decode and encode (None: `default_workers()`; 0 or 1: in process).
    Raises DataError before any decoding when the input does not exist, the output or report is
    not writable, or shards exist already without `overwrite`; and after the run when no input
    could be used (the report, listing why, is written first).
    """
    started = time.monotonic()
    videos, out = Path(videos), Path(out)
    csv = Path(csv) if csv is not None else None
    report_file = Path(report_path) if report_path is not None else out / DEFAULT_REPORT_NAME
    options.validate()
    if empty_caption not in ("skip", "keep"):
        raise DataError(f"--empty-caption must be 'skip' or 'keep', got {empty_caption!r}")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise DataError(f"--prefix must be a plain file name prefix, got {prefix!r}")
    workers = default_workers() if workers is None else workers
    if images and csv is not None:
        raise DataError("--csv lists videos; build image shards from a folder or a .jsonl manifest with --images")

    items, bad_lines = collect_inputs(videos, exclude=[out], csv=csv, progress=progress,
                                      option="--images" if images else "--videos")
    if not items and not bad_lines:
        raise DataError(f"no input files found in {videos}")
    jobs, skipped = plan_jobs(items, empty_caption)
    skipped += bad_lines
    sink = ShardSink(out, samples_per_shard, prefix=prefix, overwrite=overwrite)
    try:
        _check_writable(report_file)
    except DataError:
        sink.abort()
        raise
    report = BuildReport(
        input=str(csv if csv is not None else videos),
        out=str(out),
        report_path=str(report_file),
        options={**asdict(options), "samples_per_shard": samples_per_shard, "prefix": prefix,
                 "empty_caption": empty_caption, "workers": workers, "overwrite": overwrite,
                 "videos": str(videos), "images": images},
    )
    work = ((item.path, item.source, options, images) for item, _ in jobs)
    results = ordered_map(_encode_job, work, workers)
    try:
        with tqdm(total=len(jobs), unit="image" if images else "video", file=sys.stderr, disable=not progress,
                  dynamic_ncols=True) as bar:
            for result, (item, key) in zip(results, jobs):
                if isinstance(result, Skip):
                    skipped.append((item.order, result))
                else:
                    meta = {**result.meta, **item.meta} if item.meta else result.meta
                    sink.write_sample(key, {result.ext: result.media, "txt": item.caption or "", "json": meta})
                    if not item.caption:
                        report.kept_empty_captions.append(_caption_issue(item))
                    if result.warning:
                        report.warnings.append(Skip(item.source, SHORT_DECODE, result.warning))
                bar.update(1)
                bar.set_postfix(skipped=len(skipped), refresh=False)
    except BaseException:
        sink.abort()
        raise
    finally:
        results.close()  # stops the pool now rather than when garbage collected
    report.skipped = [s for _, s in sorted(skipped, key=lambda pair: pair[0])]
    report.written = len(sink)
    if report.written == 0:
        sink.abort()
    else:
        report.shards = [{"path": Path(s.path).name, "num_samples": s.num_samples}
                         for s in sink.close()]
        report.pattern = sink.pattern
    report.elapsed_s = time.monotonic() - started
    _write_report(report, report_file)
    if report.written == 0:
        reasons = ", ".join(f"{n} {r}" for r, n in report.reason_counts().items())
        kind = "images" if images else "videos"
        raise DataError(f"no usable {kind} in {report.input} ({reasons}); details in {report_file}")
    return report
