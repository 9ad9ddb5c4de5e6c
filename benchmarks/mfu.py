"""Model FLOP utilisation (MFU): achieved FLOP/s of real training steps and of sampling, over this
machine's dense matmul roof measured in the same run.

Roof: a large square matmul (--roof-n, fp32 on CPU; bf16 with --precision bf16-mixed), GFLOP/s,
median of several runs, at the start; and again beside every timed step, since a shared machine
drifts by tens of percent within a minute (`fraction_of_roof` uses the roof beside the steps,
`fraction_of_start_roof` the one at the start).

FLOPs per step from torch.utils.flop_counter (matmuls, convolutions, attention; elementwise ops
count as free, as usual for MFU), taken on an untimed first step of the same Lightning
training loop `maskvid fit` runs:
  - tokenizer_recon: TokenizerModule, C-ViViT T1 (64x64, 17 frames, p=8, pt=2, d=256, 4+4 layers,
    8 heads, 8192 codes of width 32), batch 4, reconstruction only (no discriminator);
  - tokenizer_gan:   the same with the discriminator on from step 0 (generator + discriminator
    updates, R1 penalty every 4 steps); reported as a step-time ratio over tokenizer_recon (its
    FLOPs are counted on step 0, which carries the lazy R1 penalty, so its own roof fraction is
    an upper bound; the mean step time covers one R1 step in every 4);
  - stage2_maskgit:  MaskedVideoModule, M1 (576 tokens = 9 latent frames x 8x8, d=512, depth 8,
    8 heads, text length 16, batch 8, vocab 8192) on token-shard batches;
  - stage2_mebt:     the same with the MeBT backbone (256 latents, 8 encoder + 8 decoder layers, as
    stage2_throughput.py builds it);
  - sample_maskgit / sample_mebt: one M1 video, 18 MaskGIT steps, classifier-free guidance.
Text embeddings are random 384-d tensors (the MiniLM width); nothing is downloaded.

Targets (2-core CPU, fp32): stage2_maskgit >= 75% of the roof, stage2_mebt >= 65%,
tokenizer_recon >= 75%, tokenizer_gan <= 2.5x the recon step, sample_maskgit >= 60%.

--top-ops N runs torch.profiler over one (untimed) step of each workload and lists the N ops
with the most self CPU time (and self device time on a GPU).

    python benchmarks/mfu.py                                   # everything, CPU fp32 (~10 minutes)
    python benchmarks/mfu.py --workloads stage2_maskgit sample_maskgit --top-ops 15
    python benchmarks/mfu.py --device cuda --precision bf16-mixed --json-out benchmarks/results/mfu_cuda.json
    python benchmarks/mfu.py --quick                           # tiny sizes: a smoke test
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from common import _sync, emit, fit_steps, matmul_roof, peak_rss_mib  # noqa: E402

T1 = dict(image_size=64, patch_size=8, temporal_patch_size=2, dim=256, spatial_depth=4, temporal_depth=4,
          heads=8, codebook_size=8192, code_dim=32, batch=4, frames=17, disc_base=32, disc_max=128)
M1 = dict(grid=(9, 8, 8), vocab=8192, dim=512, depth=8, heads=8, text_len=16, text_dim=384, batch=8, latents=256,
          mebt_decoder_depth=8)
# --quick: the same code paths at toy sizes (a smoke test; the ratios mean little at this size).
T1_QUICK = dict(image_size=16, patch_size=4, temporal_patch_size=2, dim=32, spatial_depth=1, temporal_depth=1,
                heads=2, codebook_size=64, code_dim=8, batch=2, frames=5, disc_base=8, disc_max=16)
M1_QUICK = dict(grid=(3, 4, 4), vocab=64, dim=64, depth=2, heads=2, text_len=4, text_dim=384, batch=2, latents=16,
                mebt_decoder_depth=2)

WORKLOADS = ("tokenizer_recon", "tokenizer_gan", "stage2_maskgit", "stage2_mebt", "sample_maskgit", "sample_mebt")
TARGETS = {"tokenizer_recon": 0.75, "stage2_maskgit": 0.75, "stage2_mebt": 0.65, "sample_maskgit": 0.60}
TARGET_GAN_OVER_RECON = 2.5


def autocast_dtype(precision: str) -> torch.dtype | None:
    return torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None


# -- networks ----------------------------------------------------------------------------------


def make_tokenizer(t: dict):
    from maskvid.models.cvivit import CViViT
    from maskvid.models.quantizer import VectorQuantizer

    return CViViT(t["image_size"], t["patch_size"], t["temporal_patch_size"], 3, t["dim"], t["spatial_depth"],
                  t["temporal_depth"], t["heads"], quantizer=VectorQuantizer(t["codebook_size"], t["code_dim"]))


def make_backbone(kind: str, m: dict):
    from maskvid.models.maskgit import MaskGITBackbone
    from maskvid.models.mebt import MeBT

    if kind == "maskgit":
        return MaskGITBackbone(m["vocab"], m["grid"], m["dim"], m["depth"], m["heads"], text_dim=m["text_dim"])
    # As stage2_throughput.py builds M1's MeBT: depth encoder + depth decoder layers.
    return MeBT(m["vocab"], m["grid"], m["dim"], m["depth"], m["mebt_decoder_depth"], m["heads"], m["latents"],
                m["text_dim"])


def tokenizer_job(t: dict, gan: bool):
    from maskvid.lightning_modules.tokenizer_module import TokenizerModule
    from maskvid.models.discriminator import VideoDiscriminator

    disc = VideoDiscriminator(base_channels=t["disc_base"], max_channels=t["disc_max"]) if gan else None
    module = TokenizerModule(make_tokenizer(t), disc, gan_start_step=0, warmup_steps=1, gp_every=4, num_log_videos=0)
    b, f, s = t["batch"], t["frames"], t["image_size"]
    batch = {"video": torch.rand(b, 3, f, s, s) * 2 - 1, "frame_mask": torch.ones(b, f, dtype=torch.bool),
             "caption": [""] * b}
    return module, batch, b


def stage2_job(kind: str, m: dict, t: dict, tmp: Path):
    """MaskedVideoModule on a token-shard batch (tokens + cached text embeddings), as stage 2
    trains from `maskvid data tokenize` output. Its frozen tokenizer only has to match the vocab."""
    from maskvid.lightning_modules.masked_video_module import MaskedVideoModule
    from maskvid.video_tokenizer import VideoTokenizer

    ckpt = VideoTokenizer(make_tokenizer({**t, "codebook_size": m["vocab"]})).save_pretrained(tmp / f"tokenizer_{kind}")
    module = MaskedVideoModule(make_backbone(kind, m), str(ckpt), text_encoder="packaged:minilm",
                               text_max_length=m["text_len"], warmup_steps=1, num_val_videos=0)
    b, (lt, h, w) = m["batch"], m["grid"]
    batch = {"tokens": torch.randint(0, m["vocab"], (b, lt, h, w)), "latent_mask": torch.ones(b, lt, dtype=torch.bool),
             "text_emb": torch.randn(b, m["text_len"], m["text_dim"]).half(),
             "text_mask": torch.ones(b, m["text_len"], dtype=torch.bool), "caption": [f"clip {i}" for i in range(b)]}
    return module, batch, b


# -- profiling ---------------------------------------------------------------------------------


def top_ops(prof, n: int) -> list[dict]:
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = []
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]:
        row = {"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 3),
               "self_cpu_pct": round(100 * e.self_cpu_time_total / total, 2),
               "cpu_total_ms": round(e.cpu_time_total / 1000, 3)}
        device_time = getattr(e, "self_device_time_total", 0) or 0
        if device_time:
            row["self_device_ms"] = round(device_time / 1000, 3)
        if getattr(e, "flops", 0):
            row["gflop"] = round(e.flops / 1e9, 3)
        rows.append(row)
    return rows


def profiler_activities(device: str) -> list:
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])


def profile_callback(batch_idx: int, device: str, store: dict):
    """Profiles training batch `batch_idx` (listed before the step timer, so it wraps only the step)."""
    from lightning.pytorch.callbacks import Callback

    class _Profile(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, idx):
            if idx == batch_idx:
                store["prof"] = torch.profiler.profile(activities=profiler_activities(device), with_flops=True)
                store["prof"].__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, idx):
            if idx == batch_idx and "prof" in store:
                _sync(device)
                store["prof"].__exit__(None, None, None)

    return _Profile()


# -- measurements ------------------------------------------------------------------------------


def measure_train(module, batch, clips: int, steps: int, args, roof_dtype: torch.dtype, start_roof: float) -> dict:
    """steps: timed steps (after the FLOP-counting and warmup batches)."""
    store: dict = {}
    callbacks = (profile_callback(1, args.device, store),) if args.top_ops else ()
    # Batch 0 counts FLOPs (untimed); batch 1 is profiled (dropped) or a warmup (skipped).
    timer = fit_steps(module, batch, steps + 2, device=args.device, precision=args.precision,
                      roof_dtype=roof_dtype, roof_n=args.roof_n, callbacks=callbacks)
    timer.times.pop(0)
    timer.roofs.pop(0)
    step_s = timer.mean(skip=0)
    out = {
        "gflop_per_step": round(timer.flops / 1e9, 3), "step_s": round(step_s, 4),
        "step_s_median": round(timer.median(skip=0), 4), "timed_steps": len(timer.times),
        "clips_per_s": round(clips / step_s, 3), "achieved_gflops": round(timer.flops / step_s / 1e9, 2),
        "roof_beside_steps_gflops": round(statistics.fmean(timer.roofs), 2),
        "fraction_of_roof": round(timer.fraction_of_roof(skip=0), 4),
        "fraction_of_start_roof": round(timer.flops / step_s / 1e9 / start_roof, 4),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    if "prof" in store:
        out["top_ops"] = top_ops(store["prof"], args.top_ops)
    return out


def measure_sample(backbone, m: dict, args, roof_dtype: torch.dtype, start_roof: float) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from maskvid.models.sampling import SamplingOptions, maskgit_sample

    device = args.device
    backbone = backbone.to(device).eval().requires_grad_(False)  # as `maskvid generate` loads it
    text = torch.randn(1, m["text_len"], m["text_dim"], device=device)
    text_mask = torch.ones(1, m["text_len"], dtype=torch.bool, device=device)
    options = SamplingOptions(steps=args.sample_steps, cfg_scale=3.0)
    dtype = autocast_dtype(args.precision)

    def sample():
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
            generator = torch.Generator(device=device).manual_seed(0)
            return maskgit_sample(backbone, m["grid"], text, text_mask, options, generator)

    sample()  # warmup
    with FlopCounterMode(display=False) as counter:
        sample()
    flops = counter.get_total_flops()
    out: dict = {}
    if args.top_ops:
        with torch.profiler.profile(activities=profiler_activities(device), with_flops=True) as prof:
            sample()
            _sync(device)
        out["top_ops"] = top_ops(prof, args.top_ops)
    times, roofs = [], []
    for _ in range(args.sample_repeats):
        _sync(device)
        start = time.perf_counter()
        sample()
        _sync(device)
        times.append(time.perf_counter() - start)
        roofs.append(matmul_roof(device, roof_dtype, n=args.roof_n, repeats=3))
    seconds = statistics.fmean(times)
    fraction = sum(flops / 1e9 for _ in times) / sum(t * r for t, r in zip(times, roofs))  # time-weighted roof
    return {"steps": args.sample_steps, "cfg": True, "gflop_per_video": round(flops / 1e9, 3),
            "seconds_per_video": round(seconds, 4), "achieved_gflops": round(flops / seconds / 1e9, 2),
            "roof_beside_gflops": round(statistics.fmean(roofs), 2), "fraction_of_roof": round(fraction, 4),
            "fraction_of_start_roof": round(flops / seconds / 1e9 / start_roof, 4),
            "timed_samples": len(times), **out}


def run(args) -> dict:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    t, m = (T1_QUICK, M1_QUICK) if args.quick else (T1, M1)
    roof_dtype = autocast_dtype(args.precision) or torch.float32
    start_roof = matmul_roof(args.device, roof_dtype, n=args.roof_n, repeats=args.roof_repeats)
    result: dict = {
        "benchmark": "mfu", "quick": args.quick, "device": args.device, "precision": args.precision,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "roof": {"dtype": str(roof_dtype).removeprefix("torch."), "n": args.roof_n, "repeats": args.roof_repeats,
                 "gflops_median": round(start_roof, 2)},
        "tokenizer_config": dict(t), "stage2_config": {k: list(v) if isinstance(v, tuple) else v for k, v in m.items()},
        "workloads": {}, "errors": {},
    }
    trained: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads:
            print(f"[mfu] {name} ...", file=sys.stderr, flush=True)
            try:
                torch.manual_seed(0)
                if name.startswith("tokenizer_"):
                    module, batch, clips = tokenizer_job(t, gan=name == "tokenizer_gan")
                    row = measure_train(module, batch, clips, args.tokenizer_steps, args, roof_dtype, start_roof)
                elif name.startswith("stage2_"):
                    kind = name.removeprefix("stage2_")
                    module, batch, clips = stage2_job(kind, m, t, Path(tmp))
                    row = measure_train(module, batch, clips, args.steps, args, roof_dtype, start_roof)
                    row["tokens_per_s"] = round(clips * math.prod(m["grid"]) / row["step_s"], 1)
                    trained[kind] = module.backbone
                else:
                    kind = name.removeprefix("sample_")
                    backbone = trained.get(kind) or make_backbone(kind, m)
                    row = measure_sample(backbone, m, args, roof_dtype, start_roof)
            except Exception as exc:  # one failing workload must not hide the others
                result["errors"][name] = f"{type(exc).__name__}: {exc}"
                print(traceback.format_exc(), file=sys.stderr, flush=True)
                continue
            result["workloads"][name] = row
            print(f"[mfu] {name}: {row['fraction_of_roof']:.1%} of roof", file=sys.stderr, flush=True)
    w = result["workloads"]
    summary = {name: row["fraction_of_roof"] for name, row in w.items()}
    if "tokenizer_recon" in w and "tokenizer_gan" in w:
        summary["tokenizer_gan_over_recon"] = round(w["tokenizer_gan"]["step_s"] / w["tokenizer_recon"]["step_s"], 3)
    result["summary"] = summary
    result["targets"] = {**{f"{k}_fraction_of_roof_min": v for k, v in TARGETS.items()},
                         "tokenizer_gan_over_recon_max": TARGET_GAN_OVER_RECON}
    meets = {k: summary[k] >= v for k, v in TARGETS.items() if k in summary}
    if "tokenizer_gan_over_recon" in summary:
        meets["tokenizer_gan_over_recon"] = summary["tokenizer_gan_over_recon"] <= TARGET_GAN_OVER_RECON
    result["meets_targets"] = meets
    if args.quick:
        result["note"] = "--quick: toy sizes, for checking the code path only; the ratios are not the targets' figures"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS),
                        help="what to measure (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--precision", default="32-true",
                        help="Lightning precision: 32-true (default) or bf16-mixed (autocast; the roof in bf16 then)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per workload (default 4; quick 2)")
    parser.add_argument("--tokenizer-steps", type=int, default=None,
                        help="timed steps of the tokenizer workloads (default 2x --steps: a T1 step is ~5x cheaper "
                             "than an M1 one, and with 4 a single slow step moved the mean by 25 points)")
    parser.add_argument("--sample-steps", type=int, default=18, help="MaskGIT steps per sampled video (default 18)")
    parser.add_argument("--sample-repeats", type=int, default=None, help="timed samples (default 3; quick 1)")
    parser.add_argument("--roof-n", type=int, default=None,
                        help="square matmul side of the roof (default 2048 on CPU, 8192 on CUDA; quick 512)")
    parser.add_argument("--roof-repeats", type=int, default=7, help="roof matmuls at the start; median taken")
    parser.add_argument("--top-ops", type=int, default=0, metavar="N", help="profile one step; list the top N ops")
    parser.add_argument("--quick", action="store_true", help="toy sizes and few steps: a smoke test")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.steps is None:
        args.steps = 2 if args.quick else 4
    if args.tokenizer_steps is None:
        args.tokenizer_steps = 2 * args.steps
    if args.sample_repeats is None:
        args.sample_repeats = 1 if args.quick else 3
    if args.roof_n is None:
        args.roof_n = 512 if args.quick else 8192 if cuda else 2048
    result = run(args)
    emit(result, args.json_out)
    return 1 if result["errors"] and not result["workloads"] else 0


if __name__ == "__main__":
    sys.exit(main())
