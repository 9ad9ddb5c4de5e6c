"""Networks record how they were built, so a checkpoint alone can rebuild them.

A config is `{"class_path": "pkg.mod.Class", "init_args": {...}}`, the same shape LightningCLI
uses, with nested networks as nested configs. Only plain values are stored, so checkpoints stay
loadable with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

# Rebuilding imports a class named by the checkpoint; only these packages may be named.
TRUSTED_PACKAGES = ("maskvid.models.",)


def module_config(module: nn.Module, init_locals: dict[str, Any]) -> dict[str, Any]:
    """The config of `module`, from the `locals()` of its `__init__` (call it first thing)."""
    args = {}
    for name, value in init_locals.items():
        if name in ("self", "__class__") or name.startswith("_"):
            continue
        if isinstance(value, nn.Module):
            if not hasattr(value, "config"):
                raise TypeError(f"{type(value).__name__} does not record its config")
            value = value.config
        elif isinstance(value, tuple):
            value = list(value)
        args[name] = value
    cls = type(module)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": args}


def instantiate(config: dict[str, Any]) -> nn.Module:
    """Build a network (and its nested networks) from a recorded config."""
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"not a network config: {config!r:.200}")
    path = config["class_path"]
    if not path.startswith(TRUSTED_PACKAGES):
        raise ValueError(f"refusing to build {path!r}: only classes under {TRUSTED_PACKAGES} are trusted")
    module_name, _, class_name = path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    args = {
        name: instantiate(value) if isinstance(value, dict) and "class_path" in value else value
        for name, value in config.get("init_args", {}).items()
    }
    return cls(**args)
