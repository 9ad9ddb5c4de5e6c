"""Resuming at another world size: FSDP2 2 -> 1 -> 2 processes (DCP reshards on load) and DeepSpeed
ZeRO-2 and ZeRO-3 2 -> 1 (through a universal checkpoint, which the strategy makes by itself,
`maskvid ckpt universal` ahead of time being the same conversion). The runs are
tests/equivalence_worker.py's: stage 2, fp32, the same global batch at every world size.

After each change, the state right after the restore is the state that was saved, exactly:
parameters, buffers, every AdamW moment and step count, the param groups' hyperparameters and
learning rates (and DeepSpeed's own fp32 master copies). The steps that follow equal an
uninterrupted run at the new world size, to the tolerances of tests/test_equivalence.py (another
world size sums gradients in another order).
"""

from __future__ import annotations

import pytest
import torch

from tests.equivalence_worker import SAVE_AT, STEPS, shared_runs
from tests.test_equivalence import LOSS_TOL, assert_moments_close, assert_params_close, mean_losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def _trained(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if k.startswith("backbone.")}


def assert_restored(saved: dict, restored: dict, where: str, parts: tuple[str, ...] = ("params", "buffers")) -> None:
    """`restored` (a run's state at its start) is `saved` (the source run's state when it
    checkpointed), bit for bit."""
    assert restored["global_step"] == saved["global_step"], where
    for part in parts:
        want, got = saved[part], restored[part]
        assert got.keys() == want.keys(), (where, part)
        differ = [k for k in want if not torch.equal(got[k], want[k])]
        assert not differ, f"{where}: {part} not restored: {differ[:5]}"
    assert restored["moments"].keys() == saved["moments"].keys() and saved["moments"], where
    for name, moments in saved["moments"].items():
        for key, value in moments.items():
            assert torch.equal(restored["moments"][name][key], value), f"{where}: {key} of {name}"
    assert restored["lrs"] == saved["lrs"], where
    assert restored["groups"] == saved["groups"], f"{where}: param group hyperparameters"


def assert_continues(run: dict, uninterrupted: dict, first: int, where: str, trained_only: bool = False) -> None:
    losses, reference = mean_losses(run), mean_losses(uninterrupted)
    assert sorted(losses) == list(range(first, STEPS)), where
    for step in range(first, STEPS):
        assert losses[step] == pytest.approx(reference[step], **LOSS_TOL), (where, step, losses, reference)
    for step in range(first + 1, STEPS + 1):
        got, want = run["states"][f"at{step}"], uninterrupted["states"][f"at{step}"]
        pick = _trained if trained_only else (lambda t: t)
        assert_params_close(pick(got["params"]), pick(want["params"]), where=f"{where} after step {step}")
        assert_moments_close(got["moments"], want["moments"], where=f"{where} after step {step}")


def test_fsdp2_two_to_one_to_two_processes(runs):
    two, one, back = runs["s2-fsdp"], runs["s2-fsdp-to1"], runs["s2-fsdp-to1-to2"]
    assert [r["world"] for r in one["ranks"]] == [1] and [r["world"] for r in back["ranks"]] == [2, 2]
    # 2 -> 1: the state is the one saved, then the steps are the one-process run's.
    assert_restored(two["states"][f"at{SAVE_AT}"], one["states"]["start"], "2 -> 1")
    assert_continues(one, runs["s2-single"], SAVE_AT, "2 -> 1")
    # 1 -> 2 (from the one-process run's checkpoint a step later): the two-process run's again.
    assert_restored(one["states"][f"at{SAVE_AT + 1}"], back["states"]["start"], "1 -> 2")
    assert_continues(back, two, SAVE_AT + 1, "1 -> 2")


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_two_to_one_restores_weights_and_moments(runs, stage):
    """The trained weights, DeepSpeed's fp32 masters and both AdamW moments come back exactly."""
    saved, restored = runs[f"s2-{stage}"]["states"][f"at{SAVE_AT}"], runs[f"s2-{stage}-to1"]["states"]["start"]
    assert restored["global_step"] == saved["global_step"] == SAVE_AT
    for part in ("params", "masters"):
        want, got = _trained(saved[part]), _trained(restored[part])
        assert want and got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), part
    for name, moments in saved["moments"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(restored["moments"][name][key], moments[key]), (key, name)
    assert restored["lrs"] == saved["lrs"]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_two_to_one_continues_as_one_process(runs, stage):
    """Each param group keeps its own hyperparameters (ZeRO-3's universal load copies group 0's
    onto all, launch/deepspeed_universal.py) and its own AdamW step count (ZeRO-3's shares one
    tensor, which advances once per group and step), so the steps are the one-process run's."""
    saved, run = runs[f"s2-{stage}"], runs[f"s2-{stage}-to1"]
    restored = run["states"]["start"]
    assert restored["groups"] == saved["states"][f"at{SAVE_AT}"]["groups"], "param group hyperparameters"
    assert_continues(run, runs["s2-single"], SAVE_AT, f"{stage} 2 -> 1", trained_only=True)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_two_to_one_restores_the_ema(runs, stage):
    """DeepSpeed's engine skips the module state for a universal checkpoint; what no optimizer
    owns (the EMA copy, the frozen tokenizer) and the buffers (the EMA's update count) come back
    from its model-state files (launch/deepspeed_universal.py), bit for bit."""
    saved, restored = runs[f"s2-{stage}"]["states"][f"at{SAVE_AT}"], runs[f"s2-{stage}-to1"]["states"]["start"]
    for part in ("params", "buffers"):
        differ = [k for k in saved[part] if not torch.equal(restored[part][k], saved[part][k])]
        assert not differ, f"{part} not restored: {differ[:5]}"
