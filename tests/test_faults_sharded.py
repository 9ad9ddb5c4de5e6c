"""Reliability under the sharded strategies: FSDP2 (DCP checkpoints) and DeepSpeed ZeRO-2 (its own
checkpoint directories), each over 2 gloo processes, through the real `maskvid fit` and the repo's
configs/trainer/*.yaml. tests/test_reliability_resume.py does the same for DDP.

- kill -9 at a seeded random step, then the very same command (`--ckpt_path auto`);
- kill during a sharded checkpoint write: rank 1 stops right before writing its shard of last.ckpt
  (tests.reliability_helpers.SlowShardWrite) while rank 0 writes its own, and the job is killed;
- SIGTERM (outside SLURM) and SIGUSR1 (SLURM's preemption warning, under srun's variables) that
  reach one rank first and the other rank late, during and after the save, again and again until
  it exits: one checkpoint at a step both ranks agree on, every rank exits 0.

Each resumed run equals one uninterrupted run of the same command (shared per strategy): every
rank's loss at every step to TOLERANCE (1e-6), and the final training state, sharded checkpoints
consolidated: weights (trained, EMA, buffers), AdamW moments and steps (DeepSpeed: every rank's
fp32 partitions), scheduler, global step, data position and the standing callbacks' state.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from maskvid.checkpoint_files import CheckpointFormatError, verify_checkpoint
from maskvid.launch.checkpoint_io import staging_path
from maskvid.launch.requeue import REQUEUE_FILE_ENV, find_resume_checkpoint
from tests.reliability_helpers import (
    SLOW_SAVE_ENV,
    STEPS,
    TOLERANCE,
    assert_same_state,
    fit_command,
    kill_and_resume,
    last_step,
    launch,
    launch_ranks,
    output,
    per_step,
    run_to_end,
    saved_step,
    wait_until,
)
from tests.stage2_fixtures import tiny_training_setup

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

STRATEGIES = ["fsdp", "deepspeed_zero2"]
KILL_SEEDS = {"fsdp": 36, "deepspeed_zero2": 3}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_training_setup(tmp_path_factory.mktemp("faults-sharded"))


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted run of a strategy (made once, on first use): its run directory; its step
    log is the sibling `.log`."""
    made: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in made:
            run = tmp_path_factory.mktemp(f"reference-{strategy}") / "reference"
            run_to_end(fit_command(setup, "maskgit", run, strategy), run.with_suffix(".log"))
            made[strategy] = run
        return made[strategy]

    return get


def assert_losses_equal_reference(log_dir: Path, reference: Path, steps: range, where: str) -> None:
    """Both ranks logged exactly `steps`, each loss equal to the uninterrupted run's."""
    for rank in (0, 1):
        expected, got = per_step(reference.with_suffix(".log"), rank), per_step(log_dir, rank)
        assert sorted(got) == list(steps), (where, rank, sorted(got))
        for step, loss in got.items():
            assert loss == pytest.approx(expected[step], abs=TOLERANCE), f"{where}: rank {rank} loss at step {step}"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kill_9_at_a_random_step_resumes_exactly(setup, reference, strategy, tmp_path):
    happened = kill_and_resume(setup, "maskgit", tmp_path, ("loss",), strategy, reference=reference(strategy),
                               seed=KILL_SEEDS[strategy])
    # The checkpoints were sharded directories, and the resume took one of them.
    assert all((tmp_path / "run" / "checkpoints" / name).is_dir() for name in happened["left"]), happened


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kill_during_a_sharded_checkpoint_write_keeps_the_previous_one(setup, reference, strategy, tmp_path):
    ref = reference(strategy)
    run = tmp_path / "run"
    # Only last.ckpt, rewritten every 2 steps: the kill lands while it is being replaced.
    command = fit_command(setup, "maskgit", run, strategy, save_top_k=0)
    last = run / "checkpoints" / "last.ckpt"
    staging = staging_path(last)
    log = tmp_path / "log-killed"
    proc = launch(command, log, env={SLOW_SAVE_ENV: "last.ckpt@6:1"})
    files = lambda: sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())  # noqa: E731
    wait_until(lambda: (log / "slow-save-rank1").exists(), [proc], log, "rank 1 stalled in the step-6 save")
    time.sleep(2.0)  # rank 0 writes its own shard meanwhile, then waits for rank 1
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    # Killed mid-write: rank 0's shard is in the staging directory, rank 1's is not, and the
    # verification says so (DeepSpeed's rank 0 has already written `latest` by then).
    written = files()
    assert any("0_0.distcp" in p.name or "rank_0" in p.name for p in written), written
    assert not any("1_0.distcp" in p.name or "rank_1" in p.name for p in written), written
    with pytest.raises(CheckpointFormatError, match="incomplete"):
        verify_checkpoint(staging)
    # The previous last.ckpt is whole, and it is what auto-resume takes.
    assert last.is_dir() and saved_step(last) == 4
    trainer = SimpleNamespace(default_root_dir=str(run), callbacks=[], is_global_zero=True)
    assert find_resume_checkpoint(trainer) == str(last)

    text = run_to_end(command, tmp_path / "log-resumed")
    assert f"--ckpt_path auto -> {last}" in text, text[-3000:]
    assert_losses_equal_reference(log, ref, range(6), "killed run")
    assert_losses_equal_reference(tmp_path / "log-resumed", ref, range(4, STEPS), "resumed run")
    assert not staging.exists()
    assert_same_state(last, ref / "checkpoints" / "last.ckpt")


