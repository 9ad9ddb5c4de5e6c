"""The synthetic captioned dataset: determinism, held-out combinations, metadata, captions, CLI."""

from __future__ import annotations

import json
import tarfile
from collections import defaultdict
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from maskvid.datamodules.errors import DataError
from maskvid.datamodules.synthetic import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    FILL_RATIO,
    HELDOUT_COMBOS,
    SHAPES,
    SIZES,
    SPEEDS,
    TEMPLATES,
    Variation,
    all_combos,
    build_synthetic,
    caption_for,
    parse_caption,
    render_sample,
    render_video,
    seen_combos,
)
from maskvid.datamodules.video_io import decode_all
from maskvid.launch.cli import main as cli_main

SMALL = dict(num_train=40, num_val=8, num_heldout=10, size=32, frames=5, samples_per_shard=16, progress=False)


def read_split(split_dir: Path) -> list[dict]:
    """Every sample of a split's shards, in order, as {"key", "mp4", "txt", "json"}."""
    samples: dict[str, dict] = defaultdict(dict)
    for shard in sorted(split_dir.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples[key][ext] = tar.extractfile(member).read()
    return [
        {"key": k, "mp4": s["mp4"], "txt": s["txt"].decode(), "json": json.loads(s["json"])}
        for k, s in samples.items()
    ]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/shard-*.tar"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    build_synthetic(out, seed=0, num_train=192, num_val=24, num_heldout=20, size=32, frames=9,
                    samples_per_shard=64, workers=0, progress=False)
    return out


def triple(meta: dict) -> tuple[str, str, str]:
    return meta["colour"], meta["shape"], meta["direction"]


def test_same_seed_gives_identical_shards_whatever_the_workers(tmp_path):
    build_synthetic(tmp_path / "a", seed=3, workers=0, **SMALL)
    build_synthetic(tmp_path / "b", seed=3, workers=2, **SMALL)
    build_synthetic(tmp_path / "c", seed=4, workers=0, **SMALL)
    a, b, c = (shard_bytes(tmp_path / name) for name in "abc")
    assert len(a) == 5 and a == b  # train 40/16 -> 3 shards, val 1, heldout 1
    assert a.keys() == c.keys() and all(a[name] != c[name] for name in a)
    for name in ("prompts_seen.txt", "prompts_heldout.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_metadata_holds_attributes_and_video_info(dataset):
    samples = read_split(dataset / "train")
    assert len(samples) == 192
    for i, s in enumerate(samples):
        meta = s["json"]
        assert s["key"] == f"train-{i:06d}"
        assert (meta["fps"], meta["num_frames"], meta["width"], meta["height"]) == (8.0, 9, 32, 32)
        assert meta["duration"] == pytest.approx(9 / 8) and meta["source"] == "synthetic"
        assert (meta["seed"], meta["split"], meta["index"]) == (0, "train", i)
        assert meta["colour"] in COLOURS and meta["shape"] in SHAPES and meta["direction"] in DIRECTIONS
        assert meta["speed"] in SPEEDS and meta["size"] in SIZES and meta["background"] in BACKGROUNDS
        assert s["txt"] == caption_for(meta, meta["template"])
    video = decode_all(samples[0]["mp4"])
    assert video.shape == (9, 32, 32, 3)


def test_index_and_attributes_files(dataset):
    index = json.loads((dataset / "train" / "shards.json").read_text())
    assert index["num_samples"] == 192 and [s["nsamples"] for s in index["shards"]] == [64, 64, 64]
    info = json.loads((dataset / "attributes.json").read_text())
    assert [tuple(c) for c in info["heldout"]] == list(HELDOUT_COMBOS)
    assert set(info["colours"]) == set(COLOURS) and info["templates"] == list(TEMPLATES)
    assert info["splits"]["heldout"] == {"pattern": str(dataset / "heldout" / "shard-000000.tar"),
                                         "num_samples": 20}


def test_heldout_combinations_only_in_heldout_split(dataset):
    held = set(HELDOUT_COMBOS)
    for split in ("train", "val"):
        assert not {triple(s["json"]) for s in read_split(dataset / split)} & held
    heldout = [triple(s["json"]) for s in read_split(dataset / "heldout")]
    assert set(heldout) == held  # 20 samples cycle twice through the 10 triples


def test_heldout_set_leaves_every_value_in_training():
    seen = seen_combos()
    assert 0.05 <= len(HELDOUT_COMBOS) / len(all_combos()) <= 0.15
    assert len(set(HELDOUT_COMBOS)) == len(HELDOUT_COMBOS) and len(seen) + len(HELDOUT_COMBOS) == 96
    assert {c for c, _, _ in seen} == set(COLOURS)
    assert {s for _, s, _ in seen} == set(SHAPES)
    assert {d for _, _, d in seen} == set(DIRECTIONS)


def test_every_value_appears_in_train_and_val_differs(dataset):
    train = [s["json"] for s in read_split(dataset / "train")]
    assert {triple(m) for m in train} == set(seen_combos())  # 192 samples: two full cycles
    for key, values in [("speed", SPEEDS), ("size", SIZES), ("background", BACKGROUNDS),
                        ("template", range(len(TEMPLATES)))]:
        assert {m[key] for m in train} == set(values), key
    val = read_split(dataset / "val")
    assert len(val) == 24 and not {s["mp4"] for s in val} & {s["mp4"] for s in read_split(dataset / "train")}


def test_prompt_files(dataset):
    for name, combos in [("seen", seen_combos()), ("heldout", list(HELDOUT_COMBOS))]:
        lines = (dataset / f"prompts_{name}.txt").read_text().splitlines()
        rows = [json.loads(line) for line in (dataset / f"prompts_{name}.jsonl").read_text().splitlines()]
        assert len(lines) == len(rows) == len(combos) == len(set(lines))
        assert [r["prompt"] for r in rows] == lines
        assert [triple(r) for r in rows] == combos
        assert [triple(parse_caption(line)) for line in lines] == combos


def test_every_caption_parses_back():
    for (colour, shape, direction), template in product(all_combos(), range(len(TEMPLATES))):
        attrs = {"colour": colour, "shape": shape, "direction": direction,
                 "speed": "fast", "size": "large", "background": "dark brown"}
        parsed = parse_caption(caption_for(attrs, template))
        assert parsed is not None and all(attrs[k] == v for k, v in parsed.items())
        assert triple(parsed) == (colour, shape, direction)
    assert parse_caption("A Small RED circle slides to the left, quickly.") == {
        "colour": "red", "shape": "circle", "direction": "left", "size": "small", "speed": "fast"}
    assert parse_caption("a red circle moving left on a navy background")["background"] == "navy"
    for ambiguous in ("a circle moving left", "a red and blue circle moving left",
                      "a red circle", "a red square chasing a circle to the left", ""):
        assert parse_caption(ambiguous) is None, ambiguous


@pytest.mark.parametrize("size", [16, 32, 64])
def test_object_stays_inside_and_visible(size):
    for i in range(48):
        sample = render_sample(7, "train", i, size=size, frames=9)
        video, attrs = sample.video, sample.attrs
        bg = np.array(BACKGROUNDS[attrs["background"]], np.uint8)
        border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1)
        assert (border == bg).all(), attrs
        assert (video != bg).any(axis=-1).any(axis=(1, 2)).all(), attrs  # visible in every frame


