"""Turn one raw WebDataset sample (bytes per extension) into a training example, or reject it.

Every way a sample can be bad becomes a `BadSample` with a short reason, so the streams can skip,
count and name it without knowing about PyAV, PIL or JSON.

Shards from `maskvid data shards` and from video2dataset share one layout (`mp4`, `txt` caption,
`json` metadata) and one decoder. video2dataset also stores a record (`txt` + `json` with a
`status` other than "success") for each video it failed to fetch, and may leave `txt` empty with
the caption in the json: `download_failure` names such records so the streams leave them out as
non-samples, and the caption falls back to the json's `caption`.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np
import torch

from maskvid.datamodules.clips import IMAGE_EXTS, VIDEO_EXTS, ClipSpec, decode_clip, decode_image
from maskvid.datamodules.video_io import VideoDecodeError


# Members that describe a sample without being one: a record made only of these has no media.
TEXT_FIELDS = frozenset({"txt", "json"})


def download_failure(fields: Iterable[str], json_data: Optional[bytes]) -> Optional[str]:
    """The status of a record video2dataset writes for a video it could not fetch, else None.

    fields: the record's member extensions (`__key__`-style entries are ignored). Only a record
    without media and whose json has a string `status` other than "success" qualifies, so a
    sample of ours that lost its mp4 is still a bad sample, counted and named.
    """
    if json_data is None or any(f not in TEXT_FIELDS for f in fields if not f.startswith("__")):
        return None
    try:
        info = json.loads(json_data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurd nesting
        return None
    status = info.get("status") if isinstance(info, dict) else None
    return status if isinstance(status, str) and status != "success" else None


class BadSample(Exception):
    """A sample that cannot be used; `reason` is short and stable (it is counted by reason)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def collate_meta(metas: list[dict[str, Any]]) -> dict[str, Any]:
    """The `meta` of a batch from its samples' (video and token batches alike): per-sample key,
    url, info and stream position, and the worker's id and running count of bad samples as of
    the batch's last sample; from a joint image-video stream also `stream` ("image" or "video":
    which of the two each sample came from)."""
    mixed = {"stream": [m["stream"] for m in metas]} if "stream" in metas[0] else {}
    return {
        **mixed,
        "key": [m["key"] for m in metas],
        "url": [m["url"] for m in metas],
        "info": [m["info"] for m in metas],
        "worker": metas[-1]["worker"],
        "position": [m["position"] for m in metas],
        "skipped": metas[-1]["skipped"],
    }


def check_member_key(raw: dict[str, Any]) -> None:
    """BadSample for a sample whose tar member names are absolute or climb with `..`.

    Shards are read in memory and nothing from them is extracted, but keys end up in file names
    (previews, token shards, reports); a hostile shard must not be able to aim those anywhere.
    """
    key = str(raw.get("__key__", ""))
    parts = key.replace("\\", "/").split("/")
    if posixpath.isabs(key) or key.startswith("\\") or ".." in parts or "\0" in key:
        raise BadSample("unsafe member path", repr(key)[:200])


@dataclass
class SampleDecoder:
    """Decodes raw samples into {video uint8 [T,S,S,3], frame_mask [T], caption, meta}."""

    spec: ClipSpec
    missing_caption: str = "skip"  # "skip" the sample, or "keep" it with caption ""

    def __post_init__(self) -> None:
        if self.missing_caption not in ("skip", "keep"):
            raise ValueError(f"missing_caption must be 'skip' or 'keep', got {self.missing_caption!r}")

    def __call__(self, raw: dict[str, Any], rng: Optional[np.random.Generator]) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if "json" in raw:
            try:
                info = json.loads(raw["json"])
                if not isinstance(info, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                raise BadSample("bad json", str(e)[:200]) from e
        caption = ""
        if "txt" in raw:
            try:
                caption = raw["txt"].decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise BadSample("bad caption", "not UTF-8") from e
        if not caption and isinstance(info.get("caption"), str):
            caption = info["caption"].strip()
        if not caption and self.missing_caption == "skip":
            has_caption = "txt" in raw or "caption" in info
            raise BadSample("empty caption" if has_caption else "missing caption")
        try:
            video_ext = next((e for e in VIDEO_EXTS if e in raw), None)
            if video_ext is not None:
                frames, mask = decode_clip(
                    raw[video_ext],
                    self.spec,
                    rng=rng,
                    fps_hint=_num(info.get("fps")),
                    frames_hint=int(_num(info.get("num_frames"))),
                )
            else:
                image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
                if image_ext is None:
                    raise BadSample("no video or image", f"has {sorted(k for k in raw if not k.startswith('__'))}")
                frames, mask = decode_image(raw[image_ext], self.spec)
        except VideoDecodeError as e:
            raise BadSample(e.reason, e.detail) from e
        return {
            "video": torch.from_numpy(frames),
            "frame_mask": torch.from_numpy(mask),
            "caption": caption,
            "meta": {"key": raw.get("__key__", ""), "url": raw.get("__url__", ""), "info": info},
        }


def _num(value: Any) -> float:
    try:
        return float(value) if value is not None else 0.0
    except (TypeError, ValueError):
        return 0.0
