"""Will a config fit on N GPUs, and how long will a step take? (no GPU needed)

Instantiates the config exactly as `maskvid fit` would (repeated --config, `include:`, overrides),
with fake tensors: no weights are allocated and nothing is downloaded (a stage-1 checkpoint that
does not exist yet is rebuilt from the configs/ C-ViViT with the backbone's vocabulary; a hub T5 is
built from its known architecture). One training step (forward, loss, backward, clipping,
optimizer step, EMA) is traced without and with per-block activation checkpointing, then scaled to
the strategy and world size:

  parameters, tokens per clip, per-GPU peak memory split into parameters, gradients, optimizer
  state and activations (with and without checkpointing), FLOPs per step, and a roofline step
  time and MFU from the GPU's published peak FLOP/s and memory bandwidth, plus communication.

When it does not fit it says so, and what would (checkpointing, FSDP/ZeRO-3, more GPUs, a
smaller batch). The model, its assumptions and its accuracy: docs/plan.md.

examples:
  maskvid plan --config configs/experiment/mebt_demo.yaml --gpus 8 --gpu h100
  maskvid plan --config configs/experiment/mebt_demo.yaml --config configs/trainer/fsdp.yaml --gpus 64 --nodes 8
  maskvid plan --config configs/experiment/tokenizer_demo.yaml --gpus 1 --gpu l40s --json
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from maskvid.launch.plan import GPUS, STRATEGIES

    parser.add_argument("--config", "-c", action="append", required=True, metavar="YAML",
                        help="config file, repeatable and layered like `maskvid fit --config` (include: works)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs in total over all nodes (default 1)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over (sets the network "
                        "bandwidth used for communication; default 1)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100",
                        help="GPU model: published dense peaks and memory are in launch/plan.py (default h100)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=None,
                        help="override the config's trainer.strategy (default: the config's own)")
    parser.add_argument("--checkpointing", choices=("config", "on", "off"), default="config",
                        help="activation checkpointing for the verdict and step time (both are always shown)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: fake tensors (the plan for GPUs); cpu: the same trace on real CPU tensors, "
                        "to check the planner against a measured CPU step")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a LightningCLI override, e.g. --set data.batch_size=4 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    from maskvid.launch.plan import PlanError, format_plan, make_plan, trace_recipe

    if args.gpus < 1 or args.nodes < 1 or args.gpus % args.nodes:
        print("maskvid plan: error: --gpus must be a positive multiple of --nodes", file=sys.stderr)
        return 2
    overrides: list[str] = []
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"maskvid plan: error: --set {item}: expected KEY=VALUE", file=sys.stderr)
            return 2
        overrides += [f"--{key.removeprefix('--')}", value]
    try:
        traces = trace_recipe(args.config, overrides, gpu=args.gpu, strategy=args.strategy, device=args.device)
    except PlanError as exc:
        print(f"maskvid plan: error: {exc}", file=sys.stderr)
        return 2
    ac = None if args.checkpointing == "config" else args.checkpointing == "on"
    plan = make_plan(traces, args.gpu, args.gpus, args.nodes, activation_checkpointing=ac)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0
