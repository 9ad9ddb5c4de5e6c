"""Every benchmark is a standalone script whose --help explains what it measures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if p.name != "common.py")


def test_there_are_benchmarks():
    assert {"data_throughput.py", "tokenizer_quality.py", "stage2_throughput.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(script):
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout and len(out.stdout) > 300


# -- the performance suite: mfu.py, loader_balance.py, run_all.py (no timing asserts) ----------

MFU_WORKLOADS = ("tokenizer_recon", "tokenizer_gan", "stage2_maskgit", "stage2_mebt", "sample_maskgit", "sample_mebt")


def _bench_import(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO))
    import importlib

    return importlib.import_module(name)


def test_flop_count_matches_analytic_linear_stack():
    """The step FLOP count the MFU figures divide by, for a Linear stack trained through the same
    Lightning path (fit_steps): exactly the analytic count, so it cannot silently be zero."""
    import torch
    from lightning.pytorch import LightningModule

    common = _bench_import("common")
    widths, batch = [16, 32, 8, 4], 5

    class Stack(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(*[torch.nn.Linear(i, o) for i, o in zip(widths, widths[1:])])

        def training_step(self, b, idx):
            return self.net(b["x"]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    timer = common.fit_steps(Stack(), {"x": torch.randn(batch, widths[0])}, steps=2, roof_n=64)
    macs = [i * o for i, o in zip(widths, widths[1:])]
    # forward 2*B*i*o per layer; backward: weight grads for every layer, input grads for all but
    # the first (its input needs none).
    expected = 2 * batch * sum(macs) + 2 * batch * sum(macs) + 2 * batch * sum(macs[1:])
    assert timer.flops == expected
    assert len(timer.times) == 1 and len(timer.roofs) == 1 and timer.roofs[0] > 0


def test_cpu_attention_is_counted():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    _bench_import("common")  # registers the CPU flash-attention formulas
    b, h, length, d = 2, 3, 7, 8
    q, k, v = (torch.randn(b, h, length, d) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 4 * b * h * length * length * d


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory):
    """One quick run_all over mfu (every workload, with profiling) and a loader_balance run made
    to fail at once: covers mfu.py's JSON, the combined JSON, the plot, and failure recording."""
    out = tmp_path_factory.mktemp("bench") / "all.json"
    cmd = [sys.executable, str(REPO / "benchmarks/run_all.py"), "--quick", "--only", "mfu", "loader_balance",
           "--extra", "mfu=--top-ops 3", "--extra", "loader_balance=--no-such-option", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, json.loads(out.read_text())


def test_mfu_quick_json(quick_suite):
    _, combined = quick_suite
    mfu = combined["benchmarks"]["mfu"]["result"]
    assert mfu["benchmark"] == "mfu" and mfu["quick"] is True and mfu["errors"] == {}
    assert mfu["roof"]["gflops_median"] > 0 and mfu["roof"]["dtype"] == "float32"
    assert set(mfu["workloads"]) == set(MFU_WORKLOADS)
    start_roof = mfu["roof"]["gflops_median"]
    for name, row in mfu["workloads"].items():
        flops = row["gflop_per_step"] if "gflop_per_step" in row else row["gflop_per_video"]
        seconds = row["step_s"] if "step_s" in row else row["seconds_per_video"]
        assert flops > 0 and seconds > 0, name
        # The derived figures are what they say, from the counted FLOPs and the timed seconds: within
        # the bounds the JSON's rounding (3 decimals of GFLOP, 4 of seconds, 2 of GFLOP/s) leaves.
        low, high = (flops - 5e-4) / (seconds + 5e-5), (flops + 5e-4) / (seconds - 5e-5)
        assert low - 5e-3 <= row["achieved_gflops"] <= high + 5e-3, (name, row)
        low, high = low / (start_roof + 5e-3), high / (start_roof - 5e-3)
        assert low - 5e-5 <= row["fraction_of_start_roof"] <= high + 5e-5, (name, row)
        assert math.isfinite(row["fraction_of_roof"]) and row["fraction_of_roof"] > 0, (name, row)
        assert mfu["summary"][name] == row["fraction_of_roof"], name
        assert row["top_ops"] and all(op["self_cpu_ms"] >= 0 for op in row["top_ops"]), name
    gan, recon = mfu["workloads"]["tokenizer_gan"], mfu["workloads"]["tokenizer_recon"]
    assert gan["gflop_per_step"] > recon["gflop_per_step"]
    assert mfu["summary"]["tokenizer_gan_over_recon"] == pytest.approx(gan["step_s"] / recon["step_s"], rel=2e-2)
    assert set(mfu["meets_targets"]) == {"tokenizer_recon", "stage2_maskgit", "stage2_mebt", "sample_maskgit",
                                         "tokenizer_gan_over_recon"}


def test_run_all_writes_combined_json_and_png(quick_suite):
    out, combined = quick_suite
    assert combined["status"] == {"mfu": "ok", "loader_balance": "failed"}
    assert "no-such-option" in combined["benchmarks"]["loader_balance"]["error"]
    metrics = {row["metric"] for row in combined["summary"]}
    assert {"stage2_maskgit_fraction_of_roof", "sample_maskgit_fraction_of_roof", "tokenizer_gan_over_recon"} <= metrics
    roof_png = out.parent / "roof.png"
    assert str(roof_png) in combined["plots"]
    assert roof_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out.parent / "mfu.json").is_file()
    assert combined["host"]["cpu_model"]  # fractions of the roof only compare on one CPU


def test_run_all_skips_slow_by_default_and_honours_skip(tmp_path):
    run_all = _bench_import("run_all")
    names = [n for n in run_all.discover() if n != "text_to_video_quality"]
    out = tmp_path / "all.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/run_all.py"), "--skip", *names, "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    combined = json.loads(out.read_text())
    assert set(combined["status"].values()) == {"skipped"}
    assert "include-slow" in combined["benchmarks"]["text_to_video_quality"]["reason"]
    assert {"mfu", "loader_balance", "stage2_throughput", "tokenizer_quality"} <= set(combined["status"])


def test_run_all_baseline_gives_before_after():
    run_all = _bench_import("run_all")
    now = {"mfu": {"result": {"summary": {"stage2_maskgit": 0.8, "tokenizer_gan_over_recon": 2.0}}}}
    before = {"summary": [{"benchmark": "mfu", "metric": "stage2_maskgit_fraction_of_roof", "value": 0.4}]}
    rows = run_all.with_baseline(run_all.summary_rows(now), before)
    row = next(r for r in rows if r["metric"] == "stage2_maskgit_fraction_of_roof")
    assert row["before"] == 0.4 and row["change"] == 2.0 and row["met"] is True
    gan = next(r for r in rows if r["metric"] == "tokenizer_gan_over_recon")
    assert gan["kind"] == "max" and gan["met"] is True and "before" not in gan
