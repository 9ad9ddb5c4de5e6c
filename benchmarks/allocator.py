"""glibc's malloc against jemalloc and tcmalloc over a long run of the demo MeBT's training step.

With glibc (with the mallopt tuning of launch/cpu_tuning.py) the demo's stage-2 step got slower the
longer a fit ran: the tensors change size every step (MeBT's packed sets, the mask ratio drawn per
clip) and the heap fragments. This runs the bare step of configs/model/mebt_tiny.yaml (batch 8,
5x8x8 tokens, a mask ratio per clip from the training schedule, bf16 autocast where the CPU has
native bf16, as the demo trains) for --steps steps in one child process per allocator, one after the
other, and reports the median step time of the first and the last --window steps of each.

    python benchmarks/allocator.py                      # 600 steps per allocator (~4 minutes each here)
    python benchmarks/allocator.py --steps 200 --allocators system jemalloc

Allocators that are not installed are reported as such (Debian/Ubuntu: apt-get install libjemalloc2
libtcmalloc-minimal4). `maskvid demo --cpu-tuning` preloads the first of tcmalloc, jemalloc it
finds (launch/cpu_tuning.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402  (also puts the repo on sys.path)

from maskvid.launch.cpu_tuning import AllocatorError, child_env  # noqa: E402


def worker(steps: int, batch: int) -> None:
    """Child: time every step and print the list as JSON."""
    from cpu_bf16 import Trainer

    from maskvid.precision import native_bf16

    bf16 = native_bf16("cpu")
    trainer = Trainer("mebt", batch)
    times = [trainer.step(bf16) for _ in range(steps)]
    print(json.dumps({"bf16": bf16, "times": times}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps per allocator")
    parser.add_argument("--window", type=int, default=100, help="steps in the first and the last window")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--allocators", nargs="+", default=["system", "tcmalloc", "jemalloc"],
                        choices=["system", "tcmalloc", "jemalloc"])
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.batch_size)
        return 0
    if args.steps < 2 * args.window or args.window < 1:
        parser.error("--steps must be at least twice --window, and --window >= 1")

    result: dict = {"benchmark": "allocator", "steps": args.steps, "window": args.window, "allocators": {}}
    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    for kind in args.allocators:
        try:
            env, chosen = child_env(base, kind)
        except AllocatorError as exc:
            result["allocators"][kind] = {"skipped": str(exc)}
            continue
        proc = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(args.steps),
                               "--batch-size", str(args.batch_size)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            result["allocators"][kind] = {"failed": proc.stderr.strip()[-500:]}
            continue
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        times = out["times"]
        first, last = statistics.median(times[: args.window]), statistics.median(times[-args.window:])
        result["allocators"][kind] = {"preloaded": env.get("LD_PRELOAD"), "bf16": out["bf16"],
                                      "first_window_step_s": round(first, 4), "last_window_step_s": round(last, 4),
                                      "slowdown_last_over_first": round(last / first, 3),
                                      "total_s": round(sum(times), 1)}
    ok = {k: v for k, v in result["allocators"].items() if "total_s" in v}
    if "system" in ok:
        for kind, row in ok.items():
            if kind != "system":
                row["speedup_over_system"] = round(ok["system"]["total_s"] / row["total_s"], 3)
    emit(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
