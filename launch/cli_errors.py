"""One line for every mistake a user can fix: a bad option, a missing file, a broken checkpoint.

`maskvid fit|validate|...` goes through LightningCLI and jsonargparse, which report a bad config
as a page of usage, union subtypes and `Given value: Namespace(...)`, and report an exception from a
model's `__init__` wrapped three levels deep. `explain(exc)` digs out the cause and turns it into
one line that names the option or file; anything it does not recognise is a bug, and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import re
from typing import Iterator


def _user_error_types() -> tuple[type[BaseException], ...]:
    # Imported here: the tool commands must not pay for Lightning's import (tests/test_cli.py).
    from maskvid.datamodules.errors import DataError
    from maskvid.checkpoint_files import CheckpointFormatError
    from maskvid.launch.run_loggers import LoggerConfigError
    from maskvid.launch.strategies import StrategyConfigError
    from maskvid.lightning_modules.config_errors import ConfigMismatchError, ModelOptionError
    from maskvid.lightning_modules.nonfinite import NonFiniteError
    from maskvid.metrics.clip_model import CLIPLoadError
    from maskvid.metrics.i3d import I3DWeightsError
    from maskvid.models.perceptual import PerceptualWeightsError
    from maskvid.models.tokenizer_checkpoint import TokenizerCheckpointError

    return (DataError, CheckpointFormatError, StrategyConfigError, ModelOptionError, ConfigMismatchError,
            NonFiniteError, CLIPLoadError, I3DWeightsError, PerceptualWeightsError, TokenizerCheckpointError,
            FileNotFoundError, LoggerConfigError)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def _parser_message(chain: list[BaseException]) -> str:
    """jsonargparse: the outermost key and the innermost reason, e.g. `model.init_args.foo`."""
    messages = [str(e) for e in chain]
    key = None
    for text in messages:
        found = re.search(r'Parser key "([^"]+)"', text)
        if found:
            key = found.group(1)
            break
    innermost = next((m for m in reversed(messages) if m.strip()), messages[0])
    reason = _one_line(innermost)
    option = re.search(r"Option '([^']+)' is not accepted|Key '([^']+)' is not expected", reason)
    if option:
        name = option.group(1) or option.group(2)
        # A class given by class_path (model, data, strategy, ...) takes its options as init_args.
        nested = name if key is None or name.startswith(key) else f"{key}.init_args.{name}"
        return f"unknown option {nested}: {reason}"
    refused = re.search(r"does not accept option '([^']+)'", reason)
    if refused:
        return f"unknown option {refused.group(1)} (in a --config file or on the command line): {reason}"
    unrecognized = re.search(r"unrecognized arguments: (.*)", reason)
    if unrecognized:
        return f"unknown option(s): {unrecognized.group(1)}"
    return f"{key}: {reason}" if key and key not in reason else reason


def explain(exc: BaseException) -> str | None:
    """The one-line message for a user error, or None for anything else (a bug)."""
    chain = list(_chain(exc))
    known = _user_error_types()
    for cause in chain:
        if isinstance(cause, known):
            return _one_line(cause)
    if any(isinstance(cause, argparse.ArgumentError) for cause in chain):
        return _parser_message(chain)
    return None


def report(exc: BaseException, message: str, command: str, rank: int) -> str | None:
    """The line to print on this rank: rank 0 reports; other ranks only what may be theirs alone."""
    if rank != 0 and any(getattr(cause, "raised_on_every_rank", False) for cause in _chain(exc)):
        return None
    prefix = f"[rank {rank}] " if rank else ""
    return f"{prefix}maskvid {command}: error: {message}"
