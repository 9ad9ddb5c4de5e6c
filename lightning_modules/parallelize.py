"""The `configure_model` of every maskvid LightningModule: hand the module to its trainer's strategy.

Activation checkpointing, compile and sharding are the strategy's business (maskvid's strategies in
launch/strategies.py have `parallelize`), so the modules import nothing from launch/.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn


def parallelize_with_strategy(module: LightningModule) -> None:
    """Let the trainer's strategy checkpoint, compile and shard `module`; without a trainer
    (load_from_checkpoint) there is nothing to do."""
    strategy = module._trainer.strategy if module._trainer is not None else None
    parallelize = getattr(strategy, "parallelize", None)
    if parallelize is not None:
        parallelize(module)
    elif module.hparams.get("compile"):
        rank_zero_warn(f"model.init_args.compile: {type(strategy).__name__} does not compile; use one of "
                       "maskvid.launch.strategies (MaskvidSingleDeviceStrategy on one device). Running uncompiled.")
