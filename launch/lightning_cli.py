"""LightningCLI for `maskvid fit|validate|test|predict`, layered YAML configs included.

    maskvid fit --config configs/data/synthetic.yaml --config configs/trainer/cpu.yaml \
        --model <class_path> [--trainer.max_steps 100 ...]

`--print_config` prints the complete, commented recipe; every option has a docstring.

`--ckpt_path auto` resumes from the run's newest complete checkpoint, or starts fresh (see
launch/requeue.py); inside a SLURM job the preemption signal checkpoints and requeues.
"""

from __future__ import annotations

import sys
from typing import Sequence

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment

from datamodules.monitor import DataMonitor
from datamodules.video_datamodule import VideoDataModule
from launch.config_includes import expand_config_includes
from launch.requeue import SlurmRequeue, find_resume_checkpoint


class MaskvidCLI(LightningCLI):
    """LightningCLI with the video datamodule and maskvid's standing callbacks."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", VideoDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        # A SLURM requeue re-runs the same command into the same directory.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"prog": "maskvid"})
        # `include:` lists in config files expand to repeated --config (see config_includes).
        args = kwargs.get("args")
        if args is None:
            # Rewritten in place: LightningCLI warns when given both args and a non-empty argv.
            sys.argv[1:] = expand_config_includes(sys.argv[1:])
        elif isinstance(args, (list, tuple)):
            kwargs["args"] = expand_config_includes(args)
        super().__init__(**kwargs)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, DataMonitor) for c in trainer.callbacks):
            trainer.callbacks.append(DataMonitor())
        if SLURMEnvironment.detect() and not any(isinstance(c, SlurmRequeue) for c in trainer.callbacks):
            trainer.callbacks.append(SlurmRequeue())
        return trainer

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") == "auto":
            kwargs["ckpt_path"] = find_resume_checkpoint(self.trainer)
            where = kwargs["ckpt_path"] or "nothing to resume: starting fresh"
            if self.trainer.is_global_zero:
                print(f"maskvid: --ckpt_path auto -> {where}", file=sys.stderr, flush=True)
        return kwargs


def run_lightning_cli(argv: Sequence[str]) -> MaskvidCLI:
    """Run a Lightning subcommand (argv[0] is fit/validate/test/predict)."""
    # LightningCLI reads sys.argv itself; passing the same list again only makes it warn.
    args = None if list(argv) == sys.argv[1:] else list(argv)
    return MaskvidCLI(args=args)
