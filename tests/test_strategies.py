"""The strategies' options, `--ckpt_path auto`, the preemption callback, torch.compile and its order
with checkpointing and FSDP2, in one process (the multi-process runs are in test_distributed.py
and test_slurm.py)."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from maskvid.launch.requeue import SlurmRequeue, find_resume_checkpoint
from maskvid.launch.strategies import (
    DeepSpeedZeroStrategy,
    FSDP2Strategy,
    MaskvidDDPStrategy,
    MaskvidSingleDeviceStrategy,
    StrategyConfigError,
    _blocks,
)
from tests.conftest import REPO, run_cli
from tests.stage2_fixtures import tiny_training_setup


def test_strategies_keep_their_options():
    single = MaskvidSingleDeviceStrategy(activation_checkpointing=2)
    assert single.activation_checkpointing == 2 and single.root_device == torch.device("cpu")
    assert FSDP2Strategy(activation_checkpointing=True).activation_checkpointing
    zero3 = DeepSpeedZeroStrategy(stage=3)
    assert zero3.config["zero_optimization"]["stage"] == 3
    with pytest.raises(StrategyConfigError, match="activation_checkpointing"):
        MaskvidDDPStrategy(activation_checkpointing=-1)


def test_blocks_are_found_innermost_first():
    inner = nn.ModuleList([nn.Linear(2, 2)])
    outer_block = nn.Module()
    outer_block.inner = inner
    outer_block.proj = nn.Linear(2, 2)
    net = nn.Module()
    net.layers = nn.ModuleList([outer_block, nn.Linear(2, 2)])
    net.no_params = nn.ModuleList([nn.ReLU()])
    found = _blocks(net)
    assert found.index(inner[0]) < found.index(outer_block)  # a child is sharded before its parent
    assert all(any(True for _ in m.parameters()) for m in found) and len(found) == 3


def _touch_ckpt(path: Path, when: float, complete: bool = True, sharded: bool = False) -> Path:
    """A real checkpoint (auto-resume verifies candidates), or one whose write never finished."""
    if sharded:
        import torch.distributed.checkpoint as dcp

        dcp.save({"w": torch.ones(4)}, checkpoint_id=str(path), no_dist=True)
        torch.save({"global_step": 1}, path / "meta.pt")
        if not complete:
            (path / ".metadata").unlink()
        for f in path.iterdir():
            os.utime(f, (when, when))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        if complete:
            torch.save({"global_step": 1}, path)
        else:
            path.write_bytes(b"")
        os.utime(path, (when, when))
    return path


def test_ckpt_path_auto_picks_the_newest_complete_checkpoint(tmp_path):
    root, ckpts = tmp_path / "run", tmp_path / "elsewhere"
    trainer = SimpleNamespace(default_root_dir=str(root), callbacks=[ModelCheckpoint(dirpath=ckpts)])
    assert find_resume_checkpoint(trainer) is None  # nothing yet: a fresh start
    now = time.time()
    _touch_ckpt(ckpts / "last.ckpt", now - 100)
    requeue = _touch_ckpt(root / "requeue-step=40.ckpt", now - 50, sharded=True)
    assert find_resume_checkpoint(trainer) == str(requeue)
    # A newer directory that never finished writing (no .metadata) is not a checkpoint yet.
    _touch_ckpt(root / "requeue-step=60.ckpt", now, complete=False, sharded=True)
    assert find_resume_checkpoint(trainer) == str(requeue)
    newest = _touch_ckpt(ckpts / "step=70.ckpt", now + 10)
    assert find_resume_checkpoint(trainer) == str(newest)


class _SignalAt(SlurmRequeue):
    """Sends itself the preemption signal at a given step (as `scancel -s USR1` would)."""

    def __init__(self, at: int) -> None:
        super().__init__(requeue=False)
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_training_setup(tmp_path_factory.mktemp("strategies"))


def _fit(setup, run: Path, steps: int, *extra: str):
    data = setup["data"]
    return run_cli(
        "fit", "--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(setup["configs"]["maskgit"]),
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
        "--data.train_shards", str(data / "train"), "--data.val_shards", str(data / "val"),
        "--data.num_frames", "9", "--data.resolution", "32", "--data.batch_size", "2", "--data.num_workers", "0",
        *extra, timeout=600)


@pytest.mark.slow
def test_preemption_signal_saves_stops_and_auto_resumes(setup, tmp_path):
    run = tmp_path / "run"
    checkpoints = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                   "--trainer.callbacks.dirpath", str(run / "checkpoints"), "--trainer.callbacks.every_n_train_steps", "8",
                   "--trainer.callbacks.save_last", "true"]
    out = _fit(setup, run, 8, *checkpoints, "--trainer.callbacks+=tests.test_strategies._SignalAt",
               "--trainer.callbacks.at", "3", "--ckpt_path", "auto")
    assert out.returncode == 0, out.stderr[-4000:]
    assert "nothing to resume: starting fresh" in out.stderr
    saved = run / "requeue-step=4.ckpt"  # flagged during step 3, saved at its end
    assert saved.is_file() and "preemption signal: saved" in out.stdout
    assert torch.load(saved, weights_only=True)["global_step"] == 4
    out = _fit(setup, run, 8, *checkpoints, "--ckpt_path", "auto")
    assert out.returncode == 0, out.stderr[-4000:]
    # The requeue checkpoint, or `last` if ModelCheckpoint refreshed it as the run stopped (also step 4).
    chosen = re.search(r"--ckpt_path auto -> (\S+)", out.stderr)
    assert chosen and Path(chosen.group(1)) in (saved, run / "checkpoints" / "last.ckpt"), out.stderr[-3000:]
    assert max(torch.load(p, weights_only=True)["global_step"] for p in run.rglob("*.ckpt")) == 8
    # The resumed run logged steps 4..7 only: it continued, it did not start over.
    import csv

    (metrics,) = sorted(run.rglob("version_1/metrics.csv"))
    with open(metrics) as f:
        assert sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")}) == [4, 5, 6, 7]


class _RecordCompiled(Callback):
    """Writes, at the first training batch, which of the backbone's blocks are compiled and
    checkpointed, and the masked loss of that batch through the compiled blocks and eagerly
    (same masking draw), with its gradient norm each time (compiled.json in the run directory)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

        if batch_idx != 0:
            return
        blocks = list(pl_module.backbone.blocks)

        def loss_and_grad_norm() -> list[float]:
            pl_module.zero_grad()
            loss = pl_module.masked_loss(pl_module.backbone, batch, generator=torch.Generator().manual_seed(0))["loss"]
            loss.backward()
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in pl_module.backbone.parameters()
                                                         if p.grad is not None]))
            pl_module.zero_grad()
            return [float(loss), float(norm)]

        compiled = loss_and_grad_norm()
        with torch.compiler.set_stance("force_eager"):
            eager = loss_and_grad_norm()
        Path(trainer.default_root_dir, "compiled.json").write_text(json.dumps({
            "compiled": [b._compiled_call_impl is not None for b in blocks],
            "checkpointed": [isinstance(b, CheckpointWrapper) for b in blocks],
            "compiled_loss_grad": compiled, "eager_loss_grad": eager,
        }))


