"""Text-to-video on the synthetic data, both stages within one time budget, scored by the oracle.

A thin wrapper over `maskvid demo` (the same pipeline, the same commands, the same scoring), run
with the benchmark's settings:

1. the synthetic captioned dataset is rendered (outside the budget);
2. stage 1: `maskvid fit` with configs/experiment/tokenizer_demo.yaml, for its share of --minutes;
3. `maskvid data tokenize` of the train and val shards;
4. stage 2: `maskvid fit` with configs/experiment/{maskgit,mebt}_demo.yaml on the token shards, for
   what is left of --minutes;
5. `maskvid generate`: --videos-per-prompt videos for every seen and every held-out prompt;
6. the synthetic oracle reads colour, shape and direction back from every video.

Target: all-attribute ("joint") accuracy >= 70% on seen prompts (chance < 2%); held-out reported.
The run directory keeps summary.json, report.html (videos, curves) and every command.

    python benchmarks/text_to_video_quality.py                       # 40 minutes of training on a 2-core CPU
    python benchmarks/text_to_video_quality.py --backbone mebt --json-out benchmarks/results/t2v_mebt.json
    python benchmarks/text_to_video_quality.py --full-data    # every size and background
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import emit  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from maskvid.launch.demo_pipeline import REFERENCE_MINUTES

    parser.add_argument("--minutes", type=float, default=REFERENCE_MINUTES,
                        help=f"training budget for both stages, tokenizing included (default: {REFERENCE_MINUTES:g}, "
                             "the demo's default, which its configs' step caps are sized for)")
    parser.add_argument("--videos-per-prompt", type=int, default=4)
    parser.add_argument("--backbone", choices=["maskgit", "mebt"], default="maskgit")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="the demo's output directory (default: runs/t2v_benchmark_BACKBONE); rerunning resumes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the samples")
    parser.add_argument("--full-data", action="store_true",
                        help="render every size and background of the synthetic data, not the demo's large "
                             "objects on black (launch/demo_pipeline.py DEMO_VARIATION)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    run = args.run_dir or REPO / f"runs/t2v_benchmark_{args.backbone}"
    cmd = [sys.executable, "-m", "maskvid.launch.cli", "demo", "--out", str(run), "--backbone", args.backbone,
           "--minutes", str(args.minutes), "--videos-per-prompt", str(args.videos_per_prompt),
           "--seed", str(args.seed), "--quiet"]
    if args.full_data:
        from maskvid.datamodules.synthetic import FULL_VARIATION

        cmd += ["--sizes", *FULL_VARIATION.sizes, "--speeds", *FULL_VARIATION.speeds,
                "--backgrounds", *FULL_VARIATION.backgrounds]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        print(f"maskvid demo failed (exit {proc.returncode}); see {run / 'commands.log'}", file=sys.stderr)
        return proc.returncode
    summary = json.loads((run / "summary.json").read_text())
    seconds = summary["seconds"]
    trained = sum(seconds.get(k, 0.0) for k in ("tokenizer", "tokenize", "stage2"))
    report = {
        "benchmark": "text_to_video_quality", "backbone": args.backbone, "budget_minutes": args.minutes,
        # What the budget covers: both fits and tokenizing (rendering, generating, scoring apart).
        "trained_minutes": round(trained / 60, 2), "wall_minutes": round((time.perf_counter() - start) / 60, 2),
        "timings_s": {k: round(v, 1) for k, v in seconds.items()},
        "tokenizer_psnr": summary["metrics"]["tokenizer_psnr"],
        "caption_accuracy": summary["metrics"]["caption_accuracy"],
        "data_variation": summary["data"]["variation"],
        "checkpoints": summary["checkpoints"], "targets": {"seen_joint_accuracy": 0.7},
        "command": " ".join(cmd[1:]).replace("-m maskvid.launch.cli", "maskvid"), "report": summary["report"],
        "commands_log": summary["commands_log"],
    }
    emit(report, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
