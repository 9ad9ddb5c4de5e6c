"""The exported model directory: `config.json` + `model.safetensors`, and nothing pickled.

`config.json` names the format and its version, and holds the networks' configs as
class_path/init_args (rebuilt by `maskvid.models.config.instantiate`, which builds only
`maskvid.models.` classes); `model.safetensors` holds the weights under one prefix per network.
Both are plain data: loading a directory never runs code from it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VERSION = 1
TEXT_TO_VIDEO = "maskvid.text_to_video"
VIDEO_TOKENIZER = "maskvid.video_tokenizer"
_LOADERS = {TEXT_TO_VIDEO: "TextToVideo", VIDEO_TOKENIZER: "VideoTokenizer"}


class PretrainedError(ValueError):
    """The path is not a usable exported model directory."""


def is_pretrained_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_config(path: str | Path, accept: tuple[str, ...]) -> dict[str, Any]:
    """The directory's config.json, checked to be one of the `accept`ed formats at our version."""
    path = Path(path)
    if path.is_file():
        raise PretrainedError(f"{path} is a file, not an exported model directory (config.json + {WEIGHTS_NAME}); "
                              "load a checkpoint with from_checkpoint")
    if not path.is_dir():
        raise PretrainedError(f"model directory not found: {path}")
    file = path / CONFIG_NAME
    if not file.is_file():
        raise PretrainedError(f"{path} has no {CONFIG_NAME}: not an exported model directory "
                              "(make one with `maskvid ckpt export CKPT --out DIR` or save_pretrained)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PretrainedError(f"{file} is not valid JSON: {exc}") from None
    kind = config.get("format") if isinstance(config, dict) else None
    if kind not in accept:
        wanted = " or ".join(accept)
        hint = f"; load it with {_LOADERS[kind]}.from_pretrained" if kind in _LOADERS else ""
        raise PretrainedError(f"{path} holds format {kind!r}, not {wanted}{hint}")
    if config.get("version") != VERSION:
        raise PretrainedError(f"{path}: {kind} version {config.get('version')!r} is not supported "
                              f"(this maskvid reads version {VERSION})")
    return config


def read_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise PretrainedError(f"{path} has no {WEIGHTS_NAME}")
    try:
        return load_file(file, device=str(device))
    except (SafetensorError, OSError) as exc:
        raise PretrainedError(f"cannot read {file}: {exc}") from None


def load_network(config: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str, source: Any) -> nn.Module:
    """Build the network `config` describes and load exactly the weights under `prefix`; frozen."""
    from maskvid.models.config import instantiate

    try:
        net = instantiate(config)
    except (TypeError, ValueError) as exc:
        raise PretrainedError(f"{source}: cannot build {config.get('class_path', '?')}: {exc}") from None
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not match the config
        raise PretrainedError(f"{source}: weights under {prefix!r} do not match the config: "
                              f"{' '.join(str(exc).split())[:600]}") from None
    if missing or unexpected:
        raise PretrainedError(f"{source}: weights under {prefix!r} do not match the config "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return net.eval().requires_grad_(False)


def check_all_used(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...], source: Any) -> None:
    stray = [k for k in tensors if not k.startswith(prefixes)]
    if stray:
        raise PretrainedError(f"{source}: weights belonging to no network {stray[:5]}")


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, one storage per tensor: safetensors refuses tied or overlapping tensors,
    and a view of a larger tensor would otherwise save the whole storage."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        key = tensor.untyped_storage().data_ptr()
        if key in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def write_directory(out: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write config.json and model.safetensors to `out`, atomically: staged beside it, then renamed
    in, so a killed export never leaves half a model under the final name."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not (out.is_dir() and (is_pretrained_dir(out) or not any(out.iterdir()))):
        raise PretrainedError(f"{out} exists and is not an exported model directory; not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        text = json.dumps({"format": config["format"], "version": VERSION, **config}, indent=2)
        (staging / CONFIG_NAME).write_text(text + "\n")
        # safetensors writes metadata keys in hash order: a single key keeps the file byte-stable.
        save_file(_plain(tensors), staging / WEIGHTS_NAME, metadata={"format": "pt"})
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def prefixed(prefix: str, net: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in net.state_dict().items()}
