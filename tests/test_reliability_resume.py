"""Reliability, part 1: nothing is lost when a run is killed.

- kill -9 of a 2-process DDP run (stage 2, and the GAN tokenizer with both optimizers) at a random
  step, then the same command again: every loss after the resume equals the uninterrupted run's
  to 1e-6, and so do the final weights, EMA, optimizer and scheduler states and data position;
- a kill during a checkpoint write (file or sharded directory) leaves the previous checkpoint
  complete under its name; partial or corrupt checkpoints are named at load, and
  `--ckpt_path auto` falls back to the previous complete one;
- SIGTERM outside SLURM (sent to the whole process group, DataLoader workers included) saves a
  checkpoint and exits with status 0; SIGUSR1 under SLURM is tests/test_slurm.py.

The same faults under FSDP2 and DeepSpeed, and signals that reach the ranks at different times:
tests/test_faults_sharded.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from maskvid.launch.checkpoint_io import AtomicCheckpointIO, backup_path, save_directory_atomically, staging_path
from maskvid.checkpoint_files import CheckpointCorruptError, verify_checkpoint
from maskvid.launch.requeue import find_resume_checkpoint
from tests.conftest import REPO
from tests.reliability_helpers import (
    _OneProcess,
    finish,
    kill_and_resume,
    launch,
    per_step,
    read_step_log,
    run_to_end,
)
from tests.stage2_fixtures import tiny_training_setup

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_training_setup(tmp_path_factory.mktemp("reliability"))


def test_stage2_ddp_resumes_exactly_after_kill_9(setup, tmp_path):
    kill_and_resume(setup, "maskgit", tmp_path, ("loss",))


def test_gan_tokenizer_ddp_resumes_exactly_after_kill_9(setup, tmp_path):
    # Dead-code restarts every 2 steps draw from the global RNG, and the discriminator trains from
    # step 2 with its own optimizer and scheduler: all of it must continue exactly.
    kill_and_resume(setup, "tokenizer", tmp_path, ("loss", "train/g_loss", "train/logits_fake"))


# -- atomic checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["file", "dcp"])
def test_kill_during_a_checkpoint_write_leaves_the_previous_one_complete(layout, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "tests.reliability_helpers", f"write-forever-{layout}",
                             str(tmp_path)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    last = tmp_path / "last.ckpt"
    partial = (lambda: list(tmp_path.glob(".last.ckpt.partial-*"))) if layout == "file" else (
        lambda: [p for p in [staging_path(last)] if p.exists() and any(p.iterdir())])
    deadline = time.monotonic() + 120
    try:
        # Kill once a complete checkpoint exists and the next one is half written.
        while not ((tmp_path / "committed").exists() and partial()):
            assert proc.poll() is None and time.monotonic() < deadline, "the writer died or stalled"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert partial(), "the kill did not land mid-write"
    committed = int((tmp_path / "committed").read_text())
    verify_checkpoint(last)  # complete: every CRC / every shard byte range is there
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), callbacks=[], is_global_zero=True)
    assert find_resume_checkpoint(trainer) == str(last)  # the partial one is never a candidate
    if layout == "file":
        version = AtomicCheckpointIO().load_checkpoint(last)["version"]
    else:
        from torch.distributed.checkpoint import load

        state = {"version": torch.zeros((), dtype=torch.long), "weights": torch.zeros(16, 1024, 1024)}
        load(state, checkpoint_id=str(last))
        version = int(state["version"])
        assert float(state["weights"][0, 0, 0]) == version
    assert version in (committed, committed + 1)


def _lightning_like_checkpoint(path: Path, step: int) -> Path:
    torch.save({"global_step": step, "state_dict": {"w": torch.full((256, 256), float(step))}}, path)
    os.utime(path, (1000 + step, 1000 + step))
    return path


def test_partial_or_corrupt_checkpoints_are_named_and_auto_resume_falls_back(tmp_path):
    import torch.distributed.checkpoint as dcp

    root = tmp_path / "run"
    ckpts = root / "checkpoints"
    ckpts.mkdir(parents=True)
    for step in (2, 4):
        _lightning_like_checkpoint(ckpts / f"step={step}.ckpt", step)
    # The newest two are damaged for real: cut short, and one byte flipped inside a tensor.
    good = (ckpts / "step=4.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(good[: len(good) // 2])
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    (ckpts / "step=6.ckpt").write_bytes(bytes(flipped))
    # A sharded (DCP) checkpoint whose shard lost its tail, and a staging leftover of a killed save.
    sharded = root / "requeue-step=8.ckpt"
    dcp.save({"w": torch.randn(256, 256)}, checkpoint_id=str(sharded))
    shard = next(sharded.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    staging_path(root / "last.ckpt").mkdir()
    for i, path in enumerate([ckpts / "last.ckpt", ckpts / "step=6.ckpt", sharded]):
        os.utime(path, (2000 + i, 2000 + i))
    os.utime(shard, (2003, 2003))

    io = AtomicCheckpointIO()
    with pytest.raises(CheckpointCorruptError, match=r"last\.ckpt is incomplete or corrupt .*truncated"):
        io.load_checkpoint(ckpts / "last.ckpt")
    with pytest.raises(CheckpointCorruptError, match=r"step=6\.ckpt is incomplete or corrupt .*CRC mismatch"):
        io.load_checkpoint(ckpts / "step=6.ckpt")
    with pytest.raises(CheckpointCorruptError, match=rf"requeue-step=8\.ckpt .*shard {shard.name} is truncated"):
        verify_checkpoint(sharded)

    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer = SimpleNamespace(default_root_dir=str(root), callbacks=[ModelCheckpoint(dirpath=str(ckpts))],
                              is_global_zero=True)
    assert find_resume_checkpoint(trainer) == str(ckpts / "step=4.ckpt")
    assert io.load_checkpoint(ckpts / "step=4.ckpt")["global_step"] == 4

    # A kill between the two renames of a sharded save: only the old copy, stepped aside, exists.
    old = backup_path(root / "last.ckpt")
    save_directory_atomically(_OneProcess(), old, lambda d: dcp.save({"w": torch.ones(4)}, checkpoint_id=str(d)))
    assert find_resume_checkpoint(trainer) == str(old)


# -- SIGTERM ----------------------------------------------------------------------------------------


def test_sigterm_to_the_process_group_saves_and_exits_cleanly(setup, tmp_path):
    data = setup["data"]
    run = tmp_path / "run"

    def command(steps: int) -> list[str]:
        return [sys.executable, "-m", "maskvid.launch.cli", "fit", "--config", str(REPO / "configs/trainer/cpu.yaml"),
                "--model", "tests.tiny_model.TinyVideoModel", "--trainer.max_steps", str(steps),
                "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(run),
                # No validation and no epoch-end checkpoint: the SIGTERM save is the run's newest.
                "--trainer.check_val_every_n_epoch", "null", "--trainer.val_check_interval", "1000",
                "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=tests.reliability_helpers.StepLog",
                "--data.train_shards", str(data / "train"), "--data.num_frames", "9", "--data.resolution", "32",
                "--data.batch_size", "2", "--data.num_workers", "2", "--ckpt_path", "auto"]

    proc = launch(command(100_000), tmp_path / "log-first")
    deadline = time.monotonic() + 120
    while max((r["step"] for r in read_step_log(tmp_path / "log-first")), default=-1) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log-first.out").read_text()[-3000:]
        time.sleep(0.02)
    # Like Kubernetes or a spot reclaim: every process of the job, the DataLoader workers too.
    os.killpg(proc.pid, signal.SIGTERM)
    text = finish(proc, tmp_path / "log-first", timeout=120)
    assert proc.returncode == 0, text[-4000:]
    assert "Traceback" not in text and "killed by signal" not in text, text[-4000:]
    (saved,) = run.glob("sigterm-step=*.ckpt")
    assert f"maskvid: SIGTERM: saved {saved}" in text
    step = int(saved.name.removeprefix("sigterm-step=").removesuffix(".ckpt"))
    assert AtomicCheckpointIO().load_checkpoint(saved)["global_step"] == step >= 3

    # The same command (with an end in sight) continues from it.
    text = run_to_end(command(step + 2), tmp_path / "log-second")
    assert f"--ckpt_path auto -> {saved}" in text
    assert sorted(per_step(tmp_path / "log-second", 0)) == [step, step + 1]


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def _ignored_signals(pid: int) -> int:
    """The SigIgn mask of a process (bit n-1 set: signal n is ignored)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigIgn in /proc/{pid}/status")


def test_dataloader_workers_ignore_preemption_signals(setup):
    from maskvid.datamodules.video_datamodule import VideoDataModule

    dm = VideoDataModule(train_shards=str(setup["data"] / "train"), num_frames=9, resolution=32, batch_size=2,
                         num_workers=2)
    before = set(_children(os.getpid()))
    iterator = iter(dm.train_dataloader())
    next(iterator)
    workers = sorted(set(_children(os.getpid())) - before)  # the DataLoader's worker processes
    assert len(workers) == 2
    # A worker that has not yet served a batch may still be starting up, before its init has
    # set the signals to ignored: wait until /proc says it ignores both (or fail on timeout).
    wanted = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGUSR1 - 1))
    deadline = time.monotonic() + 60
    for pid in workers:
        while not _ignored_signals(pid) & wanted == wanted:
            assert time.monotonic() < deadline, f"worker {pid} never ignored SIGTERM/SIGUSR1"
            time.sleep(0.05)
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGUSR1)
    time.sleep(0.5)
    for _ in range(6):  # would raise "DataLoader worker ... exited unexpectedly"
        next(iterator)
    assert all(Path(f"/proc/{pid}").exists() for pid in workers)
