"""What DeepSpeed's universal-checkpoint load leaves out or gets wrong, put right after it.

A universal checkpoint is how a DeepSpeed run resumes at another world size
(DeepSpeedZeroStrategy.load_checkpoint converts to one by itself). DeepSpeed's engine then
restores only what its optimizer owns, from `zero/<param>/`:

- the module state is skipped (engine._load_checkpoint), so parameters outside the optimizer
  (the EMA copy, a frozen tokenizer) and buffers (the EMA's update count) would restart from the
  fresh model, although the folder's `*model_states.pt` hold them: `frozen_param_fragments` (each
  rank's ZeRO-3 partition, or the whole tensor under ZeRO-2) and `module` (buffers, whole);
- under ZeRO-3 (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3) every param group
  gets the same `step` tensor object, which each group's AdamW step then advances (so the bias
  correction runs ahead by the number of groups per step), and group 0's hyperparameters are
  copied onto every group (the no-decay group gets weight decay).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

_RANK_FILE = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")


def tag_dir(folder: str | Path) -> Path:
    """The folder DeepSpeed reads a universal checkpoint from: `<folder>/<latest_universal>`."""
    folder = Path(folder)
    return folder / (folder / "latest_universal").read_text().strip()


def model_state_files(tag: Path) -> list[Path]:
    """The model-state files of tensor-parallel rank 0, in data-parallel rank order (one file
    under ZeRO-2, one per rank under ZeRO-3). Expert files are not matched (maskvid has none)."""
    found = []
    for path in tag.iterdir():
        match = _RANK_FILE.match(path.name)
        if match and int(match.group(2)) == 0:
            found.append((int(match.group(1) or 0), path))
    if not found:
        raise FileNotFoundError(f"{tag}: no *mp_rank_00_model_states.pt")
    return [path for _, path in sorted(found)]


def _whole(fragments: list[torch.Tensor], shape) -> torch.Tensor:
    """A parameter from its ranks' fragments: ZeRO-3 partitions (flat, the last one padded), or
    one whole tensor."""
    flat = torch.cat([f.reshape(-1) for f in fragments])
    numel = int(torch.Size(shape).numel())
    return flat[:numel].reshape(shape)


@torch.no_grad()
def _assign(param: nn.Parameter, value: torch.Tensor) -> None:
    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition, and the whole copy if it is held
        import torch.distributed as dist

        partition = param.ds_tensor
        size = partition.numel()
        rank = dist.get_rank(group=param.ds_process_group)
        mine = value.reshape(-1)[rank * size:(rank + 1) * size]
        partition.zero_()
        partition[:mine.numel()].copy_(mine)
        if param.data.numel() == param.ds_numel:
            param.data.copy_(value.reshape(param.data.shape))
        return
    param.data.copy_(value)


def restore_module_state(module: nn.Module, tag: Path, strict: bool = True) -> list[str]:
    """Load the parameters no optimizer owns and the persistent buffers of `module` (the engine's
    module, whose names the checkpoint uses) from a universal checkpoint's model-state files.
    Returns the names restored."""
    states = [torch.load(path, map_location="cpu", weights_only=True) for path in model_state_files(tag)]
    first = states[0]
    shapes = first.get("frozen_param_shapes") or {}
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    # Optimized parameters come back through the optimizer; these are the others.
    wanted = [name for name, p in params.items() if not p.requires_grad]
    missing = [name for name in wanted if name not in shapes]
    saved_buffers = {name: first["module"][name] for name in first.get("buffer_names", []) if name in first["module"]}
    unexpected = [name for name in [*shapes, *saved_buffers] if name not in params and name not in buffers]
    persistent = [name for name in buffers if name in saved_buffers or _is_persistent(module, name)]
    missing += [name for name in persistent if name not in saved_buffers]
    if strict and (missing or unexpected):
        raise RuntimeError(f"{tag}: the universal checkpoint does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    restored = []
    for name in wanted:
        if name in shapes:
            _assign(params[name], _whole([s["frozen_param_fragments"][name] for s in states], shapes[name]))
            restored.append(name)
    with torch.no_grad():
        for name, value in saved_buffers.items():
            if name in buffers:
                buffers[name].copy_(value)
                restored.append(name)
    return restored


def _is_persistent(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    return leaf not in sub._non_persistent_buffers_set


def _load_optimizer_state(tag: Path) -> dict:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    # DeepSpeed's own global state file: two of its classes besides tensors and plain values.
    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum]):
        return torch.load(tag / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=True)


@torch.no_grad()
def repair_zero3_optimizer(zero_optimizer, tag: Path) -> None:
    """Give every ZeRO-3 flat partition its own AdamW `step`, and every param group its own
    saved hyperparameters (DeepSpeed copied group 0's onto all). Nothing to do under ZeRO-2."""
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    if flats is None:
        return
    inner = zero_optimizer.optimizer
    for flat in flats:
        state = inner.state.get(flat)
        if state and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    saved_groups = _load_optimizer_state(tag)["optimizer_state_dict"]["param_groups"]
    if len(saved_groups) != len(inner.param_groups):
        raise RuntimeError(f"{tag}: {len(saved_groups)} saved param groups, the optimizer has {len(inner.param_groups)}")
    for group, saved in zip(inner.param_groups, saved_groups):
        group.update({key: value for key, value in saved.items() if key != "params"})
