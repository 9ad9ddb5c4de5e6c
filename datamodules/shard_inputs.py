"""What `maskvid data shards` reads: the inputs of a build, each a video (or, with --images, an
image) path and its caption.

Three forms of input, one item type: a folder scanned recursively with a sidecar caption per file
(`clip.txt`, or `clip.mp4.txt` when two videos share a stem; `cat.jpg` + `cat.txt` for images) and a JSONL manifest of
`{"path": ..., "caption": ...}` lines, both read here, and a CSV such as WebVid's, read by
`csv_manifest.py`. An input that cannot even be listed becomes a `Skip` with one of the
`SKIP_REASONS`, so the report names it instead of the build failing.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from maskvid.datamodules.errors import DataError

MISSING_FILE = "missing file"
CORRUPT = "unreadable or corrupt"
NO_VIDEO = "no video stream"
ZERO_FRAMES = "zero frames"
EMPTY_CAPTION = "empty caption"
MISSING_CAPTION = "missing caption"
BAD_MANIFEST_LINE = "bad manifest line"
NOT_AN_IMAGE = "not an image"  # with --images: a file whose suffix names no image format
SKIP_REASONS = (
    MISSING_FILE, CORRUPT, NO_VIDEO, ZERO_FRAMES, EMPTY_CAPTION, MISSING_CAPTION, BAD_MANIFEST_LINE, NOT_AN_IMAGE
)
# Not a skip: the video is written, but the report flags it (see SHORT_DECODE_RATIO).
SHORT_DECODE = "short decode"

# Files in a video folder that are captions or metadata, never inputs. Anything else is tried as
# a video, so a stray non-video file shows up in the report instead of vanishing silently.
SIDECAR_SUFFIXES = frozenset({".txt", ".json", ".jsonl", ".md", ".csv"})
MANIFEST_SUFFIXES = frozenset({".jsonl"})


@dataclass(frozen=True, slots=True)  # slots: a WebVid CSV lists millions of these
class InputItem:
    """One candidate video and its caption, as found in the folder or a manifest."""

    path: Path
    """Where the file is (absolute, or relative to the working directory)."""
    source: str
    """The path as reported: relative to the input root, with '/' separators."""
    caption: Optional[str]
    """Stripped caption; None when there is none at all."""
    caption_detail: str = ""
    """Why the caption is missing, or where an empty one came from."""
    order: int = 0
    """Position in the input (manifest line number for manifests), for a report in input order."""
    meta: Optional[dict[str, Any]] = None
    """Extra fields for the sample's json (a CSV row's videoid and url); None when there are none."""


@dataclass(frozen=True)
class Skip:
    """A report entry: an input left out of the shards, or (in `kept_empty_captions` and
    `warnings`) one written anyway, with a reason code and a human-readable detail."""

    path: str
    reason: str
    detail: str = ""


def _read_sidecar(video: Path) -> tuple[Optional[str], str]:
    """(caption, detail) from `clip.mp4.txt` or else `clip.txt`; caption None when absent."""
    for sidecar in (video.with_name(video.name + ".txt"), video.with_suffix(".txt")):
        if sidecar.is_file():
            try:
                return sidecar.read_text(encoding="utf-8-sig").strip(), f"{sidecar.name} is empty"
            except (OSError, UnicodeDecodeError) as e:
                return None, f"cannot read {sidecar.name} as UTF-8 text: {e}"
    return None, f"no {video.with_suffix('.txt').name} next to it"


def scan_folder(root: Path, exclude: Iterable[Path] = ()) -> list[InputItem]:
    """Every non-hidden, non-sidecar file under `root`, sorted by relative path.

    exclude: folders to leave out (the output folder, when it lies inside the input folder).
    """
    excluded = {p.resolve() for p in exclude}
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [
            d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded
        ]
        for name in filenames:
            path = here / name
            if name.startswith(".") or path.suffix.lower() in SIDECAR_SUFFIXES:
                continue
            found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    return [
        InputItem(path, rel, *_read_sidecar(path), order=i) for i, (rel, path) in enumerate(found)
    ]


def read_manifest(manifest: Path) -> tuple[list[InputItem], list[tuple[int, Skip]]]:
    """Items of a JSONL manifest in line order, and (line number, `bad manifest line` skip) for
    each line that is not a JSON object with a "path" string and an optional "caption" string.
    """
    root = manifest.parent
    items: list[InputItem] = []
    bad: list[tuple[int, Skip]] = []
    try:
        lines = manifest.read_bytes().splitlines()
    except OSError as e:
        raise DataError(f"cannot read manifest {manifest}: {e.strerror or e}") from e
    for lineno, raw in enumerate(lines, 1):
        where = f"{manifest.name}:{lineno}"
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            if not text.strip():
                continue
            entry = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            detail = f"line {lineno}: not valid JSON: {e}"
            bad.append((lineno, Skip(where, BAD_MANIFEST_LINE, detail)))
            continue
        path = entry.get("path") if isinstance(entry, dict) else None
        caption = entry.get("caption") if isinstance(entry, dict) else None
        if not isinstance(path, str) or not path.strip():
            detail = f'line {lineno}: expected an object with a non-empty "path" string'
            bad.append((lineno, Skip(where, BAD_MANIFEST_LINE, detail)))
            continue
        if caption is not None and not isinstance(caption, str):
            detail = f'line {lineno}: "caption" must be a string, got {type(caption).__name__}'
            bad.append((lineno, Skip(where, BAD_MANIFEST_LINE, detail)))
            continue
        source = Path(os.path.normpath(path)).as_posix()
        if caption is None:
            caption_detail = f'line {lineno} has no "caption"'
        else:
            caption, caption_detail = caption.strip(), f'line {lineno}: "caption" is empty'
        items.append(InputItem(root / path, source, caption, caption_detail, lineno))
    return items, bad




def sample_keys(sources: Iterable[str]) -> list[str]:
    """A unique WebDataset key per source path: no dots, no slashes, stable for a given input.

    `a.mp4` and `a.webm` give `a_mp4` and `a_webm`; a clash left after that (`a_b.mp4` and
    `a/b.mp4`) gets `-2`, `-3`... in input order.
    """
    keys: list[str] = []
    taken: set[str] = set()
    for source in sources:
        base = re.sub(r"[^\w-]+", "_", source).strip("_") or "sample"
        key = base
        for n in itertools.count(2):
            if key not in taken:
                break
            key = f"{base}-{n}"
        taken.add(key)
        keys.append(key)
    return keys


