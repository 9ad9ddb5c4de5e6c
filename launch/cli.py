"""`maskvid`: one entry point that dispatches to LightningCLI and to the tool commands.

Commands are registered by module path and imported only when used, so `maskvid --help` and the
data tools start without importing Lightning. A tool module provides:

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int

and its docstring: the first line is the one-line help, the rest the description. A group (like
`data`) is a dict of such modules. Later commands (generate, tokenize, ckpt, eval) register here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from typing import Callable, Optional, Sequence, Union

from maskvid.datamodules.errors import DataError

# Lightning subcommands are handed to LightningCLI untouched (it owns their --help).
LIGHTNING_COMMANDS = {
    "fit": "Train a model: maskvid fit --config A.yaml [--config B.yaml ...] [--trainer.* ...]",
    "validate": "Run one validation pass over the val data with a model or checkpoint",
    "test": "Run the test loop",
    "predict": "Run the predict loop",
}

Command = Union[str, dict[str, str]]
TOOL_COMMANDS: dict[str, Command] = {
    "data": {
        "shards": "maskvid.launch.cmd_data_shards",
        "synthetic": "maskvid.launch.cmd_data_synthetic",
        "preview": "maskvid.launch.cmd_data_preview",
        "tokenize": "maskvid.launch.cmd_data_tokenize",
    },
    "ckpt": {
        "export": "maskvid.launch.cmd_ckpt_export",
        "universal": "maskvid.launch.cmd_ckpt_universal",
    },
    "eval": {
        "fvd": "maskvid.launch.cmd_eval_fvd",
        "real-stats": "maskvid.launch.cmd_eval_real_stats",
        "clipsim": "maskvid.launch.cmd_eval_clipsim",
    },
    "generate": "maskvid.launch.cmd_generate",
    "plan": "maskvid.launch.cmd_plan",
    "demo": "maskvid.launch.cmd_demo",
}
GROUP_HELP = {
    "ckpt": "Checkpoint tools: export any checkpoint to a model directory (safetensors), convert DeepSpeed to universal",
    "data": "Data tools: build shards from your videos, make the synthetic dataset, preview a batch, tokenize",
    "eval": "Evaluation: FVD between video sets, cached real-video statistics, CLIPSIM of generated videos",
}

EPILOG = """\
examples:
  maskvid demo                                   # built-in synthetic pipeline, end to end
  maskvid data shards --videos ~/clips --out shards/mine
  maskvid data synthetic --out data/synthetic
  maskvid generate --ckpt last.ckpt --prompt "a red circle moving left" --out samples/
  maskvid plan --config configs/experiment/mebt_demo.yaml --gpus 8 --gpu h100
  maskvid ckpt export runs/x/checkpoints/last.ckpt --out my_model
  maskvid eval fvd --real data/synthetic/val --fake samples/ --i3d i3d_torchscript.pt
  maskvid validate --config run/config.yaml --ckpt_path last.ckpt --model.init_args.i3d_path i3d.pt
  maskvid data preview --config configs/data/synthetic.yaml --split val
  maskvid fit --config configs/data/synthetic.yaml --config configs/trainer/cpu.yaml --model CLASS_PATH

Each command has its own --help.
"""


def _doc(module_path: str) -> tuple[str, str]:
    doc = (importlib.import_module(module_path).__doc__ or "").strip()
    first, _, rest = doc.partition("\n")
    return first.strip(), textwrap.dedent(rest).strip()


def _add_tool(sub: argparse._SubParsersAction, name: str, module_path: str) -> None:
    helptext, description = _doc(module_path)
    p = sub.add_parser(
        name,
        help=helptext,
        description=f"{helptext}\n\n{description}".strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module = importlib.import_module(module_path)
    module.add_arguments(p)
    p.set_defaults(_run=module.run)


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The tool parser. `only` imports just one top-level command's modules (fast startup)."""
    parser = argparse.ArgumentParser(
        prog="maskvid",
        description="maskvid: train text-to-video models on discrete video tokens "
        "(Phenaki C-ViViT + masked transformer, MeBT) with PyTorch Lightning.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, helptext in LIGHTNING_COMMANDS.items():
        sub.add_parser(name, help=helptext, add_help=False)
    for name, entry in TOOL_COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=GROUP_HELP.get(name, name), add_help=False)
            continue
        if isinstance(entry, str):
            _add_tool(sub, name, entry)
        else:
            group = sub.add_parser(
                name,
                help=GROUP_HELP.get(name, name),
                description=GROUP_HELP.get(name, name),
            )
            group_sub = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            for sub_name, module_path in entry.items():
                _add_tool(group_sub, sub_name, module_path)
    return parser


def _close_process_group() -> None:
    """Lightning destroys only NCCL groups at exit; a gloo group's threads still running while the
    interpreter tears down can abort the process ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from maskvid.launch.cpu_tuning import apply_in_process
        from maskvid.launch.lightning_cli import run_lightning_cli

        apply_in_process()  # opt-in (MASKVID_CPU_TUNING=1), never with CUDA

        try:
            return run_lightning_cli(argv)
        finally:
            _close_process_group()
    only = argv[0] if argv and argv[0] in TOOL_COMMANDS else None
    parser = build_parser(only=only)
    args = parser.parse_args(argv)
    run: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(run(args) or 0)
    except DataError as e:
        print(f"maskvid {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("maskvid: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
