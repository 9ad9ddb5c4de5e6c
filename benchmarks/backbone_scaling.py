"""maskgit (full attention) against mebt (latent bottleneck) as videos get longer.

Same width and depth (d=512, 8 layers, 8 heads, 8x8 tokens per latent frame, text length 16,
batch 1) at 17, 33, 65 and 129 frames (9, 17, 33, 65 latent frames: 576 to 4160 tokens). Each
point runs in its own process (clean peak memory, a time limit): a training step of the backbone
(forward, masked cross-entropy at a 50% mask, backward, AdamW) and sampling one video in 16 MaskGIT
steps with CFG. Prints JSON and writes a PNG plot.

Memory is reported twice: the peak-RSS growth of the training step (weights' gradients and AdamW
state included, which do not depend on length) and the exact bytes autograd saves for backward
(the length-dependent part).

Targets: MeBT's per-token time and memory grow at most 1.3x from 17 to 129 frames; at 129 frames
its peak memory is at most 1/4 and its step time at most 1/3 of maskgit's, and it samples at
least 3x faster. A maskgit point that exceeds the time limit or memory is reported as such.

    python benchmarks/backbone_scaling.py
    python benchmarks/backbone_scaling.py --frames 17 65 --timeout 300 --plot benchmarks/results/scaling.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from common import emit, peak_rss_mib  # noqa: E402

WIDTH = dict(dim=512, depth=8, heads=8, vocab=8192, text_len=16, text_dim=384, latents=256)


def build(kind: str, t: int):
    from maskvid.models.maskgit import MaskGITBackbone
    from maskvid.models.mebt import MeBT

    w = WIDTH
    if kind == "maskgit":
        return MaskGITBackbone(w["vocab"], (t, 8, 8), w["dim"], w["depth"], w["heads"], text_dim=w["text_dim"])
    # Same total depth: depth/2 encoder + depth/2 decoder layers.
    return MeBT(w["vocab"], (t, 8, 8), w["dim"], w["depth"] // 2, w["depth"] // 2, w["heads"], w["latents"], w["text_dim"])


def worker(kind: str, frames: int, steps: int) -> dict:
    from maskvid.models.losses import token_cross_entropy
    from maskvid.models.sampling import SamplingOptions, maskgit_sample

    torch.manual_seed(0)
    t = 1 + (frames - 1) // 2
    net = build(kind, t)
    optimizer = torch.optim.AdamW(net.parameters(), 1e-4, fused=True)
    tokens = torch.randint(0, WIDTH["vocab"], (1, t, 8, 8))
    masked = torch.rand(tokens.shape) < 0.5
    inputs = torch.where(masked, torch.full_like(tokens, net.mask_id), tokens)
    text, text_mask = torch.randn(1, WIDTH["text_len"], WIDTH["text_dim"]), torch.ones(1, WIDTH["text_len"], dtype=torch.bool)
    rss_before = peak_rss_mib()
    times = []
    saved_mib = saved_activation_mib(net, lambda: net(inputs, text, text_mask, masked_only=True))
    for _ in range(steps + 1):
        start = time.perf_counter()
        # The loss as MaskedVideoModule computes it: logits of the masked positions only.
        logits = net(inputs, text, text_mask, masked_only=True)
        loss = token_cross_entropy(logits, tokens[masked])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    train_peak = peak_rss_mib()
    net.eval().requires_grad_(False)
    start = time.perf_counter()
    maskgit_sample(net, (t, 8, 8), text, text_mask, SamplingOptions(steps=16, cfg_scale=3.0), torch.Generator().manual_seed(0))
    sample_s = time.perf_counter() - start
    step_s = statistics.fmean(times[1:])
    n = t * 64
    return {"backbone": kind, "frames": frames, "latent_frames": t, "tokens": n, "step_s": round(step_s, 3),
            "step_ms_per_token": round(1000 * step_s / n, 4), "peak_rss_mib": round(train_peak, 1),
            "train_mem_mib": round(train_peak - rss_before, 1), "train_mem_kib_per_token": round(1024 * (train_peak - rss_before) / n, 2),
            "saved_activations_mib": round(saved_mib, 1), "saved_activations_kib_per_token": round(1024 * saved_mib / n, 2),
            "sample_s": round(sample_s, 2)}


def saved_activation_mib(net: torch.nn.Module, forward) -> float:
    """MiB of the tensors autograd keeps for backward in one forward (unique storages, parameters
    excluded): the part of training memory that grows with video length, exactly and without
    allocator noise. Peak RSS also holds the weights, gradients and AdamW state, which do not."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values()) / 2**20


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for kind, colour in (("maskgit", "C0"), ("mebt", "C1")):
        ok = [r for r in rows if r["backbone"] == kind and "step_s" in r]
        frames = [r["frames"] for r in ok]
        axes[0].plot(frames, [r["step_s"] for r in ok], "o-", color=colour, label=kind)
        axes[1].plot(frames, [r["train_mem_mib"] / 1024 for r in ok], "o-", color=colour, label=f"{kind} step (RSS)")
        axes[1].plot(frames, [r["saved_activations_mib"] / 1024 for r in ok], "s--", color=colour,
                     label=f"{kind} saved activations")
        axes[2].plot(frames, [r["sample_s"] for r in ok], "o-", color=colour, label=kind)
    for ax, title in zip(axes, ("train step (s)", "train memory (GiB)", "sample, 16 steps + CFG (s)")):
        ax.set(xlabel="frames", title=title, xscale="log", yscale="log")
        ax.set_xticks([17, 33, 65, 129], labels=["17", "33", "65", "129"])
        # A log axis also labels its minor ticks (2x10^1 ...), which overprint the frame counts.
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 33, 65, 129])
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per point (after one warmup)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per point before it is reported as timed out")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks/results/backbone_scaling.png")
    parser.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        print(json.dumps(worker(args._worker[0], int(args._worker[1]), args.steps)))
        return 0
    rows = []
    for kind in ("mebt", "maskgit"):
        for frames in args.frames:
            cmd = [sys.executable, __file__, "--_worker", kind, str(frames), "--steps", str(args.steps)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                      env={**os.environ, "PYTHONPATH": str(REPO)})
            except subprocess.TimeoutExpired:
                rows.append({"backbone": kind, "frames": frames, "status": f"timed out after {args.timeout:.0f} s"})
                continue
            if proc.returncode != 0:
                reason = "out of memory" if proc.returncode in (-9, 137) else f"failed: {proc.stderr.strip()[-300:]}"
                rows.append({"backbone": kind, "frames": frames, "status": reason})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result: dict = {"benchmark": "backbone_scaling", **WIDTH, "batch": 1, "points": rows}
    by = {(r["backbone"], r["frames"]): r for r in rows if "step_s" in r}
    lo, hi = min(args.frames), max(args.frames)
    if ("mebt", lo) in by and ("mebt", hi) in by:
        a, b = by[("mebt", lo)], by[("mebt", hi)]
        result["mebt_per_token_time_growth"] = round(b["step_ms_per_token"] / a["step_ms_per_token"], 2)
        result["mebt_per_token_memory_growth"] = round(b["train_mem_kib_per_token"] / max(a["train_mem_kib_per_token"], 1e-9), 2)
        result["mebt_per_token_activation_growth"] = round(
            b["saved_activations_kib_per_token"] / max(a["saved_activations_kib_per_token"], 1e-9), 2)
    if ("mebt", hi) in by and ("maskgit", hi) in by:
        m, g = by[("mebt", hi)], by[("maskgit", hi)]
        result[f"at_{hi}_frames"] = {"memory_ratio_mebt_over_maskgit": round(m["train_mem_mib"] / g["train_mem_mib"], 3),
                                    "activation_ratio_mebt_over_maskgit": round(m["saved_activations_mib"] / g["saved_activations_mib"], 3),
                                    "step_time_ratio_mebt_over_maskgit": round(m["step_s"] / g["step_s"], 3),
                                    "sampling_speedup_mebt": round(g["sample_s"] / m["sample_s"], 2)}
    result["targets"] = {"mebt_per_token_growth_max": 1.3, "memory_ratio_max": 0.25, "step_time_ratio_max": 1 / 3,
                         "sampling_speedup_min": 3.0}
    plot(rows, args.plot)
    result["plot"] = str(args.plot)
    emit(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
