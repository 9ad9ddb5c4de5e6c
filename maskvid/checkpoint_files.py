"""Checkpoint formats and conversions: single files, FSDP2 DCP directories, DeepSpeed directories.

- `checkpoint_kind(path)`: "file" | "dcp" | "deepspeed".
- `verify_checkpoint(path)`: raises `CheckpointCorruptError` naming the path unless the checkpoint
  is complete: every CRC of a file (and of every .pt file in a DeepSpeed tag), every shard file and
  byte range a DCP `.metadata` names.
- `deepspeed_world_size(path)`: the data-parallel size a DeepSpeed checkpoint was written at.
- `to_universal(path, out)`: DeepSpeed -> universal checkpoint (loadable at any world size).
- `read_checkpoint(path)`: any of them as one in-memory dict (sharded ones consolidated).

It sits beside the Python API, not in `maskvid.launch`, because loading a frozen tokenizer for stage 2
(lightning_modules) and the API's `from_checkpoint` both read checkpoints, and neither may import the
launcher.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

UNIVERSAL_TAG = "checkpoint"  # Lightning's DeepSpeed tag; the universal copy keeps it


class CheckpointFormatError(ValueError):
    """The path is not a checkpoint maskvid knows how to read."""


class CheckpointCorruptError(CheckpointFormatError):
    """A checkpoint that exists but is incomplete or damaged (a killed write, a truncated copy)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"checkpoint {path} is incomplete or corrupt ({reason}); resume from an earlier "
                         "checkpoint, or pass --ckpt_path auto to pick the newest complete one")


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


# (path, size, mtime) of files whose CRCs were checked in this process: auto-resume checks a
# candidate, then the strategy checks it again when it loads it.
_VERIFIED: set[tuple[str, int, int]] = set()


def _verify_zip(path: Path, owner: Path) -> None:
    """A torch.save file: readable central directory, a pickle record, every CRC right. (torch.load
    itself reads damaged tensor bytes without complaint.)"""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    name = path.name if path == owner else str(path.relative_to(owner))
    if stat.st_size == 0:
        raise CheckpointCorruptError(owner, f"{name} is empty")
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(n.endswith("data.pkl") for n in archive.namelist()):
                raise CheckpointCorruptError(owner, f"{name} holds no torch pickle record")
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointCorruptError(owner, f"{name}: {exc} (truncated?)") from None
    if bad is not None:
        raise CheckpointCorruptError(owner, f"{name}: CRC mismatch in record {bad}")
    _VERIFIED.add(key)


def _verify_dcp(path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        # DCP's own metadata format is a pickle (torch's; see docs/reliability.md).
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - a damaged pickle raises many types
        raise CheckpointCorruptError(path, f".metadata unreadable: {type(exc).__name__}: {str(exc)[:200]}") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise CheckpointCorruptError(path, f"shard {name} is missing")
        if shard.stat().st_size < size:
            raise CheckpointCorruptError(path, f"shard {name} is truncated ({shard.stat().st_size} < {size} bytes)")
    if (path / "meta.pt").exists():
        _verify_zip(path / "meta.pt", path)


def verify_checkpoint(path: str | Path) -> Path:
    """`path` if it is a complete checkpoint; CheckpointCorruptError (naming it) otherwise."""
    path = Path(path)
    try:
        kind = checkpoint_kind(path)
    except CheckpointFormatError as exc:
        if path.is_dir():
            raise CheckpointCorruptError(path, str(exc).removeprefix(f"{path} is ")) from None
        raise
    if kind == "file":
        _verify_zip(path, path)
    elif kind == "dcp":
        _verify_dcp(path)
    else:
        tag = _deepspeed_tag_dir(path)
        files = sorted(tag.rglob("*.pt")) if tag.is_dir() else []
        if not files:
            raise CheckpointCorruptError(path, f"no state files under {tag.name}/")
        for file in files:
            _verify_zip(file, path)
        _verify_zero_shards(path, tag)
    return path


def _verify_zero_shards(path: Path, tag: Path) -> None:
    """Every data-parallel rank's optimizer shard is there: rank 0 writes `latest` while the
    others may still be writing theirs, and a shard that is missing has no CRC to fail."""
    if (tag / "zero").is_dir():  # universal: no per-rank shards
        return
    per_rank = (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()  # ZeRO-3
    model_states = tag / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if per_rank else "mp_rank_00_model_states.pt")
    if not model_states.is_file():
        raise CheckpointCorruptError(path, f"{model_states.name} missing under {tag.name}/")
    world = torch.load(model_states, map_location="cpu", weights_only=True, mmap=True).get("dp_world_size", 1)
    kinds = ("optim_states", "model_states") if per_rank else ("optim_states",)
    for rank in range(world):
        for kind in kinds:
            if not any(tag.glob(f"*zero_pp_rank_{rank}_mp_rank_*{kind}.pt")):
                raise CheckpointCorruptError(path, f"rank {rank} of {world}: {kind} shard missing under {tag.name}/")


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


def read_checkpoint(path: str | Path) -> dict:
    """Any checkpoint as one dict in memory (plain data only): a single file as it is, a DCP or
    DeepSpeed directory consolidated to full (unsharded) fp32 weights."""
    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == "file":
        if not zipfile.is_zipfile(path):
            raise CheckpointFormatError(f"cannot read checkpoint {path}: not a torch.save archive "
                                        "(truncated, or not a checkpoint)")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise CheckpointFormatError(f"checkpoint {path} holds pickled objects that weights_only=True refuses "
                                        f"({first}); maskvid never writes such objects") from None
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many types
            raise CheckpointFormatError(f"cannot read checkpoint {path}: {exc}") from None
    verify_checkpoint(path)
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
        # Lightning's converter writes its own objects beside the weights, in a file made just now.
        return torch.load(Path(tmp) / "full.ckpt", map_location="cpu", weights_only=False)