@pytest.mark.slow
def test_compiled_blocks_train(setup, tmp_path):
    """One device, through the CLI: the model's compile and the strategy's checkpointing, both
    applied (every second block checkpointed, every block compiled, the checkpoint inside)."""
    run = tmp_path / "run"
    out = _fit(setup, run, 2, "--model.init_args.compile", "true",
               "--trainer.strategy", "maskvid.launch.strategies.MaskvidSingleDeviceStrategy",
               "--trainer.strategy.activation_checkpointing", "2",
               "--trainer.callbacks+=tests.test_strategies._RecordCompiled")
    assert out.returncode == 0, out.stderr[-4000:]
    record = json.loads((run / "compiled.json").read_text())
    assert (record["compiled"], record["checkpointed"]) == ([True, True], [True, False])
    # The compiled blocks compute what the eager ones do: the same loss and gradient norm.
    assert record["compiled_loss_grad"] == pytest.approx(record["eager_loss_grad"], rel=1e-4), record


@pytest.fixture
def one_rank_group():
    """A one-process gloo group, so fully_shard runs inside this test process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    finally:
        dist.destroy_process_group()


def test_fsdp2_checkpoints_then_compiles_then_shards(one_rank_group, monkeypatch):
    """FSDP2 on a CPU with compile and activation checkpointing: the FSDP unit is the compiled
    checkpoint wrapper (the order AC -> compile -> shard), and a step gives the eager loss and
    gradients. Tiny, since compiling on two cores is slow."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.b(torch.relu(self.a(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block()])
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.head(x).pow(2).mean()

    class Module(nn.Module):
        def __init__(self, net) -> None:
            super().__init__()
            self.net = net
            self.hparams = {"compile": True}

        def parallel_networks(self):
            return [self.net]

    import torch.distributed.fsdp as fsdp

    events = []
    compile_, shard_ = nn.Module.compile, fsdp.fully_shard

    def compile(m, *args, **kwargs):
        events.append(("compile", type(m).__name__))
        return compile_(m, *args, **kwargs)

    def shard(m, **kwargs):
        events.append(("shard", type(m).__name__))
        return shard_(m, **kwargs)

    monkeypatch.setattr(nn.Module, "compile", compile)
    monkeypatch.setattr(fsdp, "fully_shard", shard)

    torch.manual_seed(0)
    eager = Net()
    module = Module(copy.deepcopy(eager))
    strategy = FSDP2Strategy(activation_checkpointing=True, param_dtype="fp32")
    strategy._device_mesh = one_rank_group
    strategy.parallelize(module)
    assert events == [("compile", "CheckpointWrapper"), ("shard", "CheckpointWrapper"), ("shard", "Net")]
    unit = module.net.blocks[0]
    assert isinstance(unit, CheckpointWrapper) and isinstance(unit, FSDPModule)
    assert unit._compiled_call_impl is not None and isinstance(module.net, FSDPModule)
    x = torch.randn(4, 8)
    reference, loss = eager(x), module.net(x)
    reference.backward()
    loss.backward()
    torch.testing.assert_close(loss, reference)
    for p, q in zip(eager.parameters(), module.net.parameters()):
        torch.testing.assert_close(q.grad.full_tensor(), p.grad)


def test_configure_model_asks_the_strategy_and_warns_when_it_cannot_compile():
    from tests.test_tokenizer_module import small_module

    module = small_module(compile=True)
    asked = []
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(parallelize=asked.append))
    module.configure_model()
    assert asked == [module]
    module._trainer = SimpleNamespace(strategy=SimpleNamespace())  # one of Lightning's own
    with pytest.warns(UserWarning, match="MaskvidSingleDeviceStrategy"):
        module.configure_model()
    module._trainer = None  # load_from_checkpoint: nothing to do, nothing to say
    module.configure_model()
