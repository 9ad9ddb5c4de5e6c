"""`maskvid demo` (the README's first command) runs end to end and shows what it promises."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    args = ["demo", "--out", str(out), "--data-dir", str(data), "--num-train", "48", "--num-val", "16", "--num-heldout", "8"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "demo.json").read_text())
    assert summary["train_batch"]["video"] == [8, 3, 17, 64, 64]
    assert summary["train_batch"]["dtype"] == "torch.float32"
    lo, hi = summary["train_batch"]["range"]
    assert -1.0 <= lo < 0.0 < hi <= 1.0
    assert summary["val_clips"] == 16
    # Clips survive encode, shard, decode, crop and normalisation with their content intact.
    assert summary["oracle_accuracy_on_val"]["joint"] >= 0.99
    sheet = Image.open(out / "preview-train.png")
    assert sheet.width > 64 * 9 and sheet.height > 64 * 8
    assert len(list((out / "clips").glob("*.mp4"))) == 8
    assert (data / "prompts_heldout.txt").read_text().strip()
    # A second run reuses the rendered data instead of rebuilding it.
    second = run_cli(*args)
    assert second.returncode == 0 and "reusing synthetic data" in second.stdout
