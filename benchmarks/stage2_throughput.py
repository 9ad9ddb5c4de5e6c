"""Stage-2 throughput for config M1: train-step tokens/s, peak memory, token-shard vs on-the-fly
tokenization, and sampling time, each against this machine's matmul roof.

M1: 576 tokens (9 latent frames x 8x8, i.e. 17 frames of 64x64 through a T1 tokenizer: p=8, pt=2,
8192 codes), d=512, 8 blocks, 8 heads, text length 16 (MiniLM, 384-d), batch 8.

- train_tokens: real Lightning steps of MaskedVideoModule on token-shard batches (tokens + cached
  text embeddings): the fast path.
- train_video: the same module on video batches, tokenized (T1 tokenizer) and text-encoded on the
  fly each step. speedup = step time ratio.
- sample: one video, 18 MaskGIT steps, CFG with conditional and unconditional passes in one
  batched forward.
FLOPs from torch.utils.flop_counter; the roof (dense fp32 matmul) is measured beside every timed
step/sample. Targets (2-core CPU, fp32): train step >= 75% of the roof, sampling >= 60%.

    python benchmarks/stage2_throughput.py
    python benchmarks/stage2_throughput.py --backbone mebt --json-out benchmarks/results/stage2_mebt.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
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

M1 = dict(grid=(9, 8, 8), vocab=8192, dim=512, depth=8, heads=8, text_len=16, batch=8, frames=17, size=64)


def make_backbone(kind: str):
    if kind == "maskgit":
        from maskvid.models.maskgit import MaskGITBackbone

        return MaskGITBackbone(M1["vocab"], M1["grid"], M1["dim"], M1["depth"], M1["heads"], text_dim=384)
    from maskvid.models.config import instantiate

    return instantiate({"class_path": "maskvid.models.mebt.MeBT", "init_args": {
        "vocab_size": M1["vocab"], "grid": list(M1["grid"]), "dim": M1["dim"], "depth": M1["depth"],
        "heads": M1["heads"], "text_dim": 384}})


def make_module(kind: str, tmp: Path):
    from maskvid.lightning_modules.masked_video_module import MaskedVideoModule
    from maskvid.models.cvivit import CViViT
    from maskvid.models.quantizer import VectorQuantizer
    from maskvid.video_tokenizer import VideoTokenizer

    torch.manual_seed(0)
    tokenizer = CViViT(64, 8, 2, 3, 256, 4, 4, 8, quantizer=VectorQuantizer(M1["vocab"], 32))
    ckpt = VideoTokenizer(tokenizer).save_pretrained(tmp / "t1")
    return MaskedVideoModule(make_backbone(kind), str(ckpt), text_encoder="packaged:minilm",
                             text_max_length=M1["text_len"], warmup_steps=1, num_val_videos=0)


def batches(module) -> tuple[dict, dict]:
    b, (t, h, w) = M1["batch"], M1["grid"]
    captions = [f"a red circle moving left number {i}" for i in range(b)]
    text, text_mask = module.text_encoder(captions)
    tokens = {"tokens": torch.randint(0, M1["vocab"], (b, t, h, w)), "latent_mask": torch.ones(b, t, dtype=torch.bool),
              "text_emb": text.half(), "text_mask": text_mask, "caption": captions}
    video = {"video": torch.rand(b, 3, M1["frames"], M1["size"], M1["size"]) * 2 - 1,
             "frame_mask": torch.ones(b, M1["frames"], dtype=torch.bool), "caption": captions}
    return tokens, video


def worker(kind: str, mode: str, steps: int) -> dict:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        module = make_module(kind, Path(tmp))
        token_batch, video_batch = batches(module)
        rss_before = peak_rss_mib()
        if mode in ("train_tokens", "train_video"):
            batch = token_batch if mode == "train_tokens" else video_batch
            timer = fit_steps(module, batch, steps)
            n_tokens = M1["batch"] * M1["grid"][0] * M1["grid"][1] * M1["grid"][2]
            return {"backbone": kind, "mode": mode, "step_s": round(timer.mean(), 4),
                    "tokens_per_s": round(n_tokens / timer.mean(), 1), "gflop_per_step": round(timer.flops / 1e9, 2),
                    "fraction_of_roof": round(timer.fraction_of_roof(), 3), "peak_rss_mib": round(peak_rss_mib(), 1),
                    "rss_before_mib": round(rss_before, 1)}
        return sample_worker(module, kind, steps)


def sample_worker(module, kind: str, repeats: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from maskvid.models.sampling import SamplingOptions, maskgit_sample

    backbone = module.backbone.eval().requires_grad_(False)  # as `maskvid generate` loads it
    text, text_mask = module.text_encoder(["a red circle moving left"])
    options = SamplingOptions(steps=18, cfg_scale=3.0)

    def sample():
        return maskgit_sample(backbone, M1["grid"], text, text_mask, options, torch.Generator().manual_seed(0))

    sample()  # warmup
    with FlopCounterMode(display=False) as counter:
        sample()
    flops = counter.get_total_flops()
    times, roofs = [], []
    for _ in range(max(2, repeats // 3)):
        start = time.perf_counter()
        sample()
        times.append(time.perf_counter() - start)
        roofs.append(matmul_roof(repeats=3))
    fraction = statistics.fmean(flops / t / 1e9 / r for t, r in zip(times, roofs))
    return {"backbone": kind, "mode": "sample", "seconds_per_video": round(statistics.fmean(times), 3),
            "steps": 18, "cfg": True, "gflop_per_video": round(flops / 1e9, 2), "fraction_of_roof": round(fraction, 3),
            "peak_rss_mib": round(peak_rss_mib(), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=["maskgit", "mebt"], action="append",
                        help="backbone(s) to measure (default: maskgit; repeat for both)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per measurement")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        print(json.dumps(worker(*args._worker, args.steps)))
        return 0
    result = {"benchmark": "stage2_throughput", "config": "M1", **{k: list(v) if isinstance(v, tuple) else v for k, v in M1.items()},
              "roof_gflops_at_start": round(matmul_roof(), 1), "runs": []}
    for kind in args.backbone or ["maskgit"]:
        rows = {}
        for mode in ("train_tokens", "train_video", "sample"):
            proc = subprocess.run([sys.executable, __file__, "--_worker", kind, mode, "--steps", str(args.steps)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            if proc.returncode != 0:
                raise RuntimeError(f"{kind}/{mode} failed:\n{proc.stderr[-3000:]}")
            rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            result["runs"].append(rows[mode])
            print(json.dumps(rows[mode]), file=sys.stderr, flush=True)
        result[f"{kind}_token_shard_speedup"] = round(rows["train_video"]["step_s"] / rows["train_tokens"]["step_s"], 2)
    result["targets"] = {"train_fraction_of_roof": {"maskgit": 0.75, "mebt": 0.65}, "sample_fraction_of_roof": 0.6,
                         "token_shard_speedup": 5.0}
    emit(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
