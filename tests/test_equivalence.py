"""Data-parallel strategies compute what one process computes on the same global batch.

Both stages, fp32, from the same init, for STEPS steps (tests/equivalence_worker.py runs them all
in three torchrun launches and records per-rank losses and gathered parameters and moments):
stage 2 (MaskGIT) under DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 over 2 processes; stage 1, the GAN
tokenizer, under DDP and FSDP2 only, because DeepSpeed takes one optimizer and refuses the
tokenizer's two by design (test_distributed.py::test_deepspeed_refuses_the_gan_tokenizer_with_a_reason).
Each process takes half of the global batch the single process takes whole.

Two things in the library are not functions of the global batch, so the runs pin them (see the
worker): stage 2's training masks are seeded per rank (here: per sample, with as many masked
tokens in every clip), and the GAN's adaptive weight is each rank's own norm ratio (here: its cap
always binds, checked below). Dead-code restarts (rank 0's encodings) are off.

Tolerances: the ranks' gradients are summed in another order than one process sums its batch, and
FSDP2's fp32 AdamW runs unfused where one process runs fused, so results agree to rounding, not
bit for bit. Losses: rtol 1e-5, atol 1e-6. Parameters: atol 2e-5, fifty times below one AdamW
step (lr 1e-3), so a lost or mis-scaled gradient shows. Moments: 1e-4 of each tensor's largest
value.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.equivalence_worker import ADAPTIVE_WEIGHT_CAP, SAVE_AT, STEPS, shared_runs

pytestmark = pytest.mark.slow

LOSS_TOL = {"rel": 1e-5, "abs": 1e-6}
PARAM_ATOL = 2e-5
MOMENT_REL = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def mean_losses(run: dict, key: str = "loss") -> dict[int, float]:
    """Per step, the ranks' own losses averaged: the global-batch loss when ranks hold equal halves."""
    ranks = run["ranks"]
    steps = sorted(ranks[0]["rows"])
    assert all(sorted(r["rows"]) == steps for r in ranks), "every rank logs every step"
    return {s: sum(r["rows"][s][key] for r in ranks) / len(ranks) for s in steps}


def assert_params_close(got: dict, want: dict, atol: float = PARAM_ATOL, where: str = "") -> None:
    assert got.keys() == want.keys(), where
    worst = max(((got[k] - want[k]).abs().max().item(), k) for k in want if want[k].numel())
    assert worst[0] <= atol, f"{where}: {worst[1]} differs by {worst[0]:.3g} (atol {atol})"


def assert_moments_close(got: dict, want: dict, where: str = "") -> None:
    assert got.keys() == want.keys() and want, where
    for name, moments in want.items():
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = got[name][key], moments[key]
            scale = b.abs().max().item()
            assert (a - b).abs().max().item() <= MOMENT_REL * scale + 1e-12, f"{where}: {key} of {name}"
        assert float(got[name]["step"]) == float(moments["step"]), f"{where}: AdamW step of {name}"


def assert_same_training(run: dict, reference: dict, name: str) -> None:
    """Losses at every step, and parameters (trained, EMA), moments and learning rates after
    every step, equal the single process's."""
    ref_losses, losses = mean_losses(reference), mean_losses(run)
    assert sorted(losses) == list(range(STEPS))
    for step in range(STEPS):
        assert losses[step] == pytest.approx(ref_losses[step], **LOSS_TOL), (name, step, losses, ref_losses)
    start, ref_start = run["states"]["start"]["params"], reference["states"]["start"]["params"]
    assert all(torch.equal(start[k], ref_start[k]) for k in ref_start), f"{name}: every run starts from the same init"
    for step in range(1, STEPS + 1):
        got, want = run["states"][f"at{step}"], reference["states"][f"at{step}"]
        assert_params_close(got["params"], want["params"], where=f"{name} after step {step}")
        assert_moments_close(got["moments"], want["moments"], where=f"{name} after step {step}")
        assert got["lrs"] == want["lrs"], (name, step)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_stage2_on_two_processes_equals_one_process(runs, strategy):
    assert_same_training(runs[f"s2-{strategy}"], runs["s2-single"], strategy)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gan_tokenizer_on_two_processes_equals_one_process(runs, strategy):
    run, reference = runs[f"s1-{strategy}"], runs["s1-single"]
    assert_same_training(run, reference, strategy)
    # The GAN was on from step 1: the discriminator's losses match too, R1 ran at step 2, and the
    # adaptive weight sat at its cap on every rank (otherwise it is each rank's own ratio).
    for step in range(1, STEPS):
        got = sum(r["rows"][step]["train/d_loss"] for r in run["ranks"]) / 2
        assert got == pytest.approx(reference["ranks"][0]["rows"][step]["train/d_loss"], **LOSS_TOL), step
        for r in run["ranks"]:
            assert r["rows"][step]["train/adaptive_weight"] == pytest.approx(ADAPTIVE_WEIGHT_CAP), (r["rank"], step)
    assert all("train/r1" in r["rows"][2] for r in (*run["ranks"], *reference["ranks"]))


@pytest.mark.parametrize("name", ["s2-ddp", "s2-fsdp", "s2-zero2", "s2-zero3", "s1-ddp", "s1-fsdp"])
def test_rank_one_trains_on_its_own_half(runs, name):
    """Rank 1 logs its own loss at every step, on other samples than rank 0's (so another value),
    and the parameters above only match the single process with its gradient included."""
    rank0, rank1 = runs[name]["ranks"]
    assert (rank0["rank"], rank1["rank"], rank1["world"]) == (0, 1, 2)
    assert sorted(rank1["rows"]) == list(range(STEPS))
    for step in range(STEPS):
        a, b = rank0["rows"][step]["loss"], rank1["rows"][step]["loss"]
        assert math.isfinite(b) and abs(a - b) > 1e-4, (step, a, b)