def _signal_until_exit(procs: list, late: int, signum: int, every: float = 0.2) -> bool:
    """Signal rank `late` again and again until it exits (through the save, the teardown and the
    interpreter's exit). Whether it was still running when the first one was sent."""
    alive = procs[late].poll() is None
    while procs[late].poll() is None:
        procs[late].send_signal(signum)
        time.sleep(every)
    return alive


def _stop_on_signal(procs, log: Path, run: Path, prefix: str, first: int, signum: int, after_step: int) -> tuple:
    """Signal rank `first` once both ranks finished `after_step`; the other rank is signalled late
    (from when the checkpoint is committed until it exits). Returns (checkpoint, its step)."""
    late = 1 - first
    wait_until(lambda: min(last_step(log, r) for r in (0, 1)) >= after_step, procs, log, f"step {after_step}")
    procs[first].send_signal(signum)
    wait_until(lambda: any(run.glob(f"{prefix}*.ckpt")), procs, log, f"the {prefix} checkpoint")
    was_running = _signal_until_exit(procs, late, signum)
    for p in procs:
        p.wait(timeout=120)
    texts = [output(log, r) for r in (0, 1)]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(t[-3000:] for t in texts)
    assert not any("Traceback" in t for t in texts), "\n".join(t[-3000:] for t in texts)
    assert was_running, "the late signal came after the rank had exited: the test did not test it"
    # Saved exactly once, completely, at a step both ranks stopped at.
    (saved,) = run.glob(f"{prefix}*.ckpt")
    assert not staging_path(saved).exists()
    step = saved_step(saved)
    assert saved.name == f"{prefix}{step}.ckpt"
    assert [last_step(log, r) for r in (0, 1)] == [step - 1, step - 1]
    said = [line for t in texts for line in t.splitlines() if line.startswith("maskvid: ") and ": saved " in line]
    assert len(said) == 1 and said[0].endswith(f"saved {saved}"), said
    return saved, step


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sigterm_and_sigusr1_reaching_the_ranks_at_different_times(setup, reference, strategy, tmp_path):
    ref = reference(strategy)
    run = tmp_path / "run"
    command = fit_command(setup, "maskgit", run, strategy)

    # 1. SIGTERM outside SLURM (torchrun-like, one process per rank): rank 0 first, rank 1 late.
    log = tmp_path / "log-sigterm"
    procs = launch_ranks(command, log)
    sigterm, first = _stop_on_signal(procs, log, run, "sigterm-step=", 0, signal.SIGTERM, after_step=2)
    assert "stopping cleanly" in output(log, 0)

    # 2. The same command under SLURM (srun's variables): auto-resume takes that checkpoint; then
    # SLURM's warning signal, rank 1 first and rank 0 (the one that writes the requeue request) late.
    log2 = tmp_path / "log-sigusr1"
    marker = tmp_path / "requeue-request"
    procs = launch_ranks(command, log2, slurm_job="4242", env={REQUEUE_FILE_ENV: str(marker)})
    requeue, second = _stop_on_signal(procs, log2, run, "requeue-step=", 1, signal.SIGUSR1, after_step=first + 1)
    chosen = output(log2, 0).split("--ckpt_path auto -> ", 1)[1].split()[0]
    assert saved_step(Path(chosen)) == first, chosen
    assert marker.read_text() == "4242\n"

    # 3. The requeued job (here: Lightning's own launcher) finishes the run.
    text = run_to_end(command, tmp_path / "log-end")
    chosen = text.split("--ckpt_path auto -> ", 1)[1].split()[0]
    assert saved_step(Path(chosen)) == second, chosen

    assert 3 <= first < second < STEPS, (first, second)
    assert_losses_equal_reference(log, ref, range(first), "before SIGTERM")
    assert_losses_equal_reference(log2, ref, range(first, second), "between SIGTERM and SIGUSR1")
    assert_losses_equal_reference(tmp_path / "log-end", ref, range(second, STEPS), "after SIGUSR1")
    if first % 2 == 0:  # the reference checkpointed at that step too
        assert_same_state(sigterm, ref / "checkpoints" / f"step={first}.ckpt")
    assert_same_state(run / "checkpoints" / "last.ckpt", ref / "checkpoints" / "last.ckpt")
