"""The loggers a `maskvid fit` gets unless its config says otherwise: TensorBoard (curves, media
and videos) and a plain CSV beside it for scripts (the demo report, tests), both in
`<trainer.default_root_dir>/lightning_logs/version_N/`.

`save_dir` left unset means the run's directory; MaskvidCLI fills it, and gives the loggers that
share a directory one version number (each would otherwise pick the next free one itself, and the
second would find the first one's directory taken).
"""

from __future__ import annotations

import os
import re
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Optional

from jsonargparse import Namespace
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


class RunTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger writing into the run's directory, without the placeholder hp_metric."""

    def __init__(self, save_dir: Optional[str] = None, default_hp_metric: bool = False, **kwargs: Any) -> None:
        """
        Args:
            save_dir: Where `<name>/version_N/` goes; unset: the run's `trainer.default_root_dir`.
            default_hp_metric: Log Lightning's constant `hp_metric` placeholder curve.
        """
        super().__init__(os.getcwd() if save_dir is None else save_dir, default_hp_metric=default_hp_metric, **kwargs)


class RunCSVLogger(CSVLogger):
    """CSVLogger writing `metrics.csv` into the run's directory."""

    def __init__(self, save_dir: Optional[str] = None, **kwargs: Any) -> None:
        """
        Args:
            save_dir: Where `<name>/version_N/` goes; unset: the run's `trainer.default_root_dir`.
        """
        super().__init__(os.getcwd() if save_dir is None else save_dir, **kwargs)


class LoggerConfigError(ValueError):
    """A configured logger that cannot be built here (its package is missing)."""


# `trainer.logger`'s default: what `--print_config` shows and `logger+:` in a config appends to.
DEFAULT_LOGGERS = [
    {"class_path": f"{__name__}.RunTensorBoardLogger"},
    {"class_path": f"{__name__}.RunCSVLogger"},
]


def next_version(root: Path) -> int:
    """The first `version_N` number after those already under root (0 when there are none)."""
    taken = [int(m.group(1)) for p in (root.iterdir() if root.is_dir() else ())
             if (m := re.fullmatch(r"version_(\d+)", p.name)) and p.is_dir()]
    return max(taken, default=-1) + 1


def _class(class_path: str) -> Optional[type]:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(import_module(module), name)
    except (ImportError, AttributeError):
        return None


def resolve_loggers(logger: Any, default_root_dir: Optional[str]) -> Any:
    """A parsed `trainer.logger` value ready to instantiate: `true` becomes the default loggers,
    an unset `save_dir` of the run loggers the run's directory, and the TensorBoard/CSV loggers
    sharing a directory without a version one shared `version_N`. Modifies `logger` in place."""
    root = default_root_dir or os.getcwd()
    if logger is True:
        logger = [Namespace(class_path=d["class_path"], init_args=Namespace()) for d in DEFAULT_LOGGERS]
    entries = logger if isinstance(logger, list) else [logger]
    unversioned: dict[Path, list[Namespace]] = {}
    for entry in entries:
        if not isinstance(entry, Namespace) or "class_path" not in entry:
            continue
        cls = _class(entry.class_path)
        if cls is not None and cls.__name__ == "WandbLogger" and find_spec("wandb") is None:
            raise LoggerConfigError(f"trainer.logger: {entry.class_path} needs the wandb package: "
                                    "pip install 'maskvid[wandb]' (or leave out configs/logger/wandb.yaml)")
        if cls is None or not issubclass(cls, (TensorBoardLogger, CSVLogger)):
            continue
        args = entry.get("init_args") or Namespace()
        entry.init_args = args
        if args.get("save_dir") is None:
            args.save_dir = root
        if args.get("version") is None and "://" not in str(args.save_dir):  # remote stores pick their own
            name = args.get("name", "lightning_logs")
            unversioned.setdefault(Path(args.save_dir) / (name or ""), []).append(args)
    for directory, group in unversioned.items():
        version = next_version(directory)
        for args in group:
            args.version = version
    return logger
