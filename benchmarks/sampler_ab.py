"""Samplers and mask schedules A/B on the demo's data: the oracle's caption accuracy per variant.

1. The demo's synthetic data is rendered and its tokenizer fit (`maskvid demo`'s own steps,
   launch/demo_pipeline.py), for --tokenizer-steps, unless --tokenizer names a checkpoint.
2. Stage 2 (configs/experiment/{backbone}_demo.yaml) is fit once per --train-schedules entry, for
   --stage2-steps each (the training-schedule A/B), unless --stage2 names a checkpoint.
3. Every trained model samples --videos-per-prompt videos for each of --prompts seen prompts with
   every sampler variant below (the same per-video seeds for all), and the synthetic oracle reads
   colour, shape and direction back from the pixels. Each variant reports its accuracy per
   attribute and joint, with n and the binomial standard error, its backbone forwards per video
   (its compute) and its sampling seconds.

    python benchmarks/sampler_ab.py --json-out docs/benchmarks/sampler_ab.json
    python benchmarks/sampler_ab.py --tokenizer runs/demo/runs/tokenizer_demo/checkpoints/last.ckpt \\
        --stage2 runs/demo/runs/mebt_demo/checkpoints/last.ckpt      # sampler A/B of a trained model only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import emit  # noqa: E402

# Each variant's SamplingOptions overrides over the checkpoint's sampler (cfg_scale, temperature
# and noise stay the recipe's). MaskGIT at the recipe's 18 steps, with the random refinement the
# demo recipes use, and draft-and-revise at the official code's revise settings, at equal forwards:
# 18 + 8 = 26 = 18 + 2 sweeps x 4 parts, and 18 + 32 = 50 = 18 + 4 sweeps x 8 parts.
VARIANTS: dict[str, dict] = {
    "maskgit_cosine_18": dict(sampler="maskgit", schedule="cosine", steps=18, refine_steps=0),
    "maskgit_linear_18": dict(sampler="maskgit", schedule="linear", steps=18, refine_steps=0),
    "maskgit_power3_18": dict(sampler="maskgit", schedule="power:3", steps=18, refine_steps=0),
    "maskgit_cosine_18_refine8": dict(sampler="maskgit", schedule="cosine", steps=18, refine_steps=8),
    "maskgit_cosine_18_refine32": dict(sampler="maskgit", schedule="cosine", steps=18, refine_steps=32),
    "dnr_cosine_18_M2x4": dict(sampler="draft_revise", schedule="cosine", steps=18, revise_sweeps=2,
                               revise_partitions=4, revise_temperature=0.7),
    "dnr_cosine_18_M2x4_t0.25": dict(sampler="draft_revise", schedule="cosine", steps=18, revise_sweeps=2,
                                     revise_partitions=4, revise_temperature=0.25),
    "dnr_cosine_18_M4x8": dict(sampler="draft_revise", schedule="cosine", steps=18, revise_sweeps=4,
                               revise_partitions=8, revise_temperature=0.7),
    "dnr_cosine_18_M4x8_t0.25": dict(sampler="draft_revise", schedule="cosine", steps=18, revise_sweeps=4,
                                     revise_partitions=8, revise_temperature=0.25),
    "dnr_cosine_16_boot2_M4x8": dict(sampler="draft_revise", schedule="cosine", steps=16, bootstrap_steps=2,
                                     revise_sweeps=4, revise_partitions=8, revise_temperature=0.7),
}


def standard_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def train(args, out: Path) -> tuple[Path, dict[str, Path], dict]:
    """-> (tokenizer checkpoint, {training schedule: stage-2 checkpoint}, timings)."""
    from maskvid.configs import CONFIG_DIR
    from maskvid.launch.demo_pipeline import DemoPipeline, Recipe

    recipe = Recipe(tokenizer_steps=args.tokenizer_steps, stage2_steps=args.stage2_steps, val_every=None,
                    stage2_val_every=None, limit_val_batches=0, num_val_videos=0, workers=1)
    demo = DemoPipeline(out, recipe, minutes=args.max_minutes, backbone=args.backbone, seed=args.seed,
                        stream_output=False, echo=lambda line: print(line, file=sys.stderr))
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    if not (out / "data/prompts_seen.txt").is_file():
        start = time.perf_counter()
        demo.step_data()
        timings["data_s"] = time.perf_counter() - start
    tokenizer = Path(args.tokenizer) if args.tokenizer else demo.tokenizer_ckpt
    if not tokenizer.is_file():
        start = time.perf_counter()
        demo.step_tokenizer()
        timings["tokenizer_fit_s"] = time.perf_counter() - start
    if not (out / "tokens/val").is_dir():
        start = time.perf_counter()
        for split, shards in (("train", demo.train_shards), ("val", demo.val_shards)):
            demo.maskvid("data", "tokenize", "--tokenizer", str(tokenizer.resolve()), "--shards", shards, "--out",
                         f"tokens/{split}", "--workers", "1", "--overwrite", "--quiet")
        timings["tokenize_s"] = time.perf_counter() - start
    if args.stage2:
        return tokenizer, {"given": Path(args.stage2)}, timings
    models = {}
    config = CONFIG_DIR / f"experiment/{args.backbone}_demo.yaml"
    for schedule in args.train_schedules:
        folder = out / f"runs/stage2_{schedule.replace(':', '')}"
        if not (folder / "checkpoints/last.ckpt").is_file():
            start = time.perf_counter()
            # The recipe's checkpoint folder is moved aside after each fit, so that the next
            # schedule's fit (--ckpt_path auto) starts fresh instead of resuming it.
            demo.maskvid("fit", "--config", str(config), "--data.samples", "tokens", "--data.train_shards",
                         "tokens/train", "--data.val_shards", "tokens/val", "--seed_everything", str(args.seed),
                         "--model.init_args.tokenizer_path", str(tokenizer.resolve()),
                         "--model.init_args.mask_schedule", schedule, "--model.init_args.num_val_videos", "0",
                         *demo._trainer_args(args.stage2_steps, args.max_minutes, None))
            demo.stage2_ckpt.parent.parent.rename(folder)
            timings[f"stage2_fit_{schedule}_s"] = time.perf_counter() - start
        models[schedule] = folder / "checkpoints/last.ckpt"
    return tokenizer, models, timings


def evaluate(ckpt: Path, prompts: list[str], args, results: dict[str, dict], save) -> dict[str, dict]:
    """Fill `results` variant by variant, calling save() after each (a long run keeps what it measured)."""
    import torch

    from maskvid.datamodules.synthetic import parse_caption
    from maskvid.metrics.oracle import ATTRIBUTES, recover, score
    from maskvid.text_to_video import TextToVideo

    torch.manual_seed(0)
    model = TextToVideo.load(ckpt)
    grid = model.grid_for(None)
    jobs = [(i, p, k) for i, p in enumerate(prompts) for k in range(args.videos_per_prompt)]
    for name in args.variants:
        options = model.options(**VARIANTS[name])
        hits = {key: 0 for key in (*ATTRIBUTES, "joint")}
        start = time.perf_counter()
        for first in range(0, len(jobs), args.batch_size):
            batch = jobs[first:first + args.batch_size]
            generators = [model.video_generator(args.seed, i, k) for i, _, k in batch]
            videos = model.decode(model.tokens([p for _, p, _ in batch], grid, options, generators, precision="32"))
            for (_, prompt, _), video in zip(batch, videos):
                for key, hit in score(recover(video.numpy()), parse_caption(prompt)).items():
                    hits[key] += int(hit)
        n = len(jobs)
        results[name] = {
            "options": VARIANTS[name], "forwards_per_video": options.forwards(), "n": n,
            "accuracy": {key: round(h / n, 4) for key, h in hits.items()},
            "stderr": {key: round(standard_error(h / n, n), 4) for key, h in hits.items()},
            "sampling_s": round(time.perf_counter() - start, 1),
        }
        print(f"{ckpt.name} {name}: {results[name]['accuracy']}", file=sys.stderr)
        save()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs/sampler_ab", help="work directory (reruns reuse it)")
    parser.add_argument("--backbone", choices=["mebt", "maskgit"], default="mebt")
    parser.add_argument("--tokenizer", help="a trained tokenizer checkpoint (default: fit one)")
    parser.add_argument("--stage2", help="a trained stage-2 checkpoint: sampler A/B only (default: fit one per schedule)")
    parser.add_argument("--tokenizer-steps", type=int, default=400)
    parser.add_argument("--stage2-steps", type=int, default=300)
    parser.add_argument("--train-schedules", nargs="+", default=["linear"],
                        help="one stage-2 fit per training mask schedule (cosine, linear, power:E)")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="time cap of each fit")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--prompts", type=int, default=32, help="seen prompts sampled (the first N)")
    parser.add_argument("--videos-per-prompt", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                        help="skip the oracle on the tokenizer's reconstructions (the accuracy ceiling)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from maskvid.launch.cmd_generate import read_prompts

    start = time.perf_counter()
    tokenizer, models, timings = train(args, args.out.resolve())
    prompts = read_prompts(args.out / "data/prompts_seen.txt")[: args.prompts]
    report = {
        "benchmark": "sampler_ab", "backbone": args.backbone, "device": "cpu", "threads": torch.get_num_threads(),
        "tokenizer": str(tokenizer), "tokenizer_steps": None if args.tokenizer else args.tokenizer_steps,
        "stage2_steps": None if args.stage2 else args.stage2_steps, "prompts": len(prompts),
        "videos_per_prompt": args.videos_per_prompt, "seed": args.seed,
        "uniform_guess": {"colour": 1 / 8, "shape": 1 / 3, "direction": 1 / 4, "joint": 1 / 96},
        "models": {},
    }
    report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}

    def save() -> None:
        report["wall_s"] = round(time.perf_counter() - start, 1)
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(report, indent=2))

    if args.ceiling:
        from maskvid.launch.demo_checks import reconstruction_accuracy

        # The ceiling: the oracle on the tokenizer's own reconstructions of real val clips.
        report["tokenizer_reconstruction_accuracy"] = reconstruction_accuracy(tokenizer, str(args.out / "tokens/val"))
    for schedule, ckpt in models.items():
        trained = torch.load(ckpt, map_location="cpu", weights_only=False).get("global_step")
        report["models"][schedule] = {"checkpoint": str(ckpt), "trained_steps": trained, "variants": {}}
        evaluate(ckpt, prompts, args, report["models"][schedule]["variants"], save)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    emit(report, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
