"""`include:` in config files, so an experiment YAML can be built from the layered ones.

    # configs/experiment/tokenizer_demo.yaml
    include: [../data/synthetic.yaml, ../model/cvivit_tiny.yaml]
    trainer:
      max_steps: 3000

`--config exp.yaml` becomes `--config <each include, recursively> --config <exp without include>`:
exactly what repeating `--config` on the command line does (later files override earlier ones),
so one file names a whole recipe and the parts stay reusable. Paths are relative to the file.
Experiments include no trainer file: the hardware is chosen on the command line, after them
(`--config configs/trainer/cpu.yaml`, gpu.yaml, ddp.yaml, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml

INCLUDE_KEY = "include"
_CONFIG_FLAGS = ("--config", "-c")


class ConfigIncludeError(ValueError):
    """An `include:` entry is malformed, missing or circular."""


def _expand_file(path: Path, chain: tuple[Path, ...]) -> list[str]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigIncludeError(f"circular config include: {cycle}")
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigIncludeError(f"cannot read config {path}: {exc}") from None
    if not isinstance(doc, dict) or INCLUDE_KEY not in doc:
        return [str(path)]
    includes = doc.pop(INCLUDE_KEY)
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigIncludeError(f"{path}: `{INCLUDE_KEY}` must be a path or a list of paths")
    expanded: list[str] = []
    for include in includes:
        target = (path.parent / include) if not Path(include).is_absolute() else Path(include)
        if not target.is_file():
            raise ConfigIncludeError(f"{path}: included config not found: {include} ({target})")
        expanded += _expand_file(target, (*chain, path))
    if doc:
        # The rest of the file, as a YAML string (jsonargparse's --config takes either).
        expanded.append(yaml.safe_dump(doc, sort_keys=False))
    return expanded


def expand_config_includes(argv: Sequence[str]) -> list[str]:
    """argv with every `--config FILE` that has `include:` replaced by its expansion."""
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        value = None
        if arg in _CONFIG_FLAGS and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        path = Path(value)
        parts = _expand_file(path, ()) if path.suffix in (".yaml", ".yml") and path.is_file() else [value]
        for part in parts:
            out += ["--config", part]
    return out


def merged_config(path) -> dict:
    """A config file as the CLI sees it, as one dict: its `include:` files first, later ones
    override, nested dicts merge (lists are replaced)."""
    from pathlib import Path

    import yaml

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for key, value in b.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    doc: dict = {}
    for part in expand_config_includes(["--config", str(path)])[1::2]:
        is_file = "\n" not in part and Path(part).is_file()  # else the YAML text of a file's own keys
        loaded = yaml.safe_load(Path(part).read_text() if is_file else part)
        doc = merge(doc, loaded if isinstance(loaded, dict) else {})
    return doc