@pytest.mark.parametrize("shape", SHAPES)
def test_rendered_shapes_have_their_fill_ratio(shape):
    attrs = {"colour": "white", "shape": shape, "direction": "right", "size": "large"}
    frame = render_video(attrs, size=128, frames=2)[0].astype(np.float64)
    alpha = frame[..., 0] / COLOURS["white"][0]  # black background: coverage is the intensity
    rows, cols = np.flatnonzero(alpha.max(axis=1) > 0.5), np.flatnonzero(alpha.max(axis=0) > 0.5)
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    assert alpha.sum() / box == pytest.approx(FILL_RATIO[shape], abs=0.03)


def test_bad_arguments_are_data_errors(tmp_path):
    for bad in ({"size": 15}, {"size": 8}, {"frames": 1}, {"num_train": -1}, {"fps": 0}, {"seed": -1}):
        with pytest.raises(DataError):
            build_synthetic(tmp_path, **{**SMALL, **bad})
    assert not list(tmp_path.glob("*/shard-*.tar"))


def test_cli_builds_then_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "syn"
    args = ["data", "synthetic", "--out", str(out), "--num-train", "6", "--num-val", "2",
            "--num-heldout", "3", "--size", "32", "--frames", "5", "--samples-per-shard", "4",
            "--workers", "0", "--quiet"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert str(out / "train" / "shard-{000000..000001}.tar") in printed
    assert str(out / "heldout" / "shard-000000.tar") in printed
    before = shard_bytes(out)
    assert cli_main(args + ["--seed", "1"]) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert shard_bytes(out) == before
    assert cli_main(args + ["--seed", "1", "--overwrite"]) == 0
    after = shard_bytes(out)
    assert after.keys() == before.keys() and after != before
    assert cli_main(["data", "synthetic", "--out", str(tmp_path / "x"), "--size", "15"]) == 2


def test_variation_restricts_the_free_attributes_and_captions_stay_true(tmp_path, capsys):
    out = tmp_path / "easy"
    assert cli_main(["data", "synthetic", "--out", str(out), "--num-train", "24", "--num-val", "4",
                     "--num-heldout", "0", "--size", "32", "--frames", "5", "--samples-per-shard", "32",
                     "--workers", "0", "--quiet", "--sizes", "large", "--backgrounds", "dark gray"]) == 0
    samples = read_split(out / "train")
    assert {s["json"]["size"] for s in samples} == {"large"}
    assert {s["json"]["background"] for s in samples} == {"dark gray"}
    assert {s["json"]["speed"] for s in samples} == set(SPEEDS)  # not restricted: both still drawn
    for s in samples:
        named = parse_caption(s["txt"])
        assert named.get("size", "large") == "large"
        assert named.get("background", "dark gray") == "dark gray"
        # The rendered object really is the large one: its bounding box is ~37.5% of the side.
        first = decode_all(s["mp4"])[0].astype(float)
        mask = np.abs(first - np.array(BACKGROUNDS["dark gray"])).sum(-1) > 90
        rows = np.flatnonzero(mask.any(axis=1))
        assert 0.3 * 32 <= rows[-1] - rows[0] + 1 <= 0.45 * 32
    info = json.loads((out / "attributes.json").read_text())
    assert info["variation"] == {"sizes": ["large"], "speeds": list(SPEEDS), "backgrounds": ["dark gray"]}


def test_bad_variation_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(DataError, match="unknown \\['huge'\\]"):
        Variation(sizes=("huge",))
    with pytest.raises(DataError, match="at least one value"):
        Variation(backgrounds=())
    with pytest.raises(DataError, match="repeats"):
        Variation(speeds=("slow", "slow"))
    assert cli_main(["data", "synthetic", "--out", str(tmp_path / "x"), "--backgrounds", "purple"]) != 0
    assert "purple" in capsys.readouterr().err
    assert not list(tmp_path.glob("x/*/shard-*.tar"))
