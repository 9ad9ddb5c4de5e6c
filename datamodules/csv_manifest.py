"""Inputs from a CSV listing videos already on disk, such as WebVid's `results_2M_train.csv`.

Columns are matched by name (others are ignored):
- the caption: `name` (WebVid) or `caption`;
- where each video is, at least one of: `path` (relative to the videos folder, or absolute),
  `videoid` (`<videos>/<videoid>.mp4`, or `<videos>/<page_dir>/<videoid>.mp4` when the CSV has
  `page_dir`, the layout of WebVid's own download script), `contentUrl` (the URL's file name,
  looked up in the videos folder).

Nothing is downloaded: a row's first candidate file that exists is used. A row with none is a
`missing file` skip naming what was tried, a row that cannot be parsed a `bad manifest line`;
only a CSV whose header lacks the needed columns stops the build, before anything is decoded.
"""

from __future__ import annotations

import csv
import os
import posixpath
import sys
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import unquote, urlsplit

from tqdm import tqdm

from maskvid.datamodules.errors import DataError
from maskvid.datamodules.shard_inputs import BAD_MANIFEST_LINE, MISSING_FILE, InputItem, Skip

CAPTION_COLUMNS = ("name", "caption")
PATH_COLUMN = "path"
ID_COLUMN = "videoid"
URL_COLUMN = "contentUrl"
DIR_COLUMN = "page_dir"
LOCATOR_COLUMNS = (ID_COLUMN, URL_COLUMN, PATH_COLUMN)
VIDEO_SUFFIX = ".mp4"


def caption_column(csv_path: Path, columns: list[str]) -> str:
    """The caption column's name; DataError naming every missing column kind otherwise."""
    caption = next((c for c in CAPTION_COLUMNS if c in columns), None)
    missing = []
    if caption is None:
        missing.append("a caption column (" + " or ".join(CAPTION_COLUMNS) + ")")
    if not any(c in columns for c in LOCATOR_COLUMNS):
        missing.append("a column that locates each video (" + ", ".join(LOCATOR_COLUMNS[:-1])
                       + " or " + LOCATOR_COLUMNS[-1] + ")")
    if missing:
        have = ", ".join(columns) if columns else "none"
        raise DataError(f"--csv {csv_path.name} lacks {' and '.join(missing)}; its columns: {have}")
    return caption


def _value(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    return value.strip() if isinstance(value, str) else ""


def candidates(row: dict[str, Any]) -> Iterator[str]:
    """File names that may hold the row's video, in the order they are tried: relative to the
    videos folder, or absolute. Lazy, so a row whose first candidate exists costs one lookup."""
    if path := _value(row, PATH_COLUMN):
        yield path
    if videoid := _value(row, ID_COLUMN):
        yield f"{videoid}{VIDEO_SUFFIX}"
        if page_dir := _value(row, DIR_COLUMN):
            yield f"{page_dir}/{videoid}{VIDEO_SUFFIX}"
    if url := _value(row, URL_COLUMN):
        if name := posixpath.basename(unquote(urlsplit(url).path)):
            yield name


def _row_id(row: dict[str, Any]) -> str:
    """How the report names a row: its videoid, else its path, else its URL's file name."""
    for column in (ID_COLUMN, PATH_COLUMN):
        if value := _value(row, column):
            return value
    return posixpath.basename(urlsplit(_value(row, URL_COLUMN)).path)


def _is_utf8(row: dict[str, Any]) -> bool:
    # The file is read with surrogateescape so that one bad byte spoils one row, not the build.
    try:
        for value in row.values():
            if isinstance(value, str):
                value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _rows(reader: csv.DictReader) -> Iterator[tuple[int, Optional[dict[str, Any]], str]]:
    """(line, row, "") per row, or (line, None, why) for a row the csv module rejects."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            # The bad row starts on the line after the last one read before it.
            yield reader.line_num + 1, None, str(e)
            continue
        yield reader.line_num, row, ""


def read_csv(
    csv_path: Path, videos: Path, progress: bool = False
) -> tuple[list[InputItem], list[tuple[int, Skip]]]:
    """Items of the rows whose file is found, in row order, and (line, skip) for the others.

    videos: the folder the CSV's files are in. Raises DataError when the CSV cannot be read or
    its header lacks a needed column.
    """
    if not csv_path.is_file():
        raise DataError(f"--csv {csv_path} does not exist (or is not a file)")
    if not videos.is_dir():
        raise DataError(f"--videos {videos} must be the folder the CSV's videos are in")
    items: list[InputItem] = []
    skipped: list[tuple[int, Skip]] = []
    root = str(videos)
    try:
        with open(csv_path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.DictReader(f)
            try:
                columns = [c.strip() for c in (reader.fieldnames or [])]
            except csv.Error as e:
                raise DataError(f"--csv {csv_path.name}: cannot parse the header: {e}") from e
            if not columns:
                raise DataError(f"--csv {csv_path} is empty (no header line)")
            reader.fieldnames = columns
            caption_col = caption_column(csv_path, columns)
            bar = tqdm(_rows(reader), desc="matching CSV rows", unit=" rows", file=sys.stderr,
                       disable=not progress, dynamic_ncols=True)
            for line, row, problem in bar:
                where = f"{csv_path.name}:{line}"
                if row is None or not _is_utf8(row):
                    detail = f"line {line}: {problem or 'not valid UTF-8'}"
                    skipped.append((line, Skip(where, BAD_MANIFEST_LINE, detail)))
                    continue
                tried: list[str] = []
                for name in candidates(row):
                    tried.append(name)
                    if os.path.isfile(os.path.join(root, name)):  # os.path: millions of rows
                        break
                else:
                    skipped.append((line, _unmatched(row, line, where, tried)))
                    if len(skipped) % 1024 == 1:  # a postfix per row would cost more than the row
                        bar.set_postfix(skipped=len(skipped), refresh=False)
                    continue
                path, source = Path(root, tried[-1]), _row_id(row)
                caption = row.get(caption_col)
                if caption is None:
                    detail = f'line {line} has no "{caption_col}" value'
                else:
                    caption, detail = caption.strip(), f'line {line}: "{caption_col}" is empty'
                meta = {k: v for k, v in (("videoid", _value(row, ID_COLUMN)),
                                          ("url", _value(row, URL_COLUMN))) if v}
                items.append(InputItem(path, source, caption, detail, line, meta or None))
            bar.close()
    except OSError as e:
        raise DataError(f"cannot read --csv {csv_path}: {e.strerror or e}") from e
    if not items and not skipped:
        raise DataError(f"--csv {csv_path} has a header but no rows")
    return items, skipped


def _unmatched(row: dict[str, Any], line: int, where: str, tried: list[str]) -> Skip:
    """The skip for a row whose video is not there, or that names no video at all."""
    if not tried:
        return Skip(where, BAD_MANIFEST_LINE, f"line {line}: no {', '.join(LOCATOR_COLUMNS)} value")
    return Skip(_row_id(row), MISSING_FILE, f"not found: {', '.join(tried)}")
