"""One captioned image -> an image sample for `maskvid data shards --images` (joint image-video
training: the datamodule decodes such a sample as a 1-frame clip).

A JPEG, PNG or WebP that needs no change is stored byte for byte; one that must be turned upright
(EXIF orientation) or downscaled (--max-size) is re-encoded in its own format (JPEG and WebP at
IMAGE_QUALITY), and any other format PIL reads (BMP, TIFF, ...) becomes a PNG.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

from PIL import Image, ImageOps

from maskvid.datamodules.shard_inputs import CORRUPT, MISSING_FILE, NOT_AN_IMAGE, Skip

# The file suffixes `--images` takes; anything else in the input is reported as "not an image".
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
# PIL format -> the sample's member extension (what the datamodule decodes as an image).
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
IMAGE_QUALITY = 95
EXIF_ORIENTATION = 0x0112


def encode_image(path: Path, source: str, max_size: Optional[int] = None) -> tuple[str, bytes, dict[str, Any]] | Skip:
    """-> (extension, bytes, json metadata) of the sample, or a Skip. Never raises for bad input."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return Skip(source, NOT_AN_IMAGE, f"{path.suffix or 'no suffix'} is not one of {sorted(IMAGE_SUFFIXES)}")
    try:
        if not path.is_file():
            return Skip(source, MISSING_FILE, f"{path} is not a file")
        data = path.read_bytes()
        if not data:
            return Skip(source, CORRUPT, "empty file (0 bytes)")
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes it all: a truncated file fails here, not in training
            source_format, source_size = img.format, img.size
            orientation = int(img.getexif().get(EXIF_ORIENTATION, 1))
            upright = ImageOps.exif_transpose(img) if orientation != 1 else img
            scale = 1.0 if max_size is None else min(1.0, max_size / min(upright.size))
            size = (max(1, round(upright.width * scale)), max(1, round(upright.height * scale)))
            ext = KEPT_FORMATS.get(source_format)
            if ext is None or orientation != 1 or size != upright.size:
                ext = ext or "png"
                out = upright.convert("RGB").resize(size, Image.LANCZOS) if size != upright.size else upright.convert("RGB")
                buf = io.BytesIO()
                out.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext], quality=IMAGE_QUALITY)
                data = buf.getvalue()
    except FileNotFoundError as e:
        return Skip(source, MISSING_FILE, str(e))
    except Exception as e:  # noqa: BLE001 - PIL's plugins raise more than OSError (SyntaxError, ...); one odd file must not stop the build
        return Skip(source, CORRUPT, f"{type(e).__name__}: {e}".splitlines()[0][:300])
    meta = {
        "kind": "image",
        "num_frames": 1,
        "width": size[0],
        "height": size[1],
        "format": ext,
        "source": source,
        "source_format": source_format,
        "source_width": source_size[0],
        "source_height": source_size[1],
        "source_orientation": orientation,
    }
    return ext, data, meta
