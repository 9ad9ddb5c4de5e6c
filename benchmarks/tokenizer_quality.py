"""Stage-1 tokenizer benchmark: reconstruction quality against wall time, and step throughput.

Quality: trains configs/experiment/tokenizer_demo.yaml (the tiny C-ViViT on the synthetic data)
through the real `maskvid fit` path for at most --minutes, validating on a schedule, and reports
val PSNR / SSIM / codebook usage against wall time (JSON + a PNG plot).
Targets: PSNR >= 28 dB, codebook usage >= 50% of codes.

Speed: real Lightning training steps, each configuration in its own process (clean peak memory):
  - tiny: the demo model at the demo batch size;
  - T1:   64x64, 17 frames, p=8, pt=2, d=256, 4+4 layers, 8 heads, 8192 codes, batch 4;
each reconstruction-only (no discriminator) and full (generator + discriminator, GAN on, R1 every
4 steps). FLOPs per step from torch.utils.flop_counter; the dense fp32 matmul roof is measured beside
every timed step (this machine drifts). Targets (CPU, fp32): T1 reconstruction step >= 75% of the
roof; full step <= 2.5x.

    python benchmarks/tokenizer_quality.py                      # both parts, 20-minute budget
    python benchmarks/tokenizer_quality.py --skip-quality       # throughput only (~3 minutes)
    python benchmarks/tokenizer_quality.py --minutes 5 --json-out results/tok.json --plot results/tok.png
    python benchmarks/tokenizer_quality.py --skip-speed --minutes 5 -- --model.init_args.lr 2e-3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from common import emit, fit_steps, matmul_roof, peak_rss_mib  # noqa: E402

EXPERIMENT = REPO / "configs/experiment/tokenizer_demo.yaml"

T1 = dict(image_size=64, patch_size=8, temporal_patch_size=2, dim=256, spatial_depth=4, temporal_depth=4,
          heads=8, codebook_size=8192, code_dim=32, batch=4, frames=17)


# -- quality -----------------------------------------------------------------------------------


def ensure_data(path: Path | None) -> Path:
    if path is not None:
        return path
    default = REPO / "data/synthetic"
    if (default / "train").is_dir():
        return default
    from maskvid.datamodules.synthetic import build_synthetic

    print(f"building the synthetic dataset in {default} ...", file=sys.stderr)
    build_synthetic(default)
    return default


def run_quality(data: Path, minutes: float, root: Path, val_every: int, overrides: list[str] = ()) -> dict:
    from lightning.pytorch.callbacks import Callback

    from maskvid.launch.lightning_cli import MaskvidCLI

    args = [
        "--config", str(EXPERIMENT),
        "--data.train_shards", str(data / "train"), "--data.val_shards", str(data / "val"),
        "--trainer.max_time", f"00:00:{int(minutes):02d}:{int(minutes % 1 * 60):02d}",
        "--trainer.val_check_interval", str(val_every),
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
        *overrides,
    ]
    cli = MaskvidCLI(args=args, run=False)
    history: list[dict] = []

    class Recorder(Callback):
        def on_fit_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_validation_end(self, trainer, pl_module):
            m = trainer.callback_metrics
            row = {"wall_s": round(time.perf_counter() - self.start, 1), "step": trainer.global_step}
            for key in ("val/psnr", "val/ssim", "val/codebook_usage", "val/perplexity"):
                if key in m:
                    row[key] = round(float(m[key]), 4)
            history.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    cli.trainer.callbacks.append(Recorder())
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    wall = time.perf_counter() - start
    final = history[-1] if history else {}
    return {
        "config": str(EXPERIMENT.relative_to(REPO)),
        "overrides": list(overrides),
        "budget_minutes": minutes,
        "wall_s": round(wall, 1),
        "steps": cli.trainer.global_step,
        "codebook_size": cli.model.tokenizer.vocab_size,
        "history": history,
        "final_psnr_db": final.get("val/psnr"),
        "final_ssim": final.get("val/ssim"),
        "final_codebook_usage": final.get("val/codebook_usage"),
        "best_psnr_db": max((h.get("val/psnr", 0) for h in history), default=None),
        "targets": {"psnr_db": 28.0, "codebook_usage": 0.5},
    }


def plot_quality(quality: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = quality["history"]
    minutes = [h["wall_s"] / 60 for h in hist]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(minutes, [h.get("val/psnr") for h in hist], marker="o")
    ax[0].axhline(28, color="grey", ls="--", lw=1, label="target 28 dB")
    ax[0].set(xlabel="wall time (min)", ylabel="val PSNR (dB)", title="C-ViViT tiny: reconstruction")
    ax[0].legend()
    ax[1].plot(minutes, [100 * h.get("val/codebook_usage", 0) for h in hist], marker="o", color="C1")
    ax[1].axhline(50, color="grey", ls="--", lw=1, label="target 50%")
    ax[1].set(xlabel="wall time (min)", ylabel="codes used (%)", title="codebook usage (val)", ylim=(0, 105))
    ax[1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# -- speed -------------------------------------------------------------------------------------


def build_module(name: str, gan: bool):
    import yaml

    from maskvid.lightning_modules.tokenizer_module import TokenizerModule
    from maskvid.models.config import instantiate
    from maskvid.models.cvivit import CViViT
    from maskvid.models.discriminator import VideoDiscriminator
    from maskvid.models.quantizer import VectorQuantizer

    if name == "tiny":
        init = yaml.safe_load((REPO / "configs/model/cvivit_tiny.yaml").read_text())["model"]["init_args"]
        tokenizer = instantiate(init["tokenizer"])
        disc = instantiate(init["discriminator"]) if gan else None
        data = yaml.safe_load(EXPERIMENT.read_text())["data"]
        frames, size, batch = 17, data["resolution"], data["batch_size"]
    else:
        t = T1
        tokenizer = CViViT(t["image_size"], t["patch_size"], t["temporal_patch_size"], 3, t["dim"],
                           t["spatial_depth"], t["temporal_depth"], t["heads"],
                           quantizer=VectorQuantizer(t["codebook_size"], t["code_dim"]))
        disc = VideoDiscriminator(base_channels=32, max_channels=128) if gan else None
        frames, size, batch = t["frames"], t["image_size"], t["batch"]
    module = TokenizerModule(tokenizer, disc, gan_start_step=0, warmup_steps=1, gp_every=4, num_log_videos=0)
    video = torch.rand(batch, 3, frames, size, size) * 2 - 1
    return module, {"video": video, "frame_mask": torch.ones(batch, frames, dtype=torch.bool), "caption": [""] * batch}


def speed_worker(name: str, mode: str, steps: int, device: str, precision: str) -> dict:
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    module, batch = build_module(name, gan=(mode == "full"))
    rss_before = peak_rss_mib()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    dtype = torch.bfloat16 if "bf16" in precision else torch.float32
    timer = fit_steps(module, batch, steps, device=device, precision=precision, roof_dtype=dtype)
    step_s = timer.mean()
    out = {
        "config": name, "mode": mode, "batch": len(batch["video"]),
        "step_s": round(step_s, 4), "clips_per_s": round(len(batch["video"]) / step_s, 3),
        "gflop_per_step": round(timer.flops / 1e9, 2),
        "achieved_gflops": round(timer.flops / step_s / 1e9, 1),
        "roof_beside_steps_gflops": round(sum(timer.roofs[1:]) / max(1, len(timer.roofs) - 1), 1),
        "fraction_of_roof": round(timer.fraction_of_roof(), 3),
        "peak_rss_mib": round(peak_rss_mib(), 1), "rss_before_mib": round(rss_before, 1),
        "timed_steps": len(timer.times) - 1, "step_s_median": round(timer.median(), 4),
    }
    if device.startswith("cuda"):
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def run_speed(steps: int, device: str, precision: str) -> dict:
    dtype = torch.bfloat16 if "bf16" in precision else torch.float32
    roof = matmul_roof(device, dtype)
    results = {"roof_gflops_at_start": round(roof, 1), "device": device, "precision": precision,
               "threads": torch.get_num_threads(), "runs": []}
    for name in ("tiny", "t1"):
        for mode in ("recon", "full"):
            cmd = [sys.executable, __file__, "--_worker", name, mode, "--steps", str(steps),
                   "--device", device, "--precision", precision]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            if proc.returncode != 0:
                raise RuntimeError(f"{name}/{mode} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results["runs"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    by = {(r["config"], r["mode"]): r for r in results["runs"]}
    for name in ("tiny", "t1"):
        results[f"{name}_full_over_recon"] = round(by[(name, "full")]["step_s"] / by[(name, "recon")]["step_s"], 2)
    results["t1_recon_fraction_of_roof"] = by[("t1", "recon")]["fraction_of_roof"]
    results["targets"] = {"t1_recon_fraction_of_roof": 0.75, "t1_full_over_recon": 2.5}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget of the quality run")
    parser.add_argument("--data", type=Path, default=None, help="synthetic dataset root (built if absent)")
    parser.add_argument("--val-every", type=int, default=250, help="validate every N steps")
    parser.add_argument("--steps", type=int, default=10, help="training steps per throughput configuration")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed on GPU")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks/results/tokenizer_quality.png")
    parser.add_argument("--run-dir", type=Path, default=None, help="where the quality run writes (default: temp)")
    parser.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="after --: extra `maskvid fit` arguments for the quality run")
    args = parser.parse_args()

    if args._worker:
        print(json.dumps(speed_worker(*args._worker, args.steps, args.device, args.precision)))
        return 0
    result: dict = {"benchmark": "tokenizer_quality"}
    if not args.skip_speed:
        result["speed"] = run_speed(args.steps, args.device, args.precision)
    if not args.skip_quality:
        with tempfile.TemporaryDirectory() as tmp:
            root = args.run_dir or Path(tmp)
            result["quality"] = run_quality(ensure_data(args.data), args.minutes, root, args.val_every, args.overrides)
        plot_quality(result["quality"], args.plot)
        result["quality"]["plot"] = str(args.plot)
    emit(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
