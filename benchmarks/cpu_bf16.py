"""bf16 autocast against fp32 on this machine's CPU, for the demo-size models, in one run.

What `maskvid demo` and `maskvid generate` choose on a CPU with native bf16 (AMX / AVX512-BF16,
maskvid/precision.py): the fits run under bf16 autocast, sampling too, with attention and the
depthwise conv kept in fp32 (their bf16 CPU backward kernels are slow). Measured here, one
precision right after the other, so that this noisy machine's drift cancels in the ratios:

1. matmul throughput at the demo's shapes and at 2048^2 (GFLOP/s);
2. a bare training step (forward, backward, fused AdamW) of the demo MeBT and of the demo maskgit
   (configs/model/{mebt,maskgit}_tiny.yaml backbones, batch 8, 5x8x8 tokens, a mask ratio per clip
   from the training schedule);
3. sampling one batch of 8 videos with the demo's sampler (18 steps, CFG, 32 refinement rounds).

    python benchmarks/cpu_bf16.py
    python benchmarks/cpu_bf16.py --steps 6 --skip-sampling --json-out benchmarks/results/cpu_bf16.json

Steps alternate fp32 / bf16 in rounds; the medians are reported with their ratio. On a CPU without
native bf16 the bf16 figures are emulated and slow: `native_bf16` in the JSON says which.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, matmul_roof  # noqa: E402  (also puts the repo on sys.path and tunes the allocator)

from maskvid.precision import native_bf16  # noqa: E402
from maskvid.models.config import instantiate  # noqa: E402
from maskvid.models.losses import token_cross_entropy  # noqa: E402
from maskvid.models.sampling import mask_ratio  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GRID = (5, 8, 8)


def backbone(name: str) -> torch.nn.Module:
    """The backbone of configs/model/{name}_tiny.yaml."""
    return instantiate(yaml.safe_load((REPO / f"configs/model/{name}_tiny.yaml").read_text())["model"]["init_args"]["backbone"])


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


class Trainer:
    """A bare training step of one backbone, on random tokens with the training mask schedule."""

    def __init__(self, name: str, batch: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.net = backbone(name)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4, fused=True)
        self.batch = batch
        self.gen = torch.Generator().manual_seed(seed)

    def step(self, bf16: bool) -> float:
        b, n = self.batch, GRID[0] * GRID[1] * GRID[2]
        tokens = torch.randint(0, self.net.vocab_size, (b, n), generator=self.gen)
        count = torch.ceil(mask_ratio(torch.rand(b, generator=self.gen)) * n).clamp(min=1)
        masked = torch.rand(b, n, generator=self.gen).argsort(1).argsort(1) < count[:, None]
        inputs = tokens.masked_fill(masked, self.net.mask_id).view(b, *GRID)
        text, text_mask = torch.randn(b, 16, self.net.text_dim), torch.ones(b, 16, dtype=torch.bool)
        start = time.perf_counter()
        with autocast(bf16):
            logits = self.net(inputs, text, text_mask, drop_text=torch.zeros(b, dtype=torch.bool), masked_only=True)
        token_cross_entropy(logits, tokens[masked]).backward()  # as MaskedVideoModule's loss
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def sample_seconds(net: torch.nn.Module, bf16: bool, steps: int, refine: int) -> float:
    from maskvid.models.sampling import SamplingOptions, maskgit_sample

    options = SamplingOptions(steps=steps, cfg_scale=1.5, temperature=0.25, refine_steps=refine)
    text, text_mask = torch.randn(8, 16, net.text_dim), torch.ones(8, 16, dtype=torch.bool)
    net.eval()
    start = time.perf_counter()
    with torch.no_grad(), autocast(bf16):
        maskgit_sample(net, GRID, text, text_mask, options, torch.Generator().manual_seed(0))
    net.train()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", action="append", choices=["mebt", "maskgit"],
                        help="backbones to time (repeatable; default: both)")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per precision and backbone")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps per precision first (kernel set-up)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-sampling", action="store_true", help="leave out the sampling comparison")
    parser.add_argument("--sample-steps", type=int, default=18)
    parser.add_argument("--refine-steps", type=int, default=32)
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    result: dict = {"benchmark": "cpu_bf16", "threads": torch.get_num_threads(), "native_bf16": native_bf16("cpu"),
                    "matmul_gflops": {}, "train_step_s": {}, "sample_batch_s": {}}
    # The demo MeBT's packed matmuls (~2500 tokens x d=256, MLP 1024) and a square roof.
    for m, k, n in ((2560, 256, 1024), (2560, 1024, 256), (2048, 2048, 2048)):
        fp32 = matmul_roof("cpu", torch.float32, repeats=20, shape=(m, k, n))
        bf16 = matmul_roof("cpu", torch.bfloat16, repeats=20, shape=(m, k, n))
        result["matmul_gflops"][f"{m}x{k}x{n}"] = {"fp32": round(fp32, 1), "bf16": round(bf16, 1),
                                                   "bf16_speedup": round(bf16 / fp32, 2)}

    for name in args.backbone or ["mebt", "maskgit"]:
        trainer = Trainer(name, args.batch_size)
        for _ in range(args.warmup):
            trainer.step(False), trainer.step(True)
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(args.steps):  # alternating: drift hits both alike
            times["fp32"].append(trainer.step(False))
            times["bf16"].append(trainer.step(True))
        fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
        result["train_step_s"][name] = {"fp32": round(fp32, 4), "bf16": round(bf16, 4),
                                        "bf16_speedup": round(fp32 / bf16, 3), "steps": args.steps}
        if not args.skip_sampling:
            sample_seconds(trainer.net, True, 2, 0)  # kernel set-up
            fp32 = sample_seconds(trainer.net, False, args.sample_steps, args.refine_steps)
            bf16 = sample_seconds(trainer.net, True, args.sample_steps, args.refine_steps)
            result["sample_batch_s"][name] = {"fp32": round(fp32, 2), "bf16": round(bf16, 2),
                                              "bf16_speedup": round(fp32 / bf16, 3), "videos": 8,
                                              "steps": args.sample_steps, "refine_steps": args.refine_steps}
    emit(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
