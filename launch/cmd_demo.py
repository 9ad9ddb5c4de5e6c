"""Run the whole pipeline in one command, on synthetic data or your shards, and write a report.

Steps, each a real maskvid command run in --out (so the report can print how to reproduce it):

  1. data       maskvid data synthetic (skipped with --train-shards/--val-shards)
  2. check      stream train/val as fit does; previews; oracle accuracy of the val clips
  3. tokenizer  maskvid fit --config configs/experiment/tokenizer_demo.yaml --config configs/trainer/{cpu,gpu}.yaml
  4. tokenize   maskvid data tokenize (train and val)
  5. stage2     maskvid fit --config configs/experiment/{mebt,maskgit}_demo.yaml --config configs/trainer/{cpu,gpu}.yaml
                --data.samples tokens
  6. generate   maskvid generate for the seen and held-out prompts (or --prompts FILE)
  7. score      caption accuracy (oracle), FVD (--i3d-path) and CLIPSIM (--clip-path)
  8. report     OUT/summary.json and a self-contained OUT/report.html

--minutes is shared between the two fits (20% tokenizer, the rest stage 2 including tokenizing;
see BUDGET_SPLIT in launch/demo_pipeline.py); data, generation and scoring are timed apart. The
configs' step counts are scaled to --minutes. The budget is a limit: where the default's step
counts are not reached in time the budget ends a fit, and FitScheduleToTime
(lightning_modules/time_budget.py) shortens its learning-rate schedule to fit, so it still decays
fully. The fits layer configs/trainer/gpu.yaml (one GPU, bf16, TF32) where CUDA is available, else
configs/trainer/cpu.yaml. Stage 2 and generation run in bf16 autocast where the device has native
bf16 (GPUs; CPUs with AMX or AVX512-BF16), else in fp32; on a CPU the tokenizer fit stays fp32.
--cpu-tuning (or MASKVID_CPU_TUNING=1) opts in to host tuning on a CPU: the commands run on a
preloaded tcmalloc, else jemalloc, where installed (MASKVID_ALLOCATOR=auto|tcmalloc|jemalloc|system),
and glibc's malloc keeps freed memory (launch/cpu_tuning.py); with glibc's defaults a long CPU fit
slows down step by step. It is never applied where CUDA is available. Rerun with the same --out to
resume: finished steps are skipped (OUT/steps/*.json) and an interrupted fit continues from its
last checkpoint. A rerun with another --backbone reuses the data, tokenizer and tokens, and
redoes stage 2, generation, scoring and the report.

--recipe learn is the learning check of tests/test_learning.py: 9-frame clips of one object
size, speed and background, tiny fits of fixed step counts (configs/demo/, no time budget, so a
rerun gives the same figures), and 32 prompts asking for every colour and direction equally
often; summary.json holds the oracle's accuracy and the chance level of each attribute.

examples:
  maskvid demo --out runs/demo                     # the default budget, --minutes 40
  maskvid demo --out runs/demo --cpu-tuning        # faster on a CPU where tcmalloc/jemalloc is installed
  maskvid demo --out runs/demo_quick --quick       # smoke run: a few steps per stage
  maskvid demo --out runs/learn --recipe learn     # fixed-step learning check, then --backbone maskgit
  maskvid demo --out runs/demo_phenaki --backbone maskgit
  maskvid demo --out runs/demo_fast --minutes 20   # quicker, weaker models
  maskvid demo --out runs/mine --train-shards shards/mine --val-shards shards/mine_val --prompts prompts.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from maskvid.datamodules.errors import DataError
from maskvid.launch.arg_types import positive_float, positive_int
from maskvid.launch.cmd_data_synthetic import add_variation_arguments
from maskvid.launch.demo_pipeline import DEMO_VARIATION, REFERENCE_MINUTES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"),
                        help="run directory: data, runs, samples, summary.json, report.html (default: runs/demo)")
    parser.add_argument("--minutes", type=positive_float, default=None,
                        help=f"training budget of both fits together (default: {REFERENCE_MINUTES:g}, the budget the demo configs' "
                             "step caps are sized for; 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run under 5 minutes: tiny data, a few steps per stage, 3 prompts per set "
                             "(the same as --recipe quick)")
    parser.add_argument("--recipe", choices=["full", "quick", "learn"], default=None,
                        help="full (default), quick, or learn: the fixed-step learning check (configs/demo/; "
                             "no time budget, so --minutes does not apply)")
    parser.add_argument("--backbone", choices=["mebt", "maskgit"], default="mebt",
                        help="stage-2 model: mebt (default) or maskgit (Phenaki)")
    parser.add_argument("--devices", type=positive_int, default=1,
                        help="processes per fit; >1 adds configs/trainer/ddp.yaml (default: 1)")
    parser.add_argument("--train-shards", metavar="PATTERN", default=None,
                        help="your video shards (`maskvid data shards`): directory, brace pattern or URLs; "
                             "needs --val-shards. Default: render the synthetic dataset")
    parser.add_argument("--val-shards", metavar="PATTERN", default=None, help="your validation shards")
    parser.add_argument("--prompts", type=Path, metavar="FILE", default=None,
                        help="prompts to generate (one per line, or JSONL with 'prompt'); default: the synthetic "
                             "seen and held-out prompts, or your val captions")
    parser.add_argument("--videos-per-prompt", type=positive_int, default=None,
                        help="samples per prompt (default: 2, or 1 with --quick)")
    parser.add_argument("--max-prompts", type=positive_int, default=None,
                        help="prompts used per set (default: all, or 3 with --quick)")
    parser.add_argument("--i3d-path", metavar="PATH", default=None,
                        help="I3D weights for FVD (stage-2 validation and the final score); FVD is null without")
    parser.add_argument("--clip-path", metavar="DIR", default=None,
                        help="local Hugging Face CLIP directory for CLIPSIM; null without")
    add_variation_arguments(parser, DEMO_VARIATION)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the samples (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="only the step lines, not each command's output")
    parser.add_argument("--cpu-tuning", action="store_true", default=None,
                        help="on a CPU, run the commands on a preloaded tcmalloc/jemalloc and tune glibc's malloc "
                             "(default: MASKVID_CPU_TUNING, else off; never with CUDA; launch/cpu_tuning.py)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from maskvid.launch.demo_pipeline import QUICK, RECIPES, DemoPipeline

    if (args.train_shards is None) != (args.val_shards is None):
        raise DataError("--train-shards and --val-shards go together (both your shards, or neither for synthetic data)")
    if args.quick and args.recipe not in (None, "quick"):
        raise DataError(f"--quick is --recipe quick; it does not go with --recipe {args.recipe}")
    recipe = RECIPES["quick" if args.quick else args.recipe or "full"]
    if not recipe.time_budget and args.minutes is not None:
        raise DataError(f"--recipe {args.recipe} fixes its steps, not its minutes: --minutes does not apply")
    if args.videos_per_prompt is not None:
        recipe = replace(recipe, videos_per_prompt=args.videos_per_prompt)
    if args.max_prompts is not None:
        recipe = replace(recipe, max_prompts=args.max_prompts)
    chosen = {k: tuple(v) for k in ("sizes", "speeds", "backgrounds") if (v := getattr(args, k)) is not None}
    if chosen:
        if args.train_shards is not None:
            raise DataError("--sizes/--speeds/--backgrounds shape the synthetic data; they do nothing with --train-shards")
        recipe = replace(recipe, variation=replace(recipe.variation, **chosen))
    minutes = args.minutes if args.minutes is not None else (2.0 if recipe is QUICK else REFERENCE_MINUTES)
    demo = DemoPipeline(args.out, recipe, minutes, backbone=args.backbone, devices=args.devices,
                        train_shards=args.train_shards, val_shards=args.val_shards, prompts=args.prompts,
                        i3d_path=args.i3d_path, clip_path=args.clip_path, seed=args.seed,
                        echo=lambda line: tqdm.write(line), stream_output=not args.quiet,
                        cpu_tuning_flag=args.cpu_tuning)
    demo.preflight()
    if demo.cpu_tuning and demo.allocator == "system" and sys.platform.startswith("linux"):
        print("maskvid demo: note: --cpu-tuning found neither tcmalloc nor jemalloc, so the fits run on glibc's "
              "malloc (tuned). On Debian/Ubuntu, `apt-get install libtcmalloc-minimal4` and the demo preloads it.",
              file=sys.stderr)
    bar = tqdm(total=len(demo.steps()), desc="maskvid demo", unit="step", dynamic_ncols=True)
    try:
        summary = demo.run(progress=bar.update)
    finally:
        bar.close()
    print(json.dumps({k: summary[k] for k in ("checkpoints", "metrics", "seconds")}, indent=1))
    print(f"\ndone. Open {summary['report']} in a browser; summary in {demo.out / 'summary.json'}.\n"
          f"Generate more: maskvid generate --ckpt {summary['checkpoints']['stage2']} "
          f"--prompt \"a red circle moving to the left\" --out samples/")
    return 0
