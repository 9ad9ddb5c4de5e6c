"""LightningCLI for `maskvid fit|validate|test|predict`, layered YAML configs included.

    maskvid fit --config configs/data/synthetic.yaml --config configs/trainer/cpu.yaml \
        --model <class_path> [--trainer.max_steps 100 ...]

`--print_config` prints the complete, commented recipe; every option has a docstring.

`--ckpt_path auto` resumes from the run's newest complete checkpoint, or starts fresh (see
launch/requeue.py); inside a SLURM job the preemption signal checkpoints and requeues, outside one
SIGTERM checkpoints and exits cleanly (launch/preemption.py).

Unless `trainer.logger` says otherwise, a run logs to TensorBoard and to a CSV file, both in
`<default_root_dir>/lightning_logs/version_N/` (launch/run_loggers.py; W&B by adding
configs/logger/wandb.yaml, see docs/logging.md).

Every run also gets atomic, verified checkpoints (launch/checkpoint_io.py), non-finite step
skipping (lightning_modules/nonfinite.py) and step-derived RNG seeds (lightning_modules/step_seed.py).
Before anything is written, the model is checked against the data and the strategy, and a config
mistake ends the command with one line naming the option, exit status 2 (launch/cli_errors.py).
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Sequence

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment

from maskvid.datamodules.monitor import DataMonitor
from maskvid.datamodules.video_datamodule import VideoDataModule
from maskvid.launch.checkpoint_io import AtomicCheckpointIO, refused_pickle
from maskvid.checkpoint_files import verify_checkpoint
from maskvid.launch.cli_errors import explain, report
from maskvid.launch.config_includes import expand_config_includes
from maskvid.launch.preemption import TerminationCheckpoint
from maskvid.launch.requeue import SlurmRequeue, find_resume_checkpoint
from maskvid.launch.run_loggers import DEFAULT_LOGGERS, resolve_loggers
from maskvid.lightning_modules.nonfinite import NonFiniteGuard
from maskvid.lightning_modules.step_seed import StepSeed

# --ckpt_path values Lightning resolves itself (not paths).
_CKPT_KEYWORDS = ("auto", "last", "best", "hpc", "registry")


class MaskvidCLI(LightningCLI):
    """LightningCLI with the video datamodule and maskvid's standing callbacks."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", VideoDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        # A SLURM requeue re-runs the same command into the same directory.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Parse errors raise instead of printing a page of usage: run_lightning_cli prints one line.
        kwargs.setdefault("parser_kwargs", {"prog": "maskvid", "exit_on_error": False})
        # `include:` lists in config files expand to repeated --config (see config_includes).
        args = kwargs.get("args")
        if args is None:
            # Rewritten in place: LightningCLI warns when given both args and a non-empty argv.
            sys.argv[1:] = expand_config_includes(sys.argv[1:])
        elif isinstance(args, (list, tuple)):
            kwargs["args"] = expand_config_includes(args)
        self._as_written = None
        super().__init__(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # A list default: `--print_config` shows it, and `logger+:` in a config file adds to it.
        parser.set_defaults({"trainer.logger": DEFAULT_LOGGERS})

    def before_instantiate_classes(self) -> None:
        # The loggers are built from a copy with their directory and shared version filled in;
        # config.yaml keeps the config as written, so running it again starts a new version
        # instead of writing over this one's metrics.csv.
        self._as_written = self.config
        self.config = self.config.clone()
        trainer = self.config[self.subcommand]["trainer"] if self.subcommand else self.config["trainer"]
        trainer["logger"] = resolve_loggers(trainer.get("logger"), trainer.get("default_root_dir"))

    def instantiate_trainer(self, **kwargs):
        if self._as_written is not None:
            self.config = self._as_written  # what SaveConfigCallback records
        trainer = super().instantiate_trainer(**kwargs)
        standing = [DataMonitor, NonFiniteGuard, StepSeed]
        standing.append(SlurmRequeue if SLURMEnvironment.detect() else TerminationCheckpoint)
        for kind in standing:
            if not any(isinstance(c, kind) for c in trainer.callbacks):
                trainer.callbacks.append(kind())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _parse_ckpt_path(self) -> None:
        # Checked before LightningCLI reads its hyperparameters, so a broken file is one clear line.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in _CKPT_KEYWORDS and "://" not in str(ckpt_path):
            if not Path(ckpt_path).exists():
                raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint")
            verify_checkpoint(ckpt_path)
        try:
            super()._parse_ckpt_path()  # torch.load(weights_only=True) of its hyperparameters
        except pickle.UnpicklingError as exc:
            raise refused_pickle(ckpt_path, exc) from None

    def _preflight(self) -> None:
        """Config checks that need the instantiated model, data and strategy, run before the
        trainer writes anything (config.yaml, logs, checkpoints)."""
        check_data = getattr(self.model, "check_data", None)
        if check_data is not None and self.datamodule is not None:
            check_data(self.datamodule)
        check_module = getattr(self.trainer.strategy, "check_module", None)
        if check_module is not None:
            check_module(self.model)

    def before_fit(self) -> None:
        self._preflight()

    def before_validate(self) -> None:
        self._preflight()

    def before_test(self) -> None:
        self._preflight()

    def before_predict(self) -> None:
        self._preflight()

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") == "auto":
            kwargs["ckpt_path"] = find_resume_checkpoint(self.trainer)
            where = kwargs["ckpt_path"] or "nothing to resume: starting fresh"
            if self.trainer.is_global_zero:
                print(f"maskvid: --ckpt_path auto -> {where}", file=sys.stderr, flush=True)
        return kwargs


def run_lightning_cli(argv: Sequence[str]) -> int:
    """Run a Lightning subcommand (argv[0] is fit/validate/test/predict); the exit status."""
    # LightningCLI reads sys.argv itself; passing the same list again only makes it warn.
    args = None if list(argv) == sys.argv[1:] else list(argv)
    try:
        MaskvidCLI(args=args)
    except Exception as exc:  # noqa: BLE001 - user errors become one line, bugs keep their traceback
        message = explain(exc)
        if message is None:
            raise
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        line = report(exc, message, argv[0] if argv else "fit", int(getattr(rank_zero_only, "rank", 0) or 0))
        if line is not None:
            print(line, file=sys.stderr, flush=True)
        return 2
    return 0
