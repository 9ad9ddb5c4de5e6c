"""launch/deepspeed_universal.py on hand-made universal folders (one process, no DeepSpeed engine):
what no optimizer owns comes back from the model-state files, ZeRO-3 partitions are joined in rank
order and their padding dropped, and a folder that does not match the model is refused. The real
2 -> 1 resumes are tests/test_resharding.py's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maskvid.launch.deepspeed_universal import model_state_files, repair_zero3_optimizer, restore_module_state, tag_dir


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trained = nn.Linear(3, 2)
        self.frozen = nn.Linear(3, 5).requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def _folder(tmp_path, files: dict[str, dict]):
    (tmp_path / "latest_universal").write_text("checkpoint")
    tag = tmp_path / "checkpoint"
    tag.mkdir()
    for name, state in files.items():
        torch.save(state, tag / name)
    return tag


def test_zero3_fragments_are_joined_in_rank_order_and_buffers_restored(tmp_path):
    weight = torch.arange(15.0).reshape(5, 3)
    # Two ranks' ZeRO-3 partitions of 15 elements: 8 each, the last padded with a zero.
    flat = torch.cat([weight.reshape(-1), torch.zeros(1)])
    shapes = {"frozen.weight": torch.Size([5, 3]), "frozen.bias": torch.Size([5])}

    def state(rank: int) -> dict:
        return {"module": {"updates": torch.tensor(7), "trained.weight": torch.empty(0)},
                "buffer_names": ["updates"], "frozen_param_shapes": shapes,
                "frozen_param_fragments": {"frozen.weight": flat[rank * 8:(rank + 1) * 8],
                                           "frozen.bias": torch.arange(5.0)[rank * 3:(rank + 1) * 3]}}

    files = {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt": state(r) for r in range(2)}
    tag = _folder(tmp_path, files)
    assert tag_dir(tmp_path) == tag
    assert [p.name for p in model_state_files(tag)] == list(files)
    net = Net()
    trained = net.trained.weight.detach().clone()
    restored = restore_module_state(net, tag)
    assert sorted(restored) == ["frozen.bias", "frozen.weight", "updates"]
    assert torch.equal(net.frozen.weight, weight) and torch.equal(net.frozen.bias, torch.arange(5.0))
    assert int(net.updates) == 7
    assert torch.equal(net.trained.weight, trained)  # the optimizer's: left alone


def test_ranks_are_ordered_numerically(tmp_path):
    # As text, rank 10 would sort before rank 2.
    tag = _folder(tmp_path, {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt": {} for r in (10, 2, 0)})
    assert [p.name.split("_")[3] for p in model_state_files(tag)] == ["0", "2", "10"]


def test_a_folder_that_does_not_match_the_model_is_refused(tmp_path):
    net = Net()
    whole = {"frozen.weight": torch.ones(5, 3)}  # ZeRO-2: one file, whole tensors; no bias, no buffer
    tag = _folder(tmp_path, {"mp_rank_00_model_states.pt": {
        "module": {}, "buffer_names": [], "frozen_param_shapes": {"frozen.weight": torch.Size([5, 3])},
        "frozen_param_fragments": whole}})
    with pytest.raises(RuntimeError, match=r"missing \['frozen.bias', 'updates'\]"):
        restore_module_state(net, tag)
    # Not strict: what is there is loaded.
    assert restore_module_state(net, tag, strict=False) == ["frozen.weight"]
    assert torch.equal(net.frozen.weight, torch.ones(5, 3))


def test_zero3_groups_get_their_own_step_and_hyperparameters(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    flats = [nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(2))]
    inner = torch.optim.AdamW([{"params": [flats[0]], "weight_decay": 0.05}, {"params": [flats[1]], "weight_decay": 0.0}])
    step = torch.tensor(2.0)
    for flat in flats:  # as DeepSpeed leaves them: one step tensor, group 0's settings everywhere
        inner.state[flat] = {"step": step, "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    for group in inner.param_groups:
        group["weight_decay"] = 0.05
    saved_groups = [{"weight_decay": 0.05, "lr": 1e-3, "params": [0]}, {"weight_decay": 0.0, "lr": 5e-4, "params": [1]}]
    tag = tmp_path / "checkpoint"
    (tag / "zero").mkdir(parents=True)
    torch.save({"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0),
                "optimizer_state_dict": {"state": {}, "param_groups": saved_groups}}, tag / "zero" / "optimizer_state.pt")

    class Zero3:
        fp32_partitioned_groups_flat = flats
        optimizer = inner

    repair_zero3_optimizer(Zero3(), tag)
    steps = [inner.state[f]["step"] for f in flats]
    assert steps[0] is not steps[1] and all(float(s) == 2.0 for s in steps)
    steps[0] += 1
    assert float(steps[1]) == 2.0
    assert [(g["weight_decay"], g["lr"]) for g in inner.param_groups] == [(0.05, 1e-3), (0.0, 5e-4)]
    assert [g["params"] for g in inner.param_groups] == [[flats[0]], [flats[1]]]
