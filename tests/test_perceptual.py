"""The optional perceptual losses: LPIPS on VGG16 (weights from a file, frozen, clear errors; every
real frame or a random sample, padding never) and the I3D video perceptual loss, in the tokenizer's
training step."""

from __future__ import annotations

import pytest
import torch

from maskvid.models.perceptual import (PerceptualLoss, PerceptualWeightsError, VideoFeatureLoss, _vgg16_features,
                                      select_frames)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in _vgg16_features().state_dict().items()}
    path = tmp_path_factory.mktemp("vgg") / "vgg16_features.pth"
    torch.save(state, path)
    return path


def test_distance_is_zero_for_equal_videos_and_positive_otherwise(vgg_file):
    loss = PerceptualLoss(str(vgg_file))
    a = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    noise = torch.randn_like(a)
    b = (a + 0.3 * noise).clamp(-1, 1)
    assert loss(a, a).item() == pytest.approx(0.0, abs=1e-7)
    # It grows with the size of the perturbation, and it is symmetric.
    near, far = loss(a, (a + 0.1 * noise).clamp(-1, 1)).item(), loss(a, b).item()
    assert 0 < near < far and loss(b, a).item() == pytest.approx(far, rel=1e-5), (near, far)
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.training  # stays frozen when the parent module goes to train mode
    # Gradients flow to the input (it is a loss), not into the frozen network.
    b.requires_grad_(True)
    loss(a, b).backward()
    assert b.grad is not None and b.grad.abs().sum() > 0


def test_lpips_channel_weights_are_used(vgg_file, tmp_path):
    state = torch.load(vgg_file, weights_only=True)
    widths = (64, 128, 256, 512, 512)
    state |= {f"lin{i}.model.1.weight": torch.full((1, w, 1, 1), 2.0) for i, w in enumerate(widths)}
    path = tmp_path / "lpips.pth"
    torch.save(state, path)
    a = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    b = a.flip(-1)
    plain, lpips = PerceptualLoss(str(vgg_file)), PerceptualLoss(str(path))
    # Plain VGG distance weights channels 1/C; these LPIPS weights are 2 each.
    assert lpips(a, b).item() > plain(a, b).item() * 50


def test_clear_errors_for_missing_or_wrong_weights(tmp_path):
    with pytest.raises(PerceptualWeightsError, match="not found"):
        PerceptualLoss(str(tmp_path / "nope.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(PerceptualWeightsError, match="not a VGG16"):
        PerceptualLoss(str(wrong))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(PerceptualWeightsError, match="cannot read"):
        PerceptualLoss(str(garbage))


def test_frames_scored_are_every_real_one_or_a_random_sample_never_padding():
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    assert select_frames(2, 5, torch.device("cpu"), mask).tolist() == [0, 1, 2, 3, 4, 5, 6]
    seen = set()
    for seed in range(40):
        pick = select_frames(2, 5, torch.device("cpu"), mask, 2, torch.Generator().manual_seed(seed)).tolist()
        assert len([i for i in pick if i < 5]) == 2 and sorted(i for i in pick if i >= 5) == [5, 6], pick
        seen.update(pick)
        again = select_frames(2, 5, torch.device("cpu"), mask, 2, torch.Generator().manual_seed(seed)).tolist()
        assert again == pick  # a seed is a choice
    assert seen == {0, 1, 2, 3, 4, 5, 6}  # over training every real frame is scored


def test_perceptual_loss_scores_all_real_frames_and_ignores_padding(vgg_file):
    loss = PerceptualLoss(str(vgg_file))
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 6, 32, 32, generator=g) * 2 - 1
    b = a.clone()
    b[:, :, 5] = -a[:, :, 5]  # only the last frame differs: a 4-frame sample would often miss it
    assert loss(a, b).item() > 0
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 5] = False  # ... and as padding it does not count at all
    assert loss(a, b, mask).item() == pytest.approx(0.0, abs=1e-7)
    # The mean over exactly the real frames: frame by frame, then averaged.
    c = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    per_frame = [loss(a[i:i + 1, :, f:f + 1], c[i:i + 1, :, f:f + 1]).item() for i in range(2) for f in range(5)]
    assert loss(a, c, mask).item() == pytest.approx(sum(per_frame) / len(per_frame), rel=1e-4)


def tiny_i3d_network():
    from tests.test_metrics import tiny_i3d

    return tiny_i3d()


def test_video_feature_loss_is_the_i3d_feature_distance_with_padding_replaced():
    net = tiny_i3d_network()
    loss = VideoFeatureLoss(net, resolution=32)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(2, 3, 9, 32, 32, generator=g) * 2 - 1
    recon = (real + 0.3 * torch.randn(real.shape, generator=g)).clamp(-1, 1).requires_grad_(True)
    assert loss(real, real).item() == 0.0
    with torch.no_grad():
        expected = (net(recon) - net(real)).square().mean()  # 32x32 already: the resize is the identity
    value = loss(real, recon)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5) and value.item() > 0
    value.backward()
    assert recon.grad.abs().sum() > 0 and not any(p.requires_grad for p in net.parameters())
    # Padded frames of the reconstruction are the real ones as far as the loss is concerned.
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    wild = recon.detach().clone()
    wild[1, :, 6:] = 1.0
    assert loss(real, wild, mask).item() == pytest.approx(loss(real, recon.detach(), mask).item(), rel=1e-6)
    assert loss(real, wild, mask).item() != pytest.approx(loss(real, wild).item(), rel=1e-3)


def test_tokenizer_trains_with_both_perceptual_losses_and_names_bad_options(vgg_file, tmp_path):
    from lightning.pytorch import Trainer

    from maskvid.lightning_modules.config_errors import ModelOptionError
    from maskvid.metrics.i3d import save_i3d
    from tests.test_tokenizer_module import small_module

    i3d = save_i3d(tmp_path / "i3d.pt", tiny_i3d_network())
    with pytest.raises(ModelOptionError, match="i3d_path"):
        small_module(video_perceptual_weight=1.0)
    with pytest.raises(ModelOptionError, match="perceptual_frames"):
        small_module(perceptual_weight=1.0, perceptual_path=str(vgg_file), perceptual_frames=0)
    module = small_module(perceptual_weight=1.0, perceptual_path=str(vgg_file), perceptual_frames=2,
                          video_perceptual_weight=1.0, i3d_path=str(i3d), num_log_videos=0)
    g = torch.Generator().manual_seed(0)
    batches = [{"video": torch.rand(2, 3, 5, 32, 32, generator=g) * 2 - 1,
                "frame_mask": torch.tensor([[True] * 5, [True] * 3 + [False] * 2])} for _ in range(2)]
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      log_every_n_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    logged = trainer.logged_metrics
    assert float(logged["train/perceptual_loss"]) > 0 and float(logged["train/video_perceptual_loss"]) > 0
