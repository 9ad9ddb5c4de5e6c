"""The README's recipe table from `maskvid plan`: every base recipe (configs/experiment/*_base*.yaml),
its parameters, tokens per clip, and per-GPU memory and estimated step time at 1, 8 and 64 H100s
(8 per node) under the recipe's own strategy (DDP when it names none). Prints JSON, then writes the
markdown table to docs/benchmarks/plan_table.md.

    python -m benchmarks.plan_table [--gpu h100] [--out docs/benchmarks/plan_table.md] [CONFIG ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZES = (1, 8, 64)
GPUS_PER_NODE = 8


def rows(configs: list[Path], gpu: str) -> list[dict]:
    from maskvid.launch.plan import make_plan, trace_recipe

    out = []
    for config in configs:
        start = time.perf_counter()
        traces = trace_recipe([str(config)], gpu=gpu)
        row = {"config": str(config.relative_to(REPO)), "trace_seconds": round(time.perf_counter() - start, 1)}
        for n in WORLD_SIZES:
            plan = make_plan(traces, gpu, n, nodes=max(1, n // GPUS_PER_NODE))
            row.setdefault("stage", plan.stage)
            row.setdefault("parameters", plan.parameters)
            row.setdefault("tokens_per_clip", plan.tokens_per_clip)
            row.setdefault("batch_per_gpu", plan.batch_per_gpu)
            row.setdefault("clip", plan.clip)
            row[f"gpus_{n}"] = {"strategy": plan.strategy, "memory_gib": round(plan.memory_gib["total"], 2),
                                "memory_gib_checkpointed": round(plan.memory_gib_checkpointed, 2),
                                "fits": plan.fits, "step_ms": round(plan.step_seconds * 1e3, 1),
                                "communication_ms": round(plan.communication_seconds * 1e3, 1),
                                "mfu": round(plan.mfu, 3), "tflop_per_gpu": round(plan.flops_per_step / 1e12, 2)}
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def markdown(table: list[dict], gpu: str) -> str:
    head = ["recipe", "stage", "params (trainable / frozen)", "clip", "tokens/clip", "batch/GPU"]
    head += [f"{n}x {gpu.upper()}: GiB/GPU, step ms" for n in WORLD_SIZES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        p = r["parameters"]
        cells = [f"`{r['config']}`", str(r["stage"]), f"{(p['trainable']) / 1e6:.0f}M / {p['frozen'] / 1e6:.0f}M",
                 r["clip"], str(r["tokens_per_clip"]), str(r["batch_per_gpu"])]
        for n in WORLD_SIZES:
            g = r[f"gpus_{n}"]
            fit = "" if g["fits"] else " (does not fit)"
            cells.append(f"{g['memory_gib']:.1f}{fit}, {g['step_ms']:.0f} ms ({g['strategy']}, MFU {g['mfu'] * 100:.0f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", type=Path, help="recipes (default: configs/experiment/*_base*.yaml)")
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--out", type=Path, default=REPO / "docs/benchmarks/plan_table.md")
    args = parser.parse_args()
    configs = [c.resolve() for c in args.configs] or sorted((REPO / "configs/experiment").glob("*_base*.yaml"))
    table = rows(configs, args.gpu)
    print(json.dumps({"gpu": args.gpu, "rows": table}, indent=1))
    text = markdown(table, args.gpu)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        f"Per-GPU peak memory and estimated step time from `maskvid plan` (`python -m benchmarks.plan_table`), "
        f"{args.gpu.upper()}, 8 GPUs per node, the recipe's strategy, activation checkpointing as configured. "
        "Estimates, not measurements: docs/plan.md says how they are made and how far to trust them.\n\n" + text)


if __name__ == "__main__":
    main()
