"""`maskvid demo` (the README's first command) runs the whole pipeline and shows what it promises."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO, run_cli
from tests.test_metrics import fitted_clip, i3d_file  # noqa: F401 (fixtures)

STEPS = ["data", "check", "tokenizer", "tokenize", "stage2", "generate", "score", "report"]


def generated_videos(index_path: Path) -> tuple[list, list[str]]:
    """The decoded frames (uint8 [T, H, W, 3]) and prompts of a `maskvid generate` folder."""
    from maskvid.datamodules.video_io import decode_all

    index = json.loads(index_path.read_text())
    paths = [Path(item["path"]) if Path(item["path"]).is_file() else index_path.parent / Path(item["path"]).name
             for item in index]
    return [decode_all(path.read_bytes()) for path in paths], [item["prompt"] for item in index]


def oracle_on_generated(index_path: Path) -> dict:
    """The oracle's caption accuracy of generated videos against their prompts, rounded as
    summary.json records it."""
    from maskvid.datamodules.synthetic import parse_caption
    from maskvid.metrics.oracle import caption_accuracy

    videos, prompts = generated_videos(index_path)
    result = caption_accuracy(videos, [parse_caption(p) for p in prompts])
    return {k: (v if k == "n" else round(v, 4)) for k, v in result.items()}


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
    # The ceiling stage 2 is scored against: the oracle on the 4-step tokenizer's reconstructions.
    ceiling = metrics["reconstruction_oracle_accuracy"]
    assert ceiling["n"] == 8 and 0.0 <= ceiling["joint"] <= ceiling["colour"] <= 1.0
    for split in ("seen", "heldout"):
        acc = metrics["caption_accuracy"][split]
        # What the oracle reads from the mp4s the demo generated, for the prompts they were made for.
        assert acc == {**oracle_on_generated(out / f"generated/{split}/index.json"), "unparsed_prompts": 0}, acc
        assert acc["n"] == 3
        # No I3D / CLIP weights here: recorded as null with the reason.
        assert metrics["fvd"][split]["value"] is None and "--i3d-path" in metrics["fvd"][split]["reason"]
        assert metrics["clipsim"][split]["value"] is None and "--clip-path" in metrics["clipsim"][split]["reason"]
    assert any("maskvid fit" in c and "tokenizer_demo.yaml" in c for c in summary["commands"]["tokenizer"])
    # The data step rendered the demo's variation of the synthetic data, and says so.
    from maskvid.launch.demo_pipeline import DEMO_VARIATION

    assert summary["data"]["variation"] == DEMO_VARIATION.as_dict()
    from maskvid.precision import trainer_precision

    assert summary["precision"] == {"tokenizer": "32-true", "stage2": trainer_precision("cpu")}
    # Host CPU tuning is opt-in: by default the commands run on the malloc this process has.
    from maskvid.launch.cpu_tuning import preloaded

    assert summary["cpu_tuning"] is False and summary["allocator"] == preloaded(os.environ)
    assert summary["trainer_config"] == "configs/trainer/cpu.yaml"
    # Where it ran and how far each fit got: the steps its last checkpoint holds, and why it stopped.
    from maskvid.launch.run_record import machine

    assert summary["machine"]["cpu"] == machine()["cpu"] and summary["machine"]["cores"] == os.cpu_count()
    import torch

    for stage in ("tokenizer", "stage2"):
        fit = summary["fits"][stage]
        held = torch.load(out / ckpts[stage], map_location="cpu", weights_only=True)["global_step"]
        assert fit["steps"] == held and fit["max_steps"] is not None, fit
        assert fit["stop"] == "reached max_steps" if held >= fit["max_steps"] else "time budget" in fit["stop"], fit
    assert "LD_PRELOAD=" not in (out / "commands.log").read_text()
    assert json.loads((out / "data/attributes.json").read_text())["variation"] == DEMO_VARIATION.as_dict()

    # The stage-2 checkpoint generates as is, from another working directory.
    gen = run_cli("generate", "--ckpt", ckpts["stage2"], "--prompt", "a red circle moving to the left",
                  "--steps", "2", "--out", str(tmp_path / "gen"), "--quiet")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert len(json.loads((tmp_path / "gen/index.json").read_text())) == 1
    assert len(list((tmp_path / "gen").glob("*.mp4"))) == 1
    # The stage-2 step also exported it (config.json + model.safetensors) for the Python API.
    from maskvid import TextToVideo

    videos = TextToVideo.from_pretrained(out / "export").generate(["a red circle moving to the left"], seed=0, steps=2)
    assert str(videos.dtype) == "torch.uint8" and videos.shape[0] == 1 and videos.shape[-1] == 3

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
    # Other data options on the same --out would silently be ignored (the data step is done): refused.
    other = run_cli("demo", "--out", str(out), "--quick", "--quiet", "--sizes", "small")
    assert other.returncode == 2 and "was rendered with" in other.stderr, other.stderr


@pytest.mark.slow
def test_demo_quick_on_two_processes_with_maskgit(tmp_path):
    """--devices 2: both fits run data parallel (DDP over gloo on CPU) and the result generates."""
    out = tmp_path / "demo2"
    run = run_cli("demo", "--out", str(out), "--quick", "--devices", "2", "--backbone", "maskgit", "--quiet",
                  "--backgrounds", "navy", "dark gray", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == STEPS
    log = (out / "commands.log").read_text()
    assert log.count("--trainer.devices 2") == 2 and "configs/trainer/ddp.yaml" in log
    assert "maskgit_demo.yaml" in log
    # On a CPU stage 2 runs in bf16 autocast only where it is native (AMX/AVX512-BF16), else in
    # fp32; the tokenizer always in fp32.
    from maskvid.precision import trainer_precision

    # cpu.yaml (no CUDA here) then ddp.yaml, then the stage's precision over both.
    layered = "configs/trainer/cpu.yaml --config {repo}/configs/trainer/ddp.yaml --trainer.precision".format(
        repo=str(REPO))
    assert log.count(layered) == 2, log[-3000:]
    assert log.count(f"{layered} 32-true") == (1 if trainer_precision("cpu") == "bf16-mixed" else 2)
    assert log.count(f"{layered} {trainer_precision('cpu')}") >= 1
    # Both ranks trained: DDP wrote one checkpoint, and it carries the maskgit backbone.
    ckpt = out / summary["checkpoints"]["stage2"]
    assert ckpt.is_file() and "maskgit_demo" in str(ckpt)
    assert summary["metrics"]["caption_accuracy"]["seen"]["n"] == 3
    for split in ("seen", "heldout"):
        assert summary["metrics"]["caption_accuracy"][split] == {
            **oracle_on_generated(out / f"generated/{split}/index.json"), "unparsed_prompts": 0}
    # --backgrounds reached the data step (a name with a space included).
    assert summary["data"]["variation"]["backgrounds"] == ["navy", "dark gray"]
    assert json.loads((out / "data/attributes.json").read_text())["variation"]["backgrounds"] == ["navy", "dark gray"]


@pytest.mark.slow
def test_demo_quick_with_i3d_and_clip_scores_fvd_and_clipsim(tmp_path, i3d_file, fitted_clip):
    """--i3d-path / --clip-path: real statistics are cached from the val shards, stage 2 validates
    with them, and both prompt sets get a finite FVD and CLIPSIM in summary.json and the report."""
    out = tmp_path / "demo"
    run = run_cli("demo", "--out", str(out), "--quick", "--quiet", "--i3d-path", str(i3d_file),
                  "--clip-path", str(fitted_clip), timeout=900)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == STEPS
    log = (out / "commands.log").read_text()
    assert "maskvid eval real-stats" in log and "--model.init_args.i3d_path" in log
    import torch

    from maskvid.datamodules.pixels import to_model
    from maskvid.metrics.clipsim import CLIPSimilarity
    from maskvid.metrics.fvd import FrechetVideoDistance
    from maskvid.metrics.i3d import load_i3d

    extract = load_i3d(i3d_file)
    for split in ("seen", "heldout"):
        fvd, clipsim = summary["metrics"]["fvd"][split], summary["metrics"]["clipsim"][split]
        assert fvd["num_fake"] == 3 and clipsim["num_videos"] == 3, (fvd, clipsim)
        # Both figures recomputed here from the mp4s the demo generated, with the scorer classes:
        # FVD against the real statistics it cached, CLIPSIM against each video's prompt.
        videos, prompts = generated_videos(out / f"generated/{split}/index.json")
        fake = FrechetVideoDistance(extract, real_stats=str(out / "eval/real_stats.pt"))
        similarity = CLIPSimilarity(str(fitted_clip))
        for frames, prompt in zip(videos, prompts):
            video = to_model(torch.from_numpy(frames)[None])
            fake.update(video, real=False)
            similarity.update(video, [prompt])
        assert fvd["fvd"] == pytest.approx(float(fake.compute()["fvd"]), rel=1e-4, abs=1e-6), fvd
        assert clipsim["clipsim"] == pytest.approx(float(similarity.compute()), rel=1e-4, abs=1e-6), clipsim
    page = (out / "report.html").read_text()
    assert "fvd — seen" in page and "clipsim — heldout" in page


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

    huge = run_cli("demo", "--out", str(tmp_path / "d"), "--sizes", "huge")
    assert huge.returncode == 2 and "unknown ['huge']" in huge.stderr
    assert len(huge.stderr.strip().splitlines()) == 1, huge.stderr
    mine = run_cli("demo", "--out", str(tmp_path / "e"), "--train-shards", str(tmp_path), "--val-shards",
                   str(tmp_path), "--sizes", "large")
    assert mine.returncode == 2 and "--train-shards" in mine.stderr
    assert not (tmp_path / "d/steps").exists() and not (tmp_path / "e/steps").exists()


def test_step_caps_scale_with_the_budget(tmp_path):
    from maskvid.configs import CONFIG_DIR
    from maskvid.launch.demo_pipeline import REFERENCE_MINUTES, config_max_steps, scaled_steps
    from maskvid.datamodules.errors import DataError

    for name in ("tokenizer_demo", "maskgit_demo", "mebt_demo"):
        config = CONFIG_DIR / f"experiment/{name}.yaml"
        full = config_max_steps(config)
        assert scaled_steps(config, REFERENCE_MINUTES) == full
        assert scaled_steps(config, REFERENCE_MINUTES / 2) == round(full / 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_time: 00:00:10:00\n")
    with pytest.raises(DataError, match="max_steps"):
        config_max_steps(bad)


def test_fits_run_in_bf16_where_the_device_has_it_natively(monkeypatch, tmp_path):
    """The fits layer trainer/gpu.yaml where CUDA is available, else cpu.yaml, after the
    experiment config, and the stage's precision over it."""
    import maskvid.launch.demo_pipeline as demo
    import maskvid.precision as precision

    pipeline = demo.DemoPipeline(tmp_path / "run", demo.QUICK, minutes=2.0)
    for gpu, native, trainer, expected in ((False, True, "cpu", "bf16-mixed"), (False, False, "cpu", "32-true"),
                                           (True, True, "gpu", "bf16-mixed")):
        monkeypatch.setattr(demo, "_cuda_available", lambda gpu=gpu: gpu)
        monkeypatch.setattr(precision, "native_bf16", lambda device_type, native=native: native)
        args = pipeline._trainer_args(4, 2.0, None)
        assert args[:2] == ["--config", str(REPO / f"configs/trainer/{trainer}.yaml")]
        assert "--trainer.accelerator" not in args  # the trainer file's
        assert args[args.index("--trainer.precision") + 1] == expected
        tokenizer = pipeline._trainer_args(4, 2.0, None, "tokenizer")
        assert tokenizer[tokenizer.index("--trainer.precision") + 1] == (expected if gpu else "32-true")


