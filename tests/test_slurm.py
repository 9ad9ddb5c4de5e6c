"""The repo's own sbatch template on a real SLURM cluster (two slurmd on this machine, started by
tests/slurm/cluster.sh; .ci/run does that). CPU overrides on the sbatch command line; then
`scancel -s USR1` as SLURM's time-limit warning would: the job must checkpoint, requeue itself,
resume from that checkpoint with the same command and finish at the configured step count, and
every rank's loss at every step, before and after the requeue, must equal an uninterrupted job's
(the same template, seed and data, never signalled) to 1e-6.

Skipped when no cluster answers, unless MASKVID_REQUIRE_SLURM=1 (CI), where that is a failure."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.reliability_helpers import STEP_LOG_ENV, TOLERANCE, read_step_log
from tests.stage2_fixtures import tiny_training_setup

pytestmark = pytest.mark.slow

STEPS = 60
SIGNAL_AFTER = 8


def cluster_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (subprocess.TimeoutExpired, OSError):
        return False
    return out.returncode == 0 and "idle" in out.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not cluster_up():
        if os.environ.get("MASKVID_REQUIRE_SLURM") == "1":
            pytest.fail("MASKVID_REQUIRE_SLURM=1 but no SLURM cluster answers (tests/slurm/cluster.sh start)")
        pytest.skip("no SLURM cluster (start one with tests/slurm/cluster.sh)")
    return tiny_training_setup(tmp_path_factory.mktemp("slurm"))


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\w+)", out)
    return match.group(1) if match else "GONE"


def wait_for(predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    text = log.read_text()[-6000:] if log.exists() else "(no job output)"
    pytest.fail(f"timed out waiting for {what}; job output:\n{text}")


def submit(setup, run: Path, log: Path, steps_log: Path, nodes: int = 1, tasks: int = 2) -> str:
    """sbatch the repo's stage-2 template with the CPU overrides; the job id."""
    data = setup["data"]
    overrides = [
        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", str(STEPS),
        "--trainer.deterministic", "true",
        "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run),
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(run / "checkpoints"), "--trainer.callbacks.every_n_train_steps", "20",
        "--trainer.callbacks.save_last", "true",
        "--trainer.callbacks+=tests.reliability_helpers.StepLog",
        "--data.train_shards", str(data / "train"), "--data.val_shards", str(data / "val"),
        "--data.num_frames", "9", "--data.resolution", "32", "--data.batch_size", "2", "--data.num_workers", "0",
    ]
    # The CPU overrides of the GPU template: no gres, small tasks, the test's config and strategy.
    result = subprocess.run(
        ["sbatch", "--parsable", "--gres=none", f"--nodes={nodes}", f"--ntasks-per-node={tasks}",
         "--cpus-per-task=1", "--time=20", f"--output={log}",
         f"--export=ALL,CONFIG={setup['configs']['maskgit']},STRATEGY=ddp,MASTER_ADDR=127.0.0.1,"
         f"{STEP_LOG_ENV}={steps_log}",
         str(REPO / "launch/slurm/stage2.sbatch"), *overrides],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def finished(job: str) -> bool:
    return job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE")


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """The same job, never signalled: its per-rank step log."""
    root = tmp_path_factory.mktemp("slurm-uninterrupted")
    log = root / "job.out"
    job = submit(setup, root / "run", log, root / "steps")
    try:
        wait_for(lambda: finished(job), 400, "the uninterrupted job", log)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    assert job_state(job) in ("COMPLETED", "GONE"), log.read_text()[-6000:]
    return root / "steps"


def losses_by_run(steps_log: Path, rank: int) -> list[dict[int, float]]:
    """Per process that ran (the first job, then the requeued one), its step -> loss."""
    runs: dict[int, dict[int, float]] = {}
    for row in read_step_log(steps_log, rank):
        runs.setdefault(row["pid"], {})[row["step"]] = row["loss"]
    return list(runs.values())  # in the order they first logged


@pytest.mark.parametrize("nodes,tasks", [(1, 2), (2, 1)], ids=["1node_x2tasks", "2nodes_x1task"])
def test_sbatch_checkpoints_requeues_and_resumes(setup, uninterrupted, nodes, tasks, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "job.out"
    steps_log = tmp_path / "steps"
    job = submit(setup, run, log, steps_log, nodes, tasks)
    try:
        # Training is under way on both ranks.
        wait_for(lambda: min(max((r["step"] for r in read_step_log(steps_log, k)), default=-1) for k in (0, 1))
                 >= SIGNAL_AFTER, 240, f"step {SIGNAL_AFTER} on both ranks", log)
        subprocess.run(["scancel", "-s", "USR1", job], check=True)
        # The job saves, requeues itself and waits (SLURM holds a requeued job ~2 minutes): release it.
        wait_for(lambda: job_state(job) in ("PENDING", "REQUEUED"), 120, "the requeue", log)
        # slurmd refuses job credentials issued in the same second as the requeue revoked the old
        # ones ("Job credential revoked"); SLURM's own 2-minute hold never meets that.
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
        wait_for(lambda: finished(job), 400, "the requeued job to finish", log)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = log.read_text()
    assert job_state(job) in ("COMPLETED", "GONE"), text[-6000:]
    saved = re.search(r"preemption signal: saved (\S+requeue-step=(\d+)\.ckpt)", text)
    assert saved, text[-6000:]
    assert "restart 1 " in text  # the same script ran again, as the requeued job
    # Every rank stopped cleanly before the requeue: nothing was killed mid-shutdown.
    assert "Traceback" not in text and "scontrol requeue" in text, text[-6000:]
    # The requeued run resumed from that checkpoint (or from `last`, refreshed at the same step).
    choices = re.findall(r"--ckpt_path auto -> (\S+)", text)
    assert choices[0] == "nothing", text[-6000:]  # the first run started fresh
    resumed = choices[-1]
    assert resumed in (saved.group(1), str(run / "checkpoints" / "last.ckpt")), text[-6000:]
    assert f"Restoring states from the checkpoint path at {resumed}" in text
    step_saved = int(saved.group(2))
    assert SIGNAL_AFTER < step_saved < STEPS
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == STEPS
    # Every rank: the first job ran [0, saved), the requeued one [saved, STEPS), and each loss is
    # the uninterrupted job's.
    for rank in (0, 1):
        expected = {r["step"]: r["loss"] for r in read_step_log(uninterrupted, rank)}
        assert sorted(expected) == list(range(STEPS))
        before, after = losses_by_run(steps_log, rank)
        assert sorted(before) == list(range(step_saved)) and sorted(after) == list(range(step_saved, STEPS)), rank
        for step, loss in {**before, **after}.items():
            assert loss == pytest.approx(expected[step], abs=TOLERANCE), f"rank {rank} loss at step {step}"
