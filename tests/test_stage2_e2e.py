"""Stage 2 end to end on CPU, through the real commands: `maskvid fit` (tokenizer) ->
`maskvid data tokenize` -> `maskvid fit` (stage 2 on token shards, and on video shards) ->
`maskvid generate` (prompts and story mode) -> decodable mp4s of the asked length."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from maskvid.datamodules.video_io import decode_all
from tests.conftest import REPO, run_cli
from tests.stage2_fixtures import tiny_t5_dir
from tests.test_tokenizer_module import MODEL as TOKENIZER_MODEL
from tests.test_tokenizer_module import fit_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from maskvid.datamodules.synthetic import build_synthetic

    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    build_synthetic(data, num_train=16, num_val=4, num_heldout=0, size=32, frames=9,
                    samples_per_shard=8, workers=1, progress=False)
    t5 = tiny_t5_dir(root / "t5")
    tok_cfg = root / "tokenizer.yaml"
    tok_cfg.write_text(yaml.safe_dump(TOKENIZER_MODEL))
    out = run_cli("fit", *fit_args(data, root / "tok_run", tok_cfg), "--trainer.max_steps", "3",
                  "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1")
    assert out.returncode == 0, out.stderr[-4000:]
    (tok_ckpt,) = (root / "tok_run").rglob("*.ckpt")
    return {"root": root, "data": data, "t5": t5, "tok": tok_ckpt}


def stage2_config(pipeline, samples: str) -> Path:
    config = {
        "model": {
            "class_path": "maskvid.lightning_modules.masked_video_module.MaskedVideoModule",
            "init_args": {
                "backbone": {"class_path": "maskvid.models.maskgit.MaskGITBackbone",
                             "init_args": {"vocab_size": 64, "grid": [5, 4, 4], "dim": 32, "depth": 2, "heads": 2,
                                           "text_dim": 32}},
                "tokenizer_path": str(pipeline["tok"]), "text_encoder": str(pipeline["t5"]),
                "text_max_length": 8, "warmup_steps": 1, "sample_steps": 4, "num_val_videos": 2,
            },
        },
        "data": {"samples": samples},
    }
    path = pipeline["root"] / f"stage2_{samples}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class RecordTrainedOn(Callback):
    """Writes trained_on.pt in the run directory: the backbone's parameters as training starts, and
    per training step the batch's videos and captions and the token ids the step trained on."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.record = {"initial": {k: v.detach().clone() for k, v in pl_module.backbone.named_parameters()},
                       "videos": [], "tokens": [], "captions": []}
        batch_tokens = pl_module.batch_tokens

        def recorded(batch):
            out = batch_tokens(batch)
            if pl_module.training:
                self.record["videos"].append(batch["video"].detach().clone())
                self.record["tokens"].append(out[0].detach().clone())
                self.record["captions"] += list(batch["caption"])
            return out

        pl_module.batch_tokens = recorded

    def on_train_end(self, trainer, pl_module) -> None:
        del pl_module.batch_tokens
        torch.save(self.record, Path(trainer.default_root_dir) / "trained_on.pt")


