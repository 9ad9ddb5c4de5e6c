"""Unconditional stage 2 (MeBT's paper setting): `text_encoder: null` and a backbone with
`text_dim: null` train, validate, checkpoint, export and generate with no text path at all."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from maskvid import TextToVideo
from maskvid.launch.cmd_ckpt_export import export
from maskvid.lightning_modules.config_errors import ConfigMismatchError, ModelOptionError
from maskvid.lightning_modules.masked_video_module import MaskedVideoModule
from maskvid.models.config import instantiate
from tests.conftest import run_cli
from tests.stage2_fixtures import BACKBONES, tiny_t5_dir, tiny_tokenizer, write_tokenizer_checkpoint



def is_text_parameter(name: str) -> bool:
    """The text path's parameters: the text projection and null token, MaskGIT's per-block
    cross-attention, MeBT's query_text reads (MeBT's encoder `cross` reads the video context)."""
    return name.startswith("text.") or ".query_text." in name or (name.startswith("blocks.") and ".cross." in name)


def uncond_backbone(kind: str, **extra) -> dict:
    spec = copy.deepcopy(BACKBONES[kind])
    spec["init_args"].update(text_dim=None, **extra)
    return spec


def conditional_params(kind: str) -> list:
    spec = copy.deepcopy(BACKBONES[kind])
    if kind == "mebt":
        spec["init_args"]["query_text"] = True
    return list(instantiate(spec).named_parameters())


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return write_tokenizer_checkpoint(tmp_path_factory.mktemp("uncond") / "tok.ckpt", tiny_tokenizer())


def make_module(kind: str, tok, **kw) -> MaskedVideoModule:
    torch.manual_seed(0)
    args = dict(text_encoder=None, warmup_steps=1, ema_decay=0.9, sample_steps=2, num_val_videos=0, lr=1e-3)
    args.update(kw)
    return MaskedVideoModule(instantiate(uncond_backbone(kind)), str(tok), **args)


def video_batches(n: int, captions=("a red circle moving left", "a blue square moving up")) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"video": torch.rand(2, 3, 9, 32, 32, generator=g) * 2 - 1, "caption": list(captions)} for _ in range(n)]


def loader(n: int) -> DataLoader:
    return DataLoader(video_batches(n), batch_size=None)  # each item is already a batch


@pytest.mark.parametrize("kind", ["maskgit", "mebt"])
def test_unconditional_fit_generate_and_export_round_trip(kind, tok, tmp_path):
    module = make_module(kind, tok)
    assert module.text_encoder is None and module.text_drop_prob == 0.0 and module.sampling_options().cfg_scale == 1.0
    names = [n for n, _ in module.backbone.named_parameters()]
    assert not [n for n in names if is_text_parameter(n)], names
    assert [n for n, _ in conditional_params(kind) if is_text_parameter(n)]  # the check can see them
    conditional = instantiate(copy.deepcopy(BACKBONES[kind]))
    assert sum(p.numel() for p in module.backbone.parameters()) < sum(p.numel() for p in conditional.parameters())
    before = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}

    trainer = Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader(3))
    assert trainer.global_step == 3
    changed = [n for n, p in module.backbone.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "training moved no weight"

    module.grid = (5, 4, 4)  # set from the datamodule in setup(); here the 9-frame clips' grid
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    model = TextToVideo.from_checkpoint(ckpt)
    assert model.unconditional and model.text_encoder is None
    videos = model.generate(num_videos=3, seed=4, steps=2, precision="32")
    assert videos.shape == (3, 9, 32, 32, 3) and videos.dtype == torch.uint8
    out, kind_name = export(ckpt, tmp_path / "export")
    assert kind_name == "maskvid.text_to_video"
    assert json.loads((out / "config.json").read_text())["text_encoder"] is None
    again = TextToVideo.from_pretrained(out)
    assert torch.equal(videos, again.generate(num_videos=3, seed=4, steps=2, precision="32"))
    # Video i depends on (seed, i) alone.
    assert torch.equal(videos[:2], again.generate(num_videos=2, seed=4, steps=2, precision="32"))
    # Past the trained 5 latent frames: a sliding window, primed without text.
    assert again.generate(num_videos=2, num_frames=13, seed=4, steps=2, precision="32").shape == (2, 13, 32, 32, 3)
    with pytest.raises(ValueError, match="num_videos"):
        again.generate(["a red circle"], steps=2)
    with pytest.raises(ValueError, match="cfg_scale"):
        again.generate(num_videos=1, cfg_scale=3.0)


@pytest.mark.parametrize("kind", ["maskgit", "mebt"])
def test_logits_and_loss_do_not_depend_on_any_caption(kind, tok):
    module = make_module(kind, tok)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (2, 5, 4, 4), generator=g)
    token_batch = {"tokens": tokens, "latent_mask": torch.ones(2, 5, dtype=torch.bool),
                   "text_emb": torch.randn(2, 5, 32, generator=g), "text_mask": torch.ones(2, 5, dtype=torch.bool)}
    other = dict(token_batch, text_emb=torch.randn(2, 7, 384, generator=g), text_mask=torch.ones(2, 7, dtype=torch.bool))
    losses = [module.masked_loss(module.backbone, b, generator=torch.Generator().manual_seed(3))["loss"]
              for b in (token_batch, other)]
    assert torch.equal(*losses)
    video = video_batches(1)[0]
    swapped = dict(video, caption=["something else entirely", ""])
    losses = [module.masked_loss(module.backbone, b, generator=torch.Generator().manual_seed(3))["loss"]
              for b in (video, swapped)]
    assert torch.equal(*losses)
    # The backbone itself has no text input at all.
    masked = tokens.masked_fill(torch.rand(tokens.shape, generator=g) < 0.5, module.backbone.mask_id)
    logits = module.backbone(masked)
    assert logits.shape == (2, 5, 4, 4, 64) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="unconditional"):
        module.backbone(masked, torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool))


def test_unconditional_mebt_predicts_with_nothing_observed(tok):
    """Sampling's first step: every token masked, so a clip's context is its start token alone."""
    module = make_module("mebt", tok)
    full = torch.full((2, 5, 4, 4), module.backbone.mask_id)
    logits = module.backbone(full)
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        module.backbone.context_start.add_(1.0)
    assert not torch.allclose(module.backbone(full), logits)


@pytest.mark.parametrize("kind", ["maskgit", "mebt"])
def test_validation_generates_unconditionally(kind, tok, tmp_path, monkeypatch):
    module = make_module(kind, tok, num_val_videos=3, num_log_videos=0, val_sample_batch_size=2)
    module.grid = (5, 4, 4)
    seen = []
    monkeypatch.setattr(module.val_video, "update_generated",
                        lambda video, prompts=None, attrs=None: seen.append((video.shape, prompts, attrs)))
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(module, dataloaders=loader(1))
    assert [s[0][0] for s in seen] == [2, 1]  # 3 videos in chunks of 2
    assert all(s[1] is None and s[2] is None for s in seen)


def test_generate_cli_takes_num_videos_without_prompts(tok, tmp_path):
    module = make_module("mebt", tok)
    module.grid = (5, 4, 4)
    checkpoint = {"state_dict": module.state_dict(), "global_step": 0}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "u.ckpt")
    out = tmp_path / "videos"
    result = run_cli("generate", "--ckpt", str(tmp_path / "u.ckpt"), "--num-videos", "3", "--batch-size", "2",
                     "--steps", "2", "--out", str(out), "--quiet", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    index = json.loads((out / "index.json").read_text())
    assert len(index) == 3 and all(item["prompt"] is None for item in index)
    assert len(list(out.glob("*.mp4"))) == 3
    bad = run_cli("generate", "--ckpt", str(tmp_path / "u.ckpt"), "--prompt", "a red circle", "--out", str(out))
    assert bad.returncode != 0 and "--num-videos" in bad.stderr and "Traceback" not in bad.stderr


def test_bad_combinations_name_the_option(tok, tmp_path):
    for option, value in (("text_drop_prob", 0.1), ("cfg_scale", 2.0), ("clip_path", "clip/"),
                          ("caption_accuracy", True)):
        with pytest.raises(ModelOptionError, match=f"^model.init_args.{option}: ") as err:
            make_module("mebt", tok, **{option: value})
        assert "\n" not in str(err.value)
    make_module("mebt", tok, text_drop_prob=0.0, cfg_scale=1.0)  # the no-op values are accepted
    with pytest.raises(ConfigMismatchError, match="text_dim: null"):
        MaskedVideoModule(instantiate(BACKBONES["mebt"]), str(tok), text_encoder=None)
    t5 = tiny_t5_dir(tmp_path / "t5")
    with pytest.raises(ConfigMismatchError, match="text_encoder: null"):
        MaskedVideoModule(instantiate(uncond_backbone("maskgit")), str(tok), text_encoder=str(t5))
    for kind, option in (("mebt", "query_text"), ("mebt", "pooled_text"), ("maskgit", "pooled_text")):
        with pytest.raises(ValueError, match=option):
            instantiate(uncond_backbone(kind, **{option: True}))


def test_the_cli_refuses_guidance_on_an_unconditional_recipe_in_one_line():
    result = run_cli("fit", "--config", "configs/experiment/mebt_uncond_16f.yaml",
                     "--model.init_args.backbone.init_args.dim", "32", "--model.init_args.backbone.init_args.heads", "2",
                     "--model.init_args.cfg_scale", "2", "--trainer.accelerator", "cpu")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("maskvid fit: error: model.init_args.cfg_scale: "), last
