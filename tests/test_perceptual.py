"""The optional perceptual loss: loads VGG16 weights from a file, frozen, with clear errors."""

from __future__ import annotations

import pytest
import torch

from maskvid.models.perceptual import PerceptualLoss, PerceptualWeightsError, _vgg16_features


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in _vgg16_features().state_dict().items()}
    path = tmp_path_factory.mktemp("vgg") / "vgg16_features.pth"
    torch.save(state, path)
    return path


def test_distance_is_zero_for_equal_videos_and_positive_otherwise(vgg_file):
    loss = PerceptualLoss(str(vgg_file), max_frames=2)
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
