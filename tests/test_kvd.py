"""KVD and FVD over sliding windows (MeBT's long-video metrics): the kernel distance against an
independent numpy estimator, known answers (same distribution about 0, growing with a shift),
chunked and cached updates, the windows themselves, and `maskvid eval fvd --window-stride` catching
drift that the first 16 frames hide."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from maskvid.metrics.fvd import save_stats
from maskvid.metrics.frechet import GaussianStats
from maskvid.metrics.kvd import KernelVideoDistance, kernel_distance
from maskvid.metrics.windows import sliding_windows, window_count
from tests.test_metrics import i3d_file, random_videos, write_videos  # noqa: F401 - i3d_file is a fixture


def numpy_kvd(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² under k(a, b) = (a·b / d + 1)³, written out term by term."""
    d, m, n = x.shape[1], x.shape[0], y.shape[0]

    def k(a, b):
        return (a @ b / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def gaussian_rows(n: int, d: int, shift: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


def test_kernel_distance_equals_an_independent_estimator_on_whole_sets():
    x, y = gaussian_rows(30, 8, 0.0, 0), gaussian_rows(30, 8, 0.3, 1)
    mean, std = kernel_distance(x, y, subsets=5, subset_size=1000)
    # A subset as large as the sets is the whole set, in some order: every draw is the same value.
    assert float(mean) == pytest.approx(numpy_kvd(x.numpy(), y.numpy()), rel=1e-9)
    assert float(std) == pytest.approx(0.0, abs=1e-12)


def test_kvd_is_about_zero_for_one_distribution_and_grows_with_a_shift():
    real = gaussian_rows(300, 16, 0.0, 0)
    values = [float(kernel_distance(real, gaussian_rows(300, 16, shift, 1), subsets=10, subset_size=150)[0])
              for shift in (0.0, 0.25, 0.5, 1.0)]
    # Unbiased: two samples of one distribution land near 0 (either sign), far below any shift's value.
    assert abs(values[0]) < 0.1 * values[1], values
    assert values[0] < values[1] < values[2] < values[3], values
    # Seeded subsets: the same sets give the same value; another seed draws other subsets.
    fake = gaussian_rows(300, 16, 0.25, 1)
    assert kernel_distance(real, fake, 5, 100, seed=3)[0] == kernel_distance(real, fake, 5, 100, seed=3)[0]
    assert kernel_distance(real, fake, 5, 100, seed=3)[0] != kernel_distance(real, fake, 5, 100, seed=4)[0]
    # The value is the sets', whatever order their rows come in (ranks gather them in rank order).
    shuffled = fake[torch.randperm(300, generator=torch.Generator().manual_seed(9))]
    assert kernel_distance(real, fake, 5, 100, seed=3)[0] == kernel_distance(real.flip(0), shuffled, 5, 100, seed=3)[0]


def test_the_metric_in_chunks_and_with_cached_real_rows_equals_the_function():
    real, fake = gaussian_rows(12, 6, 0.0, 0), gaussian_rows(10, 6, 0.5, 1)
    metric = KernelVideoDistance(num_features=6, subsets=10, subset_size=8)
    for chunk in (slice(0, 1), slice(1, 7), slice(7, None)):
        metric.update(real[chunk], real=True)
        metric.update(fake[chunk], real=False)
    out = metric.compute()
    expected = kernel_distance(real, fake, 10, 8)
    assert float(out["kvd"]) == pytest.approx(float(expected[0]), rel=1e-12)
    assert float(out["kvd_std"]) == pytest.approx(float(expected[1]), rel=1e-12)
    assert (int(out["num_real"]), int(out["num_fake"])) == (12, 10)

    cached = KernelVideoDistance(num_features=6, real_features=real, subsets=10, subset_size=8)
    cached.update(fake, real=False)
    assert float(cached.compute()["kvd"]) == pytest.approx(float(expected[0]), rel=1e-12)
    with pytest.raises(ValueError, match="cached"):
        cached.update(real, real=True)
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        KernelVideoDistance(num_features=6, real_features=torch.zeros(4, 5))
    few = KernelVideoDistance(num_features=6)
    few.update(real[:1], real=True)
    few.update(fake[:3], real=False)
    with pytest.warns(UserWarning, match="at least 2"):
        assert math.isnan(float(few.compute()["kvd"]))


def test_sliding_windows_are_every_span_in_order():
    video = torch.arange(2 * 1 * 40 * 1 * 1, dtype=torch.float32).reshape(2, 1, 40, 1, 1)
    windows = sliding_windows(video, window=16, stride=8)
    assert window_count(40, 16, 8) == 4 and windows.shape == (8, 1, 16, 1, 1)
    for b in range(2):
        for n in range(4):
            assert torch.equal(windows[b * 4 + n], video[b, :, 8 * n: 8 * n + 16])
    assert sliding_windows(video[:, :, :10], 16, 8).shape[2] == 10  # shorter: whole, stretched later by I3D
    assert window_count(16, 16, 4) == 1 and window_count(17, 16, 4) == 1 and window_count(20, 16, 4) == 2
    with pytest.raises(ValueError):
        window_count(40, 16, 0)


def test_eval_fvd_over_sliding_windows_sees_late_drift_and_reports_kvd(i3d_file, tmp_path, capsys):  # noqa: F811
    from maskvid.launch.cli import main

    real = random_videos(6, 0, frames=32, size=24)
    # The same clips, brightened from frame 12 on: a video that drifts after its start.
    drifted = real.clone()
    drifted[:, :, 12:] = (drifted[:, :, 12:] + 0.6).clamp(-1, 1)
    real_dir, fake_dir = write_videos(tmp_path / "real", real), write_videos(tmp_path / "fake", drifted)
    common = ["--i3d", str(i3d_file), "--num-frames", "8", "--quiet", "--kvd-subsets", "10"]

    def evaluate(*extra: str) -> dict:
        out = tmp_path / "result.json"
        assert main(["eval", "fvd", "--real", str(real_dir), "--fake", str(fake_dir), *common, *extra,
                     "--json", str(out)]) == 0
        return json.loads(out.read_text())

    first = evaluate()
    sliding = evaluate("--window-stride", "8", "--max-frames", "32")
    assert (first["num_real"], first["num_fake_videos"]) == (6, 6)
    assert (sliding["num_real"], sliding["num_fake"], sliding["num_fake_videos"]) == (24, 24, 6)  # 4 windows each
    assert sliding["name"] == "fvd_6" and sliding["window_stride"] == 8
    # The first 8 frames are the same videos (up to the codec); the windows after frame 12 are not.
    assert sliding["fvd"] > 5 * first["fvd"], (first, sliding)
    assert sliding["kvd"] > 5 * abs(first["kvd"]), (first, sliding)
    text = capsys.readouterr().out
    assert "8-frame windows every 8 frames" in text and "KVD_6:" in text

    # Cached real features (rows included) give the same FVD and KVD; a window setting that does
    # not match the file is refused; a file without rows still gives FVD, and says why no KVD.
    stats = tmp_path / "stats.pt"
    assert main(["eval", "real-stats", "--data", str(real_dir), "--out", str(stats), *common[:-2],
                 "--window-stride", "8", "--max-frames", "32"]) == 0
    out = tmp_path / "cached.json"
    assert main(["eval", "fvd", "--real", str(stats), "--fake", str(fake_dir), *common, "--window-stride", "8",
                 "--max-frames", "32", "--json", str(out)]) == 0
    cached = json.loads(out.read_text())
    assert cached["fvd"] == pytest.approx(sliding["fvd"], rel=1e-9)
    assert cached["kvd"] == pytest.approx(sliding["kvd"], rel=1e-9)
    capsys.readouterr()
    assert main(["eval", "fvd", "--real", str(stats), "--fake", str(fake_dir), *common]) == 2
    assert "window_stride" in capsys.readouterr().err
    payload = torch.load(stats, weights_only=True)
    old = tmp_path / "old.pt"
    save_stats(old, GaussianStats(payload["mean"], payload["cov"], payload["count"]), payload["features"])
    capsys.readouterr()
    assert main(["eval", "fvd", "--real", str(old), "--fake", str(fake_dir), *common, "--window-stride", "8",
                 "--max-frames", "32"]) == 0
    assert "KVD: not computed" in capsys.readouterr().out
