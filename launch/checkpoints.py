"""Checkpoint formats and conversions: single files, FSDP2 DCP directories, DeepSpeed directories.

- `checkpoint_kind(path)`: "file" | "dcp" | "deepspeed".
- `deepspeed_world_size(path)`: the data-parallel size a DeepSpeed checkpoint was written at.
- `to_universal(path, out)`: DeepSpeed -> universal checkpoint (loadable at any world size).
- `export(path, out)`: any checkpoint -> one file with the weights and everything
  `maskvid generate` / `load_tokenizer` need, no optimizer state; written atomically.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

UNIVERSAL_TAG = "checkpoint"  # Lightning's DeepSpeed tag; the universal copy keeps it


class CheckpointFormatError(ValueError):
    """The path is not a checkpoint maskvid knows how to read."""


def checkpoint_kind(path: str | Path) -> str:
    path = Path(path)
    if path.is_file():
        return "file"
    if path.is_dir():
        if (path / ".metadata").is_file():
            return "dcp"
        if (path / "latest").is_file():
            return "deepspeed"
        raise CheckpointFormatError(
            f"{path} is a directory but neither a DCP checkpoint (no .metadata) nor a DeepSpeed one (no 'latest')"
        )
    raise CheckpointFormatError(f"checkpoint not found: {path}")


def _deepspeed_tag_dir(path: Path) -> Path:
    tag = (path / "latest").read_text().strip()
    return path / tag


def is_universal(path: str | Path) -> bool:
    path = Path(path)
    return checkpoint_kind(path) == "deepspeed" and (_deepspeed_tag_dir(path) / "zero").is_dir()


def deepspeed_world_size(path: str | Path) -> int:
    """Data-parallel ranks that wrote this DeepSpeed checkpoint (one optimizer shard each)."""
    shards = list(_deepspeed_tag_dir(Path(path)).glob("*optim_states.pt"))
    if not shards:
        raise CheckpointFormatError(f"{path}: no optimizer shards (*optim_states.pt)")
    return len(shards)


def to_universal(path: str | Path, out: str | Path) -> Path:
    """Convert a DeepSpeed ZeRO checkpoint directory to a universal one at `out` (atomic)."""
    path, out = Path(path), Path(out)
    if checkpoint_kind(path) != "deepspeed":
        raise CheckpointFormatError(f"{path} is not a DeepSpeed checkpoint directory")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(_deepspeed_tag_dir(path)), "--output_folder", str(staging / UNIVERSAL_TAG),
               "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise CheckpointFormatError(f"DeepSpeed could not convert {path}:\n{result.stderr[-3000:]}")
        (staging / "latest").write_text(UNIVERSAL_TAG)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _consolidate(path: Path) -> dict:
    kind = checkpoint_kind(path)
    if kind == "file":
        return torch.load(path, map_location="cpu", weights_only=True)
    if kind == "dcp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(path, Path(tmp) / "full.pt")
            full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)
        checkpoint = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
        checkpoint["state_dict"] = full["state_dict"]
        return checkpoint
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        convert_zero_checkpoint_to_fp32_state_dict(path, Path(tmp) / "full.ckpt")
        return torch.load(Path(tmp) / "full.ckpt", map_location="cpu", weights_only=False)


def export(path: str | Path, out: str | Path) -> Path:
    """One self-contained inference file from any checkpoint: weights (EMA included), the
    stage-1/stage-2 records and hyperparameters; no optimizer or loop state."""
    path, out = Path(path), Path(out)
    checkpoint = _consolidate(path)
    keep = {k: v for k, v in checkpoint.items()
            if k in ("state_dict", "hyper_parameters", "hparams_name", "global_step", "epoch", "pytorch-lightning_version")
            or k.startswith("maskvid_")}
    if "state_dict" not in keep:
        raise CheckpointFormatError(f"{path}: no weights found")
    keep["state_dict"] = {k: v.detach().float().clone() if v.is_floating_point() else v.clone()
                          for k, v in keep["state_dict"].items() if isinstance(v, torch.Tensor)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(keep, tmp)
    os.replace(tmp, out)
    return out