def test_tokenize_train_generate(pipeline):
    root, data = pipeline["root"], pipeline["data"]
    for split in ("train", "val"):
        out = run_cli("data", "tokenize", "--tokenizer", str(pipeline["tok"]), "--shards", str(data / split),
                      "--out", str(root / "tokens" / split), "--text-encoder", str(pipeline["t5"]),
                      "--max-length", "8", "--num-frames", "9", "--resolution", "32", "--batch-size", "4",
                      "--workers", "0", "--quiet")
        assert out.returncode == 0, out.stderr[-3000:]
    assert "wrote 4 token samples" in out.stdout

    # Token shards hold exactly what the tokenizer gives for the same clips.
    from maskvid.datamodules.video_datamodule import VideoDataModule
    from maskvid.video_tokenizer import load_tokenizer

    tokens_dm = VideoDataModule(val_shards=str(root / "tokens/val"), samples="tokens", batch_size=4, num_workers=0)
    video_dm = VideoDataModule(val_shards=str(data / "val"), num_frames=9, resolution=32, batch_size=4, num_workers=0)
    tok_batch, vid_batch = next(iter(tokens_dm.val_dataloader())), next(iter(video_dm.val_dataloader()))
    assert tok_batch["caption"] == vid_batch["caption"]
    assert torch.equal(tok_batch["tokens"], load_tokenizer(pipeline["tok"]).encode(vid_batch["video"]))
    assert tok_batch["text_emb"].dtype == torch.float16 and tok_batch["text_emb"].shape == (4, 8, 32)

    run = root / "stage2_run"
    args = ["--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(stage2_config(pipeline, "tokens")),
            "--data.train_shards", str(root / "tokens/train"), "--data.val_shards", str(root / "tokens/val"),
            "--data.num_frames", "9", "--data.resolution", "32", "--data.batch_size", "4", "--data.num_workers", "0",
            "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(run),
            "--trainer.enable_progress_bar", "false"]
    out = run_cli("fit", *args)
    assert out.returncode == 0, out.stderr[-4000:]
    (ckpt,) = run.rglob("*.ckpt")
    media = sorted(p.name for p in run.rglob("media/*"))
    assert "val_samples_step0000004.png" in media and "val_samples_step0000004.mp4" in media

    out_dir = root / "generated"
    gen = run_cli("generate", "--ckpt", str(ckpt), "--prompt", "a red circle moving left", "--prompt",
                  "a blue square moving up", "--num-frames", "9", "--steps", "4", "--seed", "3",
                  "--out", str(out_dir), "--quiet")
    assert gen.returncode == 0, gen.stderr[-3000:]
    index = json.loads((out_dir / "index.json").read_text())
    assert [item["prompt"] for item in index] == ["a red circle moving left", "a blue square moving up"]
    first = decode_all(Path(index[0]["path"]).read_bytes())
    assert first.shape == (9, 32, 32, 3)
    # Same seed, same videos (byte for byte); another seed, other videos.
    for seed, same in (("3", True), ("4", False)):
        again = run_cli("generate", "--ckpt", str(ckpt), "--prompt", "a red circle moving left", "--prompt",
                        "a blue square moving up", "--num-frames", "9", "--steps", "4", "--seed", seed,
                        "--out", str(root / f"seed{seed}"), "--quiet")
        assert again.returncode == 0, again.stderr[-3000:]
        paths = [Path(i["path"]) for i in json.loads((root / f"seed{seed}/index.json").read_text())]
        assert (paths[0].read_bytes() == Path(index[0]["path"]).read_bytes()) is same

    # Sampling precision: fp32 and bf16 autocast both generate (auto picks bf16 where it is native).
    for precision in ("32", "bf16"):
        out = run_cli("generate", "--ckpt", str(ckpt), "--prompt", "a red circle moving left", "--num-frames", "9",
                      "--steps", "3", "--precision", precision, "--out", str(root / f"p{precision}"), "--quiet")
        assert out.returncode == 0, out.stderr[-3000:]
        (item,) = json.loads((root / f"p{precision}/index.json").read_text())
        assert decode_all(Path(item["path"]).read_bytes()).shape == (9, 32, 32, 3)
    bad = run_cli("generate", "--ckpt", str(ckpt), "--prompt", "x", "--precision", "fp8", "--out", str(root / "bad"))
    assert bad.returncode == 2 and "--precision" in bad.stderr

    # Story mode: two 5-frame scenes (3 latent frames each), the second primed with 2 of the first.
    story = root / "story.jsonl"
    story.write_text('{"prompt": "a red circle moving left", "num_frames": 5}\n'
                     '{"prompt": "a red circle moving up", "num_frames": 5}\n')
    out = run_cli("generate", "--ckpt", str(ckpt), "--story", str(story), "--steps", "3", "--top-k", "5",
                  "--refine-steps", "2", "--refine-ratio", "0.5", "--out", str(root / "story"), "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    (item,) = json.loads((root / "story/index.json").read_text())
    assert decode_all(Path(item["path"]).read_bytes()).shape[0] == 1 + (3 + 1 - 1) * 2

    # A tokenizer checkpoint cannot generate: a clear one-line error.
    bad = run_cli("generate", "--ckpt", str(pipeline["tok"]), "--prompt", "x", "--out", str(root / "bad"))
    assert bad.returncode == 2 and "not a stage-2 checkpoint" in bad.stderr
    bad = run_cli("generate", "--ckpt", str(ckpt), "--prompt", "x", "--refine-ratio", "0", "--out", str(root / "bad"))
    assert bad.returncode == 2 and "refine_ratio must be in (0, 1]" in bad.stderr
    bad = run_cli("generate", "--ckpt", str(ckpt), "--prompt", "x", "--temperature", "0", "--out", str(root / "bad"))
    assert bad.returncode == 2 and "temperature must be > 0" in bad.stderr


def test_stage2_trains_on_video_shards_with_on_the_fly_tokens(pipeline):
    root, data = pipeline["root"], pipeline["data"]
    run = root / "stage2_video"
    out = run_cli("fit", "--config", str(REPO / "configs/trainer/cpu.yaml"),
                  "--config", str(stage2_config(pipeline, "video")),
                  "--data.train_shards", str(data / "train"), "--data.val_shards", str(data / "val"),
                  "--data.num_frames", "9", "--data.resolution", "32", "--data.batch_size", "2",
                  "--data.num_workers", "0", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                  "--trainer.val_check_interval", "2",
                  "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
                  "--trainer.log_every_n_steps", "1", "--trainer.callbacks+=tests.test_stage2_e2e.RecordTrainedOn")
    assert out.returncode == 0, out.stderr[-4000:]
    (ckpt,) = run.rglob("*.ckpt")
    # It trained on the tokenizer's codes of the clips it read: the token ids the training steps
    # used are what the tokenizer checkpoint gives for those videos, and the captions are train ones.
    from maskvid.video_tokenizer import load_tokenizer

    record = torch.load(run / "trained_on.pt", weights_only=True)
    assert len(record["videos"]) == 2 and record["videos"][0].shape == (2, 3, 9, 32, 32)
    tokenizer = load_tokenizer(pipeline["tok"])
    for video, tokens in zip(record["videos"], record["tokens"]):
        assert tokens.shape == (2, 5, 4, 4) and torch.equal(tokens, tokenizer.encode(video))
    import tarfile

    train_captions = []
    for shard in (data / "train").glob("*.tar"):
        with tarfile.open(shard) as tar:
            train_captions += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
    assert len(train_captions) == 16 and set(record["captions"]) <= set(train_captions), record["captions"]
    # Both steps changed the backbone: the checkpoint's weights are not the ones training started from.
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 2
    moved = [k for k, v in record["initial"].items() if not torch.equal(v, state["state_dict"][f"backbone.{k}"])]
    assert len(moved) > len(record["initial"]) // 2, moved
