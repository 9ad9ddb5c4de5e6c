"""Errors the LightningModules raise for a configuration that cannot work.

Each message names the option as the `maskvid` command line and YAML spell it
(`model.init_args.NAME`, `data.num_frames`), so the CLI can print it as the one line a user needs.
"""

from __future__ import annotations


class ModelOptionError(ValueError):
    """`model.init_args.<option>` is set to something that cannot work."""

    def __init__(self, option: str, problem: str | BaseException) -> None:
        self.option = option
        super().__init__(f"model.init_args.{option}: {problem}")


class ConfigMismatchError(ValueError):
    """The tokenizer, backbone, text encoder and data do not fit together."""
