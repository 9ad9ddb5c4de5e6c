"""The Python API (maskvid.TextToVideo, maskvid.VideoTokenizer): docs/api.md's example runs, the
safetensors directory round-trips exactly, checkpoints and their exports agree, errors are clear."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskvid import PretrainedError, TextToVideo, VideoTokenizer
from maskvid import pretrained
from maskvid.launch.cmd_ckpt_export import export
from tests.conftest import REPO, run_cli
from tests.stage2_fixtures import BACKBONES, tiny_t5_dir, tiny_tokenizer, write_tokenizer_checkpoint

PROMPTS = ["a red circle moving left", "a blue square moving up"]


def _perturb(module: torch.nn.Module) -> None:
    # A fresh EMA equals the trained weights; moving it shows which copy a loader took.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    """A stage-2 (MeBT, EMA) and a stage-1 (GAN tokenizer, EMA) checkpoint as `maskvid fit` writes
    them (state_dict plus the modules' own records), laid out like the demo's runs/demo."""
    from maskvid.lightning_modules.masked_video_module import MaskedVideoModule
    from maskvid.models.config import instantiate
    from tests.test_tokenizer_module import small_module

    root = tmp_path_factory.mktemp("api")
    t5 = tiny_t5_dir(root / "t5")
    tok = write_tokenizer_checkpoint(root / "tok.ckpt", tiny_tokenizer())
    torch.manual_seed(0)
    stage2 = MaskedVideoModule(instantiate(BACKBONES["mebt"]), str(tok), text_encoder=str(t5), text_max_length=8,
                               ema_decay=0.99, sample_steps=3)
    _perturb(stage2.backbone_ema.module)
    stage2.grid = (5, 4, 4)  # set from the data in setup(): the training clip's token grid
    stage1 = small_module(ema_decay=0.99)
    _perturb(stage1.tokenizer_ema.module)
    paths = {}
    for name, module in (("mebt_demo", stage2), ("tokenizer_demo", stage1)):
        checkpoint = {"state_dict": module.state_dict(), "global_step": 7, "optimizer_states": []}
        module.on_save_checkpoint(checkpoint)  # the hook Lightning calls when it writes a checkpoint
        paths[name] = root / f"runs/{name}/checkpoints/last.ckpt"
        paths[name].parent.mkdir(parents=True)
        torch.save(checkpoint, paths[name])
    return {"root": root, "stage2": paths["mebt_demo"], "stage1": paths["tokenizer_demo"],
            "stage2_module": stage2, "stage1_module": stage1, "tok_ckpt": tok}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_docs_api_example_runs(ckpts, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs/api.md").read_text(), re.S)
    assert blocks, "docs/api.md has no python example"
    monkeypatch.chdir(ckpts["root"])
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)
    assert (ckpts["root"] / "my_model/model.safetensors").is_file()
    assert namespace["video"].dtype == torch.uint8


def test_save_pretrained_round_trips_exactly(ckpts, tmp_path):
    model = TextToVideo.from_checkpoint(ckpts["stage2"])
    out = model.save_pretrained(tmp_path / "model")
    again = TextToVideo.from_pretrained(out)
    assert_same_weights(model.backbone, again.backbone)
    assert_same_weights(model.tokenizer.network, again.tokenizer.network)
    assert again.defaults == model.defaults and again.defaults.steps == 3
    assert again.grid == (5, 4, 4) and again.text_encoder_args == model.text_encoder_args
    videos = model.generate(PROMPTS, seed=1)
    assert videos.dtype == torch.uint8 and videos.shape == (2, 9, 32, 32, 3) and videos.device.type == "cpu"
    assert torch.equal(videos, again.generate(PROMPTS, seed=1))
    assert not torch.equal(videos, again.generate(PROMPTS, seed=2))
    # A video depends on its seed and index, not on the prompts batched with it.
    assert torch.equal(videos[:1], again.generate(PROMPTS[:1], seed=1))
    # Saving the loaded model again gives the same bytes.
    assert (again.save_pretrained(tmp_path / "again") / "model.safetensors").read_bytes() == \
        (out / "model.safetensors").read_bytes()


def test_checkpoint_and_its_export_are_the_same_model_with_the_ema_weights(ckpts, tmp_path):
    out, kind = export(ckpts["stage2"], tmp_path / "t2v")
    assert kind == "maskvid.text_to_video"
    direct, exported = TextToVideo.from_checkpoint(ckpts["stage2"]), TextToVideo.from_pretrained(out)
    assert_same_weights(direct.backbone, exported.backbone)
    assert_same_weights(direct.tokenizer.network, exported.tokenizer.network)
    module = ckpts["stage2_module"]
    assert_same_weights(exported.backbone, module.backbone_ema.module)  # the EMA, not the raw weights
    assert not torch.equal(exported.backbone.token_emb.weight, module.backbone.token_emb.weight)
    assert json.loads((out / "config.json").read_text())["source"] == {
        "checkpoint": str(ckpts["stage2"]), "global_step": 7, "ema": True}

    out, kind = export(ckpts["stage1"], tmp_path / "tok")
    assert kind == "maskvid.video_tokenizer"
    tok = VideoTokenizer.from_pretrained(out)
    assert_same_weights(tok.network, VideoTokenizer.from_checkpoint(ckpts["stage1"]).network)
    assert_same_weights(tok.network, ckpts["stage1_module"].tokenizer_ema.module)
    raw = VideoTokenizer.from_checkpoint(ckpts["stage1"], use_ema=False)
    assert_same_weights(raw.network, ckpts["stage1_module"].tokenizer)
    # A stage-2 checkpoint or directory carries its tokenizer.
    assert_same_weights(VideoTokenizer.from_checkpoint(ckpts["stage2"]).network, direct.tokenizer.network)
    assert_same_weights(VideoTokenizer.from_pretrained(tmp_path / "t2v").network, direct.tokenizer.network)


def test_the_directory_is_plain_json_and_safetensors(ckpts, tmp_path):
    from safetensors.torch import load_file

    out, _ = export(ckpts["stage2"], tmp_path / "t2v")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "maskvid.text_to_video" and config["version"] == 1
    assert config["backbone"]["class_path"] == "maskvid.models.mebt.MeBT"
    assert config["tokenizer"]["class_path"] == "maskvid.models.cvivit.CViViT"
    assert config["text_encoder"]["max_length"] == 8 and config["grid"] == [5, 4, 4]
    weights = load_file(out / "model.safetensors")
    module = ckpts["stage2_module"]
    expected = {f"backbone.{k}" for k in module.backbone.state_dict()} | {f"tokenizer.{k}" for k in module.tokenizer.state_dict()}
    assert set(weights) == expected
    assert all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())


def test_tied_and_overlapping_tensors_are_saved(tmp_path):
    base = torch.arange(12.0)
    tensors = {"a.w": base, "a.tied": base, "a.view": base[4:8], "a.t": base.view(3, 4).t()}
    out = pretrained.write_directory(tmp_path / "m", {"format": pretrained.VIDEO_TOKENIZER}, tensors)
    loaded = pretrained.read_weights(out)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_python_and_cli_give_the_same_video(ckpts, tmp_path):
    from maskvid.datamodules.video_io import encode_mp4

    exported = tmp_path / "t2v"
    out = run_cli("ckpt", "export", str(ckpts["stage2"]), "--out", str(exported))
    assert out.returncode == 0 and "maskvid.text_to_video" in out.stdout, out.stderr[-3000:]
    gen = run_cli("generate", "--ckpt", str(exported), *[a for p in PROMPTS for a in ("--prompt", p)], "--steps", "2",
                  "--seed", "5", "--precision", "32", "--out", str(tmp_path / "gen"), "--quiet")
    assert gen.returncode == 0, gen.stderr[-3000:]
    files = [Path(i["path"]) for i in json.loads((tmp_path / "gen/index.json").read_text())]
    videos = TextToVideo.from_pretrained(exported).generate(PROMPTS, seed=5, steps=2, precision="32")
    assert len(files) == len(videos) == len(PROMPTS)  # zip would pass on nothing
    for file, video in zip(files, videos):
        assert file.read_bytes() == encode_mp4(list(video.numpy()), fps=8.0, reproducible=True)[0]


def test_video_tokenizer_encodes_uint8_and_model_pixels_alike(ckpts):
    from maskvid.datamodules.pixels import to_model

    tok = VideoTokenizer.from_checkpoint(ckpts["stage1"])
    video = torch.randint(0, 256, (2, 9, 32, 32, 3), dtype=torch.uint8)
    ids = tok.encode(video)
    assert ids.dtype == torch.int64 and ids.shape == (2, 5, 4, 4) and int(ids.max()) < tok.vocab_size
    assert torch.equal(ids, tok.encode(to_model(video)))
    recon = tok.decode(ids)
    assert recon.dtype == torch.uint8 and recon.shape == video.shape
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
        tok.encode(video[0])
    with pytest.raises(ValueError, match="1 \\+ k"):
        tok.encode(video[:, :8])
    with pytest.raises(TypeError, match="uint8 or float"):
        tok.encode(video.int())


def test_clear_errors(ckpts, tmp_path):
    t2v_dir, _ = export(ckpts["stage2"], tmp_path / "t2v")
    tok_dir, _ = export(ckpts["stage1"], tmp_path / "tok")
    with pytest.raises(PretrainedError, match="not found"):
        TextToVideo.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedError, match="has no config.json"):
        TextToVideo.from_pretrained(tmp_path / "empty")
    with pytest.raises(PretrainedError, match="is a file.*from_checkpoint"):
        TextToVideo.from_pretrained(ckpts["stage2"])
    with pytest.raises(PretrainedError, match="holds format 'maskvid.video_tokenizer', not maskvid.text_to_video; "
                                              "load it with VideoTokenizer.from_pretrained"):
        TextToVideo.from_pretrained(tok_dir)
    with pytest.raises(ValueError, match="not a stage-2 checkpoint.*VideoTokenizer.from_checkpoint"):
        TextToVideo.from_checkpoint(ckpts["stage1"])
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="has no tokenizer"):
        VideoTokenizer.from_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        VideoTokenizer.from_checkpoint(ckpts["tok_ckpt"].parent / "t5/config.json")
    with pytest.raises(ValueError, match="neither a DCP"):
        TextToVideo.load(tmp_path / "empty")

    def broken(name: str, edit) -> Path:
        import shutil

        copy = shutil.copytree(t2v_dir, tmp_path / name)
        edit(copy)
        return copy

    def set_config(**changes):
        def edit(d: Path) -> None:
            config = json.loads((d / "config.json").read_text())
            for key, value in changes.items():
                target, *path = key.split(".")
                node = config
                for part in [target, *path][:-1]:
                    node = node[part]
                node[([target, *path])[-1]] = value
            (d / "config.json").write_text(json.dumps(config))
        return edit

    with pytest.raises(PretrainedError, match="version 99 is not supported"):
        TextToVideo.from_pretrained(broken("v99", set_config(version=99)))
    with pytest.raises(PretrainedError, match="holds format 'other', not maskvid.text_to_video$"):
        TextToVideo.from_pretrained(broken("fmt", set_config(format="other")))
    with pytest.raises(PretrainedError, match="not valid JSON"):
        TextToVideo.from_pretrained(broken("json", lambda d: (d / "config.json").write_text("{")))
    with pytest.raises(PretrainedError, match="has no model.safetensors"):
        TextToVideo.from_pretrained(broken("noweights", lambda d: (d / "model.safetensors").unlink()))
    with pytest.raises(PretrainedError, match="cannot read"):
        TextToVideo.from_pretrained(broken("trunc", lambda d: (d / "model.safetensors").write_bytes(b"\x10")))
    with pytest.raises(PretrainedError, match="weights under 'backbone.' do not match the config"):
        TextToVideo.from_pretrained(broken("dim", set_config(**{"backbone.init_args.dim": 48})))
    with pytest.raises(PretrainedError, match="refusing to build 'os.system'"):
        TextToVideo.from_pretrained(broken("evil", set_config(**{"backbone.class_path": "os.system"})))
    with pytest.raises(PretrainedError, match="exists and is not an exported model directory"):
        TextToVideo.from_pretrained(t2v_dir).save_pretrained(ckpts["stage2"].parent)

    model = TextToVideo.from_pretrained(t2v_dir)
    with pytest.raises(TypeError, match="unknown sampling option.*'stpes'"):
        model.generate(PROMPTS, stpes=3)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(PROMPTS, temperature=0)
    with pytest.raises(ValueError, match="1 \\+ k"):
        model.generate(PROMPTS, num_frames=8)


def test_import_maskvid_stays_light():
    code = ("import sys, maskvid; assert 'torch' not in sys.modules, 'import maskvid pulled in torch'; "
            "assert maskvid.TextToVideo.__name__ == 'TextToVideo' and 'TextToVideo' in dir(maskvid)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]


def test_stage2_takes_an_exported_tokenizer_directory_as_tokenizer_path(ckpts, tmp_path):
    from maskvid.lightning_modules.masked_video_module import MaskedVideoModule
    from maskvid.models.config import instantiate
    from maskvid.models.tokenizer_checkpoint import TokenizerCheckpointError
    from maskvid.video_tokenizer import load_tokenizer

    tok_dir, _ = export(ckpts["stage1"], tmp_path / "tok")
    t5 = ckpts["root"] / "t5"
    module = MaskedVideoModule(instantiate(BACKBONES["mebt"]), str(tok_dir), text_encoder=str(t5), text_max_length=8)
    assert_same_weights(module.tokenizer, ckpts["stage1_module"].tokenizer_ema.module)
    assert_same_weights(load_tokenizer(tok_dir), load_tokenizer(ckpts["stage1"]))
    (tmp_path / "t2v_as_tok").mkdir()
    with pytest.raises(TokenizerCheckpointError, match="neither a DCP"):
        load_tokenizer(tmp_path / "t2v_as_tok")
    with pytest.raises(TokenizerCheckpointError, match="holds format 'other'"):
        (tok_dir / "config.json").write_text(json.dumps({"format": "other", "version": 1}))
        load_tokenizer(tok_dir)


@pytest.mark.slow
def test_data_tokenize_takes_an_exported_tokenizer_directory(ckpts, tmp_path):
    from maskvid.datamodules.synthetic import build_synthetic
    from maskvid.datamodules.token_samples import TokenSampleDecoder
    from maskvid.datamodules.streams import ValStream, expand_shards
    from maskvid.launch.cmd_data_tokenize import file_digest

    build_synthetic(tmp_path / "data", num_train=4, num_val=0, num_heldout=0, size=32, frames=9,
                    samples_per_shard=4, workers=1, progress=False)
    tok_dir, _ = export(ckpts["stage1"], tmp_path / "tok")
    out = run_cli("data", "tokenize", "--tokenizer", str(tok_dir), "--shards", str(tmp_path / "data/train"),
                  "--out", str(tmp_path / "tokens"), "--text-encoder", str(ckpts["root"] / "t5"), "--max-length", "8",
                  "--num-frames", "9", "--resolution", "32", "--batch-size", "4", "--workers", "0", "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    samples = list(ValStream(expand_shards(str(tmp_path / "tokens")), TokenSampleDecoder()))
    assert len(samples) == 4 and samples[0]["tokens"].shape == (5, 4, 4)
    # The fingerprint of a directory covers its weights.
    before = file_digest(tok_dir)
    (tok_dir / "model.safetensors").write_bytes(b"changed")
    assert file_digest(tok_dir) != before
