"""`maskvid demo` (the README's first command) runs the whole pipeline and shows what it promises."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image

from tests.conftest import run_cli

STEPS = ["data", "check", "tokenizer", "tokenize", "stage2", "generate", "score", "report"]


@pytest.mark.slow
def test_demo_quick_end_to_end_and_resume(tmp_path):
    out = tmp_path / "demo"
    first = run_cli("demo", "--out", str(out), "--quick", "--quiet", timeout=900)
    assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == STEPS
    assert set(summary["seconds"]) == set(STEPS)
    ckpts = summary["checkpoints"]
    for key in ("tokenizer", "stage2"):
        assert ckpts[key] and (out / ckpts[key]).is_file(), key
    metrics = summary["metrics"]
    assert isinstance(metrics["tokenizer_psnr"]["value"], float)
    assert isinstance(metrics["tokenizer_psnr_recon_clips"]["value"], float)
    # The data pipeline keeps the clips' content intact (the oracle reads every val clip back).
    assert metrics["data_oracle_accuracy"]["joint"] >= 0.99
    for split in ("seen", "heldout"):
        acc = metrics["caption_accuracy"][split]
        assert acc["n"] == 3 and 0.0 <= acc["joint"] <= 1.0
        # No I3D / CLIP weights here: recorded as null with the reason.
        assert metrics["fvd"][split]["value"] is None and "--i3d-path" in metrics["fvd"][split]["reason"]
        assert metrics["clipsim"][split]["value"] is None and "--clip-path" in metrics["clipsim"][split]["reason"]
    assert any("maskvid fit" in c and "tokenizer_demo.yaml" in c for c in summary["commands"]["tokenizer"])

    # The stage-2 checkpoint generates as is, from another working directory.
    gen = run_cli("generate", "--ckpt", ckpts["stage2"], "--prompt", "a red circle moving to the left",
                  "--steps", "2", "--out", str(tmp_path / "gen"), "--quiet")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert len(json.loads((tmp_path / "gen/index.json").read_text())) == 1
    assert len(list((tmp_path / "gen").glob("*.mp4"))) == 1

    # report.html is self-contained: every image is an embedded, decodable data: URI, and the
    # copy it names exists beside it.
    page = (out / "report.html").read_text()
    images = re.findall(r'<img[^>]*src="data:image/(\w+);base64,([^"]+)"[^>]*data-file="([^"]+)"', page)
    gifs = [f for _, _, f in images if f.endswith(".gif")]
    assert len([f for f in gifs if "generated_" in f]) == 6 and any("recon_" in f for f in gifs)
    assert any("curves_tokenizer" in f for _, _, f in images) and any("curves_stage2" in f for _, _, f in images)
    for kind, data, name in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
        assert (out / name).is_file(), name
    assert "src=\"file:" not in page and "maskvid generate --ckpt" in page

    # Rerun after an "interruption" of stage 2 (its marker gone): finished steps are skipped and
    # the fit resumes from its last checkpoint instead of starting over.
    (out / "steps/stage2.json").unlink()
    stamp = (out / "steps/tokenizer.json").stat().st_mtime
    again = run_cli("demo", "--out", str(out), "--quick", "--quiet", timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    for step in ("data", "check", "tokenizer", "tokenize"):
        assert f"{step}: done earlier, skipped" in again.stdout + again.stderr
    assert (out / "steps/tokenizer.json").stat().st_mtime == stamp
    assert re.search(r"--ckpt_path auto -> \S*mebt_demo/checkpoints/\S*\.ckpt", (out / "commands.log").read_text())
    assert json.loads((out / "summary.json").read_text())["steps_done"] == STEPS


def test_demo_bad_input_is_one_line(tmp_path):
    missing = run_cli("demo", "--out", str(tmp_path / "a"), "--train-shards", str(tmp_path / "nope"),
                      "--val-shards", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "--train-shards" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr

    alone = run_cli("demo", "--out", str(tmp_path / "b"), "--train-shards", str(tmp_path))
    assert alone.returncode == 2 and "go together" in alone.stderr

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "no prompt field"}\n')
    bad = run_cli("demo", "--out", str(tmp_path / "c"), "--prompts", str(prompts))
    assert bad.returncode == 2 and "prompts.jsonl:1" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (tmp_path / "c/steps").exists()  # nothing ran