def _check_half(holdings: dict, rank: int, names: list[str], zero3: bool) -> int:
    held = 0
    for name in names:
        h = holdings["params"][name]
        rest = h["full"] // max(h["dim0"], 1)
        if zero3:
            # A flat partition of ceil(numel / 2) elements. Outside a forward the whole parameter
            # is gone, except DeepSpeed's "persistent" small ones (below its persistence
            # threshold), kept gathered between steps by design.
            assert h["local"] == math.ceil(h["full"] / 2), (rank, name, h)
            assert h["visible"] == (h["full"] if h["persistent"] else 0), (rank, name, h)
        else:
            # FSDP2 splits dim 0: rank 0 takes the first ceil(rows / 2) rows, rank 1 the rest.
            rows = math.ceil(h["dim0"] / 2) if rank == 0 else h["dim0"] // 2
            assert h["local"] == rows * rest, (rank, name, h)
        held += h["local"]
    return held


@pytest.mark.parametrize("name", ["s2-fsdp", "s2-zero3", "s1-fsdp"])
def test_sharded_strategies_hold_half_of_every_parameter_on_each_rank(runs, name):
    ranks = runs[name]["ranks"]
    params = ranks[0]["holdings"]["params"]
    # The trained network and its EMA copy; the GAN's discriminator is replicated on purpose
    # (R1's double backward), stage 2's frozen tokenizer is not trained.
    sharded = [n for n in params if n.startswith(("backbone", "tokenizer.", "tokenizer_ema.")) and
               not (name.startswith("s2") and n.startswith("tokenizer."))]
    assert sharded
    totals = [_check_half(r["holdings"], r["rank"], sharded, zero3="zero3" in name) for r in ranks]
    if "zero3" in name:  # the matrices, at least, are not kept whole
        assert any(not params[n]["persistent"] and params[n]["full"] > 1000 for n in sharded)
    full = sum(params[n]["full"] for n in sharded)
    assert all(0.45 * full <= t <= 0.55 * full for t in totals), (totals, full)
    # So is the optimizer state: each rank keeps moments for about half of the trained elements.
    for r in ranks:
        h = r["holdings"]
        trained = h["trainable_numel"] - (sum(params[n]["full"] for n in params if n.startswith("discriminator."))
                                          if name.startswith("s1") else 0)
        assert 0.45 * trained <= h["optimizer_local_numel"] <= 0.55 * trained, (r["rank"], h["optimizer_local_numel"])


def test_zero2_shards_optimizer_state_not_parameters(runs):
    for r in runs["s2-zero2"]["ranks"]:
        h = r["holdings"]
        assert all(v["local"] == v["full"] for v in h["params"].values())
        assert 0.45 * h["trainable_numel"] <= h["optimizer_local_numel"] <= 0.55 * h["trainable_numel"], h
    # DDP keeps everything everywhere.
    for r in runs["s2-ddp"]["ranks"]:
        assert r["holdings"]["optimizer_local_numel"] == r["holdings"]["trainable_numel"]


def test_zero3_ema_forward_sees_the_current_average(runs):
    """ZeRO-3 all-gathers its small ("persistent") parameters at the end of every optimizer step
    and keeps them gathered; the EMA update that follows must write those whole copies too (not
    only the partitions), or a forward through the EMA (validation samples) computes with the
    previous step's average. After every step, each whole copy equals its partitions, bit for bit.
    (Checked on two processes: on one, this holds even without that refresh.)"""
    for step in range(1, STEPS + 1):
        state = runs["s2-zero3"]["states"][f"at{step}"]
        available = {k: v for k, v in state["available"].items() if k.startswith("backbone_ema.")}
        assert available, f"step {step}: the EMA's small parameters stay gathered between steps"
        for key, whole in available.items():
            assert torch.equal(whole, state["partitions"][key]), (step, key)


def _export(checkpoint, out):
    import argparse

    from maskvid.launch import cmd_ckpt_export

    assert cmd_ckpt_export.run(argparse.Namespace(checkpoint=checkpoint, out=out)) == 0
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("name", ["s2-fsdp", "s2-zero2", "s2-zero3", "s1-fsdp"])
def test_export_of_a_sharded_checkpoint_equals_the_gathered_training_weights(runs, name, tmp_path):
    """`maskvid ckpt export` of the checkpoint a 2-process run wrote at SAVE_AT holds, tensor by
    tensor, the weights that run had in memory then: the EMA network, and stage 2's tokenizer.
    (test_distributed.py checks export against reading the same checkpoint; this checks it
    against training.)"""
    run = runs[name]
    checkpoint = run["dir"] / "checkpoints" / f"step={SAVE_AT}.ckpt"
    assert checkpoint.is_dir()  # sharded: a DCP or DeepSpeed directory
    exported = _export(checkpoint, tmp_path / "model")
    state = run["states"][f"at{SAVE_AT}"]
    memory = {**state["params"], **state["buffers"]}
    ema = "backbone_ema.module." if name.startswith("s2") else "tokenizer_ema.module."
    expected = {"backbone." if name.startswith("s2") else "tokenizer.": ema}
    if name.startswith("s2"):
        expected["tokenizer."] = "tokenizer."
    compared = 0
    for key, tensor in exported.items():
        prefix = next(p for p in expected if key.startswith(p))
        source = expected[prefix] + key[len(prefix):]
        assert source in memory, key
        assert torch.equal(tensor, memory[source]), key
        compared += 1
    # Every EMA parameter was exported.
    assert {k for k in state["params"] if k.startswith(ema)} <= {expected[p] + k[len(p):] for k in exported
                                                                for p in expected if k.startswith(p)}
    assert compared == len(exported) > 0
