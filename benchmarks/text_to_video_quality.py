"""Text-to-video on the synthetic data, both stages, within one time budget, scored by the oracle.

1. stage 1: `maskvid fit` with configs/experiment/tokenizer_demo.yaml for --tokenizer-minutes;
2. `maskvid data tokenize` of the train and val shards with that tokenizer;
3. stage 2: `maskvid fit` with configs/experiment/maskgit_demo.yaml (or --backbone mebt) on the
   token shards, for what is left of --minutes (generation and scoring come after, timed apart);
4. `maskvid generate` of --videos-per-prompt videos for every seen and every held-out prompt;
5. the synthetic oracle reads colour, shape and direction back from every video.
Target: all-attribute ("joint") accuracy >= 70% on seen prompts (chance < 2%); held-out reported.

    python benchmarks/text_to_video_quality.py                       # 40 minutes on a 2-core CPU
    python benchmarks/text_to_video_quality.py --minutes 10 --json-out benchmarks/results/t2v.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import emit  # noqa: E402

from launch.demo_checks import oracle_accuracy  # noqa: E402
from launch.demo_pipeline import BUDGET_SPLIT  # noqa: E402  (the same split as `maskvid demo`)


def maskvid(*args: str, log: Path) -> float:
    """Run a real `maskvid` command in the run directory (where the demo configs' relative
    runs/... paths land); returns its wall time. Output goes to `log`."""
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ maskvid {' '.join(args)}\n")
        f.flush()
        proc = subprocess.run([sys.executable, "-m", "launch.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                              cwd=log.parent, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError(f"maskvid {args[0]} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def hms(minutes: float) -> str:
    seconds = max(60, int(minutes * 60))
    return f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=40.0, help="training budget for both stages (tokenizing included)")
    parser.add_argument("--tokenizer-minutes", type=float, default=None, help=f"stage-1 minutes (default: {100 * BUDGET_SPLIT['tokenizer']:.0f}%% of --minutes, as in `maskvid demo`)")
    parser.add_argument("--videos-per-prompt", type=int, default=4)
    parser.add_argument("--backbone", choices=["maskgit", "mebt"], default="maskgit")
    parser.add_argument("--data", type=Path, default=REPO / "data/synthetic", help="synthetic dataset (built if absent)")
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs/t2v_benchmark")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    run = args.run_dir
    run.mkdir(parents=True, exist_ok=True)
    log = run / "commands.log"
    timings = {}
    if not (args.data / "train").is_dir():
        timings["data_s"] = maskvid("data", "synthetic", "--out", str(args.data), "--quiet", log=log)
    start = time.perf_counter()  # the budget covers the two stages, not rendering the dataset
    tok_minutes = args.tokenizer_minutes or BUDGET_SPLIT["tokenizer"] * args.minutes
    timings["tokenizer_s"] = maskvid(
        "fit", "--config", str(REPO / "configs/experiment/tokenizer_demo.yaml"),
        "--data.train_shards", str(args.data / "train"), "--data.val_shards", str(args.data / "val"),
        "--trainer.max_time", hms(tok_minutes), "--trainer.enable_progress_bar", "false", log=log)
    # Where the demo config's checkpoint callback writes, and where maskgit_demo.yaml reads it.
    tok_ckpt = run / "runs/tokenizer_demo/checkpoints/last.ckpt"
    tokens = run / "tokens"
    timings["tokenize_s"] = 0.0
    for split in ("train", "val"):
        timings["tokenize_s"] += maskvid(
            "data", "tokenize", "--tokenizer", str(tok_ckpt), "--shards", str(args.data / split),
            "--out", str(tokens / split), "--overwrite", "--quiet", log=log)
    elapsed = (time.perf_counter() - start) / 60
    stage2_minutes = max(1.0, args.minutes - elapsed)
    name = f"{args.backbone}_demo"
    timings["stage2_s"] = maskvid(
        "fit", "--config", str(REPO / f"configs/experiment/{name}.yaml"), "--data.samples", "tokens",
        "--data.train_shards", str(tokens / "train"), "--data.val_shards", str(tokens / "val"),
        "--trainer.max_time", hms(stage2_minutes), "--trainer.enable_progress_bar", "false", log=log)
    s2_ckpt = run / f"runs/{name}/checkpoints/last.ckpt"
    results = {}
    timings["generate_s"] = 0.0
    for split in ("seen", "heldout"):
        out = run / f"generated_{split}"
        timings["generate_s"] += maskvid(
            "generate", "--ckpt", str(s2_ckpt), "--prompts", str(args.data / f"prompts_{split}.txt"),
            "--videos-per-prompt", str(args.videos_per_prompt), "--batch-size", "16", "--out", str(out), "--quiet",
            log=log)
        results[split] = oracle_accuracy(out / "index.json")  # the same scoring as `maskvid demo`
    total = time.perf_counter() - start
    report = {
        "benchmark": "text_to_video_quality", "backbone": args.backbone, "budget_minutes": args.minutes,
        "total_minutes": round(total / 60, 2), "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "caption_accuracy": results, "checkpoints": {"tokenizer": str(tok_ckpt), "stage2": str(s2_ckpt)},
        "targets": {"seen_joint_accuracy": 0.7}, "commands_log": str(log),
    }
    emit(report, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
