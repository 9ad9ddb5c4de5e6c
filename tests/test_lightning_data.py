"""The datamodule driven by Lightning through `maskvid fit|validate`, in real subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_bad_shards, run_cli

pytestmark = pytest.mark.slow


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def common(shards: str, root: Path) -> list[str]:
    return [
        "--model", "tests.tiny_model.TinyVideoModel",
        "--data.train_shards", shards, "--data.val_shards", shards,
        "--data.num_frames", "6", "--data.resolution", "16", "--data.batch_size", "3",
        "--data.num_workers", "2", "--data.batches_per_epoch", "4",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root),
    ]


def test_fit_resumes_mid_epoch_with_the_same_batches(clean_shards, tmp_path):
    ckpt = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=3",
            "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.dirpath", str(tmp_path / "ckpt")]
    full = run_cli("fit", *common(clean_shards, tmp_path / "a"), *ckpt, "--trainer.max_steps", "9",
                   env={"MASKVID_RECORD_DIR": str(tmp_path / "rec_full")})
    assert full.returncode == 0, full.stderr[-3000:]
    # step 3 is mid-epoch 0 (4 batches per epoch); step 6 is mid-epoch 1.
    for step, epoch in [(3, 0), (6, 1)]:
        path = tmp_path / "ckpt" / f"epoch={epoch}-step={step}.ckpt"
        assert path.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
        rec = tmp_path / f"rec_resume{step}"
        resumed = run_cli("fit", *common(clean_shards, tmp_path / f"r{step}"), "--trainer.max_steps", "9",
                          "--ckpt_path", str(path), env={"MASKVID_RECORD_DIR": str(rec)})
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        expected = records(tmp_path / "rec_full" / "train-rank0.jsonl")[step:]
        got = records(rec / "train-rank0.jsonl")
        assert [r["keys"] for r in got] == [r["keys"] for r in expected]
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], abs=1e-6)


def test_ddp_validate_sees_every_sample_once(clean_shards, tmp_path):
    """2 gloo processes x 3 workers = 6 readers over 5 shards: the sample-level split."""
    args = common(clean_shards, tmp_path / "v") + ["--trainer.devices", "2", "--trainer.strategy", "ddp",
                                                  "--data.num_workers", "3", "--trainer.limit_val_batches", "1.0"]
    out = run_cli("validate", *args, env={"MASKVID_RECORD_DIR": str(tmp_path / "rec")})
    assert out.returncode == 0, out.stderr[-3000:]
    keys = []
    for rank in (0, 1):
        rank_keys = [k for r in records(tmp_path / "rec" / f"val-rank{rank}.jsonl") for k in r["keys"]]
        assert rank_keys, f"rank {rank} saw nothing"
        keys += rank_keys
    assert sorted(keys) == [f"v{i:03d}" for i in range(40)]


def test_fit_on_bad_data_runs_and_logs_skips(tmp_path):
    """Corrupt, caption-less and json-broken samples are skipped, counted and logged."""
    shards = make_bad_shards(tmp_path / "shards")
    args = common(shards, tmp_path / "run") + [
        "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "logs"),
        "--trainer.log_every_n_steps", "1", "--trainer.max_steps", "6", "--data.num_workers", "0",
    ]
    out = run_cli("fit", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    # Only the bad samples are skipped (never a good clip), each with its shard named.
    import re

    named = re.findall(r"skipping bad sample key=(\S+) shard=(\S+?): ", out.stderr)
    bad = {"truncated", "garbage", "nocaption", "emptycaption", "badjson", "novideo"}
    assert named and {key for key, _ in named} <= bad and all(s.endswith(".tar") for _, s in named), named
    import csv

    rows = list(csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))))
    skipped = [float(r["data/skipped"]) for r in rows if r.get("data/skipped")]
    # A running count: it never goes down, and it counts no more skips than were logged.
    assert skipped == sorted(skipped) and 1 <= max(skipped) <= len(named), (skipped, named)
