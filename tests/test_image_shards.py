"""`maskvid data shards --images`: a folder (or manifest) of captioned images -> image shards that
the datamodule reads as 1-frame clips, for joint image-video training (issue 35, item 2)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from maskvid.datamodules.shards import CORRUPT, MISSING_CAPTION, NOT_AN_IMAGE
from maskvid.datamodules.video_datamodule import VideoDataModule
from maskvid.launch.cli import main
from tests.media_fixtures import write_video
from tests.test_shards import key_of, one_line, read_samples, report_of


def picture(width: int, height: int) -> Image.Image:
    """Red left half, blue right half: which way is up survives a check after rotation."""
    img = Image.new("RGB", (width, height), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, width // 2, height))
    return img


def save(img: Image.Image, path: Path, caption: str | None, **kw) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    if caption is not None:
        path.with_suffix(".txt").write_text(f" {caption}\n")
    return path.read_bytes()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("images")
    kept = {
        "a.jpg": save(picture(40, 30), root / "a.jpg", "caption a", quality=95),
        "b.png": save(picture(30, 20), root / "b.png", "caption b"),
        "nested/c.webp": save(picture(24, 24), root / "nested" / "c.webp", "caption c", quality=90),
    }
    save(picture(20, 10), root / "d.bmp", "caption d")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    save(picture(40, 20), root / "rotated.jpg", "caption rotated", exif=exif, quality=95)
    data = save(picture(40, 30), root / "broken.jpg", "caption broken", quality=95)
    (root / "broken.jpg").write_bytes(data[: len(data) // 2])
    write_video(root / "clip.mp4", frames=4)
    (root / "clip.txt").write_text("a video among the images")
    save(picture(8, 8), root / "uncaptioned.png", None)
    return root, kept


def build_images(source: Path, out: Path, *extra: str) -> int:
    return main(["data", "shards", "--images", str(source), "--out", str(out), "--quiet", "--workers", "0", *extra])


def test_a_folder_of_captioned_images_becomes_image_shards(image_folder, tmp_path):
    root, kept = image_folder
    assert build_images(root, tmp_path / "out") == 0
    report = report_of(tmp_path / "out")
    samples = {s["__key__"]: s for s in read_samples(report["pattern"])}
    assert set(samples) == {key_of(s) for s in ("a.jpg", "b.png", "nested/c.webp", "d.bmp", "rotated.jpg")}
    # JPEG, PNG and WebP that need no change are stored byte for byte.
    for source, data in kept.items():
        sample = samples[key_of(source)]
        ext = source.rsplit(".", 1)[1]
        assert sample[ext] == data and sample["txt"].decode() == f"caption {Path(source).stem}"
        meta = json.loads(sample["json"])
        assert meta["kind"] == "image" and meta["num_frames"] == 1 and meta["source"] == source
    # Other formats become PNG; an EXIF-rotated JPEG is stored upright (its red half on top).
    bmp = samples[key_of("d.bmp")]
    assert "png" in bmp and Image.open(io.BytesIO(bmp["png"])).size == (20, 10)
    upright = Image.open(io.BytesIO(samples[key_of("rotated.jpg")]["jpg"])).convert("RGB")
    assert upright.size == (20, 40) and json.loads(samples[key_of("rotated.jpg")]["json"])["height"] == 40
    assert upright.getpixel((10, 5))[0] > 200 and upright.getpixel((10, 35))[2] > 200
    assert {s["path"]: s["reason"] for s in report["skipped"]} == {
        "broken.jpg": CORRUPT, "clip.mp4": NOT_AN_IMAGE, "uncaptioned.png": MISSING_CAPTION}
    assert report["options"]["images"] is True

    # The datamodule reads them as 1-frame clips: frame 0 real, the rest copies of it.
    dm = VideoDataModule(val_shards=str(tmp_path / "out"), num_frames=5, resolution=16, batch_size=5, num_workers=0)
    [batch] = list(dm.val_dataloader())
    assert batch["frame_mask"].tolist() == [[True, False, False, False, False]] * 5
    assert all(torch.equal(batch["video"][:, :, k], batch["video"][:, :, 0]) for k in range(1, 5))


def test_max_size_downscales_images_and_a_manifest_works(image_folder, tmp_path):
    root, _ = image_folder
    lines = [json.dumps({"path": "a.jpg", "caption": "from the manifest"}), json.dumps({"path": "clip.mp4", "caption": "v"})]
    manifest = tmp_path / "images.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    for name in ("a.jpg", "clip.mp4"):  # paths are relative to the manifest
        (tmp_path / name).write_bytes((root / name).read_bytes())
    assert build_images(manifest, tmp_path / "small", "--max-size", "12") == 0
    report = report_of(tmp_path / "small")
    [sample] = read_samples(report["pattern"])
    assert sample["txt"] == b"from the manifest"
    assert Image.open(io.BytesIO(sample["jpg"])).size == (16, 12)
    meta = json.loads(sample["json"])
    assert (meta["width"], meta["height"], meta["source_width"], meta["source_height"]) == (16, 12, 40, 30)
    assert [s["reason"] for s in report["skipped"]] == [NOT_AN_IMAGE]


def test_images_and_videos_are_one_input_and_csv_is_for_videos(image_folder, tmp_path, capsys):
    root, _ = image_folder
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "shards", "--images", str(root), "--videos", str(root), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    capsys.readouterr()
    assert build_images(root, tmp_path / "y", "--csv", str(root / "list.csv")) == 2
    assert "--csv lists videos" in one_line(capsys.readouterr().err)
    assert build_images(tmp_path / "missing", tmp_path / "z") == 2
    assert one_line(capsys.readouterr().err).endswith(f"--images {tmp_path / 'missing'} does not exist")
