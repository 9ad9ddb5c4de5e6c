"""TokenizerModule: the loss pieces, config errors, and training through `maskvid fit`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from maskvid.lightning_modules.tokenizer_module import TokenizerModule
from maskvid.models.cvivit import CViViT
from maskvid.models.discriminator import VideoDiscriminator
from maskvid.models.quantizer import VectorQuantizer
from maskvid.models.tokenizer_checkpoint import TokenizerCheckpointError
from maskvid.video_tokenizer import load_tokenizer
from tests.conftest import REPO, metrics_rows, run_cli


def small_module(**kw) -> TokenizerModule:
    torch.manual_seed(0)
    tok = CViViT(image_size=32, patch_size=8, dim=32, spatial_depth=1, temporal_depth=1, heads=2,
                 quantizer=VectorQuantizer(64, 8))
    return TokenizerModule(tok, VideoDiscriminator(base_channels=8, max_channels=16), **kw)


def test_reconstruction_loss_ignores_padded_frames():
    module = small_module()
    video = torch.zeros(2, 3, 5, 8, 8)
    recon = video.clone()
    recon[:, :, 3:] = 1.0  # wrong only on frames 3 and 4
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert module.reconstruction_loss(recon, video, mask).item() == 0.0
    assert module.reconstruction_loss(recon, video).item() == pytest.approx(2 / 5)


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_heads():
    module = small_module()
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    module.tokenizer.record_head_io = True
    recon, _ = module.tokenizer(video)
    nll = module.reconstruction_loss(recon, video)
    g_loss = -module.discriminator(recon).mean()
    weight = module._adaptive_weight(nll, g_loss)
    heads = [module.tokenizer.head_first.weight, module.tokenizer.head_tubelet.weight]
    norm = lambda loss: torch.cat([g.flatten() for g in torch.autograd.grad(loss, heads, retain_graph=True)]).norm()  # noqa: E731
    expected = norm(nll) / (norm(g_loss) + 1e-4)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5) and weight.item() > 0
    assert not weight.requires_grad


def test_perceptual_weight_without_a_path_is_a_config_error():
    with pytest.raises(ValueError, match="perceptual_path"):
        small_module(perceptual_weight=1.0)


def test_loading_something_that_is_not_a_tokenizer_checkpoint(tmp_path):
    with pytest.raises(TokenizerCheckpointError, match="not found"):
        load_tokenizer(tmp_path / "missing.ckpt")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(TokenizerCheckpointError, match="no tokenizer"):
        load_tokenizer(other)
    (tmp_path / "trunc.ckpt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(TokenizerCheckpointError, match="cannot read"):
        load_tokenizer(tmp_path / "trunc.ckpt")


# -- through the CLI ---------------------------------------------------------------------------

MODEL = {
    "model": {
        "class_path": "maskvid.lightning_modules.tokenizer_module.TokenizerModule",
        "init_args": {
            "tokenizer": {
                "class_path": "maskvid.models.cvivit.CViViT",
                "init_args": {"image_size": 32, "patch_size": 8, "dim": 32, "spatial_depth": 1,
                              "temporal_depth": 1, "heads": 2,
                              "quantizer": {"class_path": "maskvid.models.quantizer.VectorQuantizer",
                                            "init_args": {"codebook_size": 64, "dim": 8, "restart_every": 2}}},
            },
            "discriminator": {"class_path": "maskvid.models.discriminator.VideoDiscriminator",
                              "init_args": {"base_channels": 8, "max_channels": 16}},
            "warmup_steps": 2, "gan_start_step": 2, "gp_every": 2, "num_log_videos": 2,
        },
    }
}


@pytest.fixture(scope="module")
def synthetic32(tmp_path_factory) -> Path:
    from maskvid.datamodules.synthetic import build_synthetic

    out = tmp_path_factory.mktemp("syn32")
    build_synthetic(out, num_train=16, num_val=4, num_heldout=0, size=32, frames=9,
                    samples_per_shard=8, workers=1, progress=False)
    return out


def fit_args(data: Path, root: Path, config: Path) -> list[str]:
    return [
        "--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(config),
        "--data.train_shards", str(data / "train"), "--data.val_shards", str(data / "val"),
        "--data.num_frames", "9", "--data.resolution", "32", "--data.batch_size", "2",
        "--data.num_workers", "0", "--data.batches_per_epoch", "100",
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "2",
    ]


def six_step_fit(data: Path, tmp: Path) -> Path:
    """A 6-step tiny tokenizer fit (validation and media at steps 3 and 6); returns its root."""
    config = tmp / "model.yaml"
    config.write_text(yaml.safe_dump(MODEL))
    root = tmp / "run"
    out = run_cli("fit", *fit_args(data, root, config), "--trainer.max_steps", "6",
                  "--trainer.val_check_interval", "3")
    assert out.returncode == 0, out.stderr[-4000:]
    return root


@pytest.mark.slow
def test_fit_trains_both_optimizers_and_the_checkpoint_rebuilds_the_tokenizer(synthetic32, tmp_path):
    root = six_step_fit(synthetic32, tmp_path)

    (ckpt,) = root.rglob("*.ckpt")
    checkpoint = torch.load(ckpt, weights_only=True)  # plain data only
    assert checkpoint["global_step"] == 6  # the discriminator's step does not count as a step
    gen_state, disc_state = checkpoint["optimizer_states"]
    # Adam's step counters: the generator stepped every batch, the discriminator from gan_start_step.
    assert int(gen_state["state"][0]["step"]) == 6
    assert int(disc_state["state"][0]["step"]) == 4

    rows = metrics_rows(root)
    logged = {k for row in rows for k, v in row.items() if v}
    for key in ("train/recon_loss", "train/g_loss", "train/d_loss", "train/adaptive_weight", "train/r1",
                "train/perplexity", "train/codebook_usage", "val/psnr", "val/ssim", "val/codebook_usage",
                "val/perplexity"):
        assert key in logged, key
    psnr = [float(r["val/psnr"]) for r in rows if r.get("val/psnr")]
    assert len(psnr) == 2  # validated at steps 3 and 6
    media = sorted(p.name for p in root.rglob("media/*"))
    assert "val_reconstructions_step0000003.png" in media and "val_reconstructions_step0000006.mp4" in media

    # The checkpoint alone rebuilds the tokenizer (EMA weights), and twice gives the same tokens...
    video = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    a, b = load_tokenizer(ckpt), load_tokenizer(ckpt)
    assert not any(p.requires_grad for p in a.parameters()) and not a.training
    assert torch.equal(a.encode(video), b.encode(video))
    # ...the same tokens as the module Lightning restores from it.
    module = TokenizerModule.load_from_checkpoint(ckpt, map_location="cpu")
    with torch.no_grad():
        assert torch.equal(module.eval_tokenizer.eval().encode(video), a.encode(video))
    raw = load_tokenizer(ckpt, use_ema=False)
    assert torch.equal(raw.head_first.weight, module.tokenizer.head_first.weight)

    # `maskvid validate` evaluates the checkpoint.
    val = run_cli("validate", *fit_args(synthetic32, tmp_path / "val", tmp_path / "model.yaml"), "--ckpt_path", str(ckpt))
    assert val.returncode == 0, val.stderr[-4000:]
    # On the same val clips with the checkpoint's weights: the PSNR the fit logged at its last step.
    import re

    printed = re.search(r"val/psnr\W+([-+0-9.eE]+)", val.stdout)
    assert printed and float(printed.group(1)) == pytest.approx(psnr[-1], rel=1e-4), val.stdout[-2000:]


@pytest.mark.slow
def test_data_that_does_not_fit_the_tokenizer_is_a_clear_error(synthetic32, tmp_path):
    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump(MODEL))
    out = run_cli("fit", *fit_args(synthetic32, tmp_path / "run", config), "--data.num_frames", "8",
                  "--trainer.max_steps", "1")
    assert out.returncode != 0
    assert "data does not fit the tokenizer" in out.stderr and "1 + k*2 frames" in out.stderr