def test_the_fit_commands_put_the_trainer_file_after_the_experiment(monkeypatch, tmp_path):
    """Layered after the experiment (as the README's commands do): the trainer file only picks the
    hardware, so the experiment's steps, validation, output directory and callbacks stand; on a
    CUDA machine gpu.yaml adds TF32."""
    import maskvid.launch.demo_pipeline as demo

    commands = []
    monkeypatch.setattr(demo.DemoPipeline, "maskvid", lambda self, *args: commands.append(list(args)))
    out = tmp_path / "run"
    (out / "runs/tokenizer_demo/checkpoints").mkdir(parents=True)
    (out / "runs/tokenizer_demo/checkpoints/last.ckpt").write_bytes(b"")
    for cuda in (False, True):
        monkeypatch.setattr(demo, "_cuda_available", lambda cuda=cuda: cuda)
        commands.clear()
        demo.DemoPipeline(out, demo.FULL, minutes=40.0).step_tokenizer()
        (fit,) = commands
        configs = [fit[i + 1] for i, a in enumerate(fit) if a == "--config"]
        assert configs == [str(REPO / "configs/experiment/tokenizer_demo.yaml"),
                           str(REPO / f"configs/trainer/{'gpu' if cuda else 'cpu'}.yaml")]
        assert fit[fit.index("--trainer.max_steps") + 1] == "3100"
