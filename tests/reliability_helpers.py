"""Fault injection and recording for tests/test_reliability*.py, loaded into real `maskvid fit`
runs with `--trainer.callbacks+=tests.reliability_helpers.NAME`.

- `StepLog`: every rank appends {rank, step, loss, ...} per training step to a JSONL file as soon as
  the step ends (flushed), so a test can watch a run's progress, kill it mid-flight, and compare
  losses to 1e-6 (CSVLogger buffers rows, and a killed run loses them).
- `InjectFaults`: real non-finite values at chosen steps and ranks: a NaN forward output (so a NaN
  loss), an Inf gradient (a tensor hook), a NaN weight.

- `SlowShardWrite`: while $MASKVID_TEST_SLOW_SAVE names a save (`NAME@STEP:RANK`), that rank stops
  right before it writes its shard of that sharded checkpoint (DCP or DeepSpeed) and waits to be
  killed: a kill during a real run's checkpoint write, made deterministic instead of hoped for.

The test side (tests/test_reliability_resume.py, tests/test_faults_sharded.py): one `maskvid fit`
command line for every strategy, launching a run (Lightning's own launcher, or one process per rank
as torchrun or srun would start them), signalling it at a step, and comparing two checkpoints'
training state, sharded ones consolidated.

`python -m tests.reliability_helpers write-forever-{file,dcp} DIR` saves ever newer checkpoints
through the atomic writers until killed (the kill-during-write test).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from lightning.pytorch import Callback

STEP_LOG_ENV = "MASKVID_TEST_STEP_LOG"
SLOW_SAVE_ENV = "MASKVID_TEST_SLOW_SAVE"
REPO = Path(__file__).resolve().parents[1]
STEPS = 12
TOLERANCE = 1e-6


def _floats(metrics: dict, keys: tuple[str, ...]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in keys if k in metrics}


class StepLog(Callback):
    """Appends one JSON line per training step and rank to $MASKVID_TEST_STEP_LOG/rank{N}.jsonl."""

    def __init__(self, keys: tuple[str, ...] = ("train/g_loss", "train/logits_fake", "train/skipped_steps")) -> None:
        """
        Args:
            keys: Logged metrics recorded besides the loss.
        """
        self.keys = keys

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        directory = os.environ.get(STEP_LOG_ENV)
        if not directory:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        checksum = sum(float(p.detach().double().sum()) for p in pl_module.parameters() if p.requires_grad)
        row = {"rank": trainer.global_rank, "step": self._step, "loss": float(loss), "checksum": checksum,
               "pid": os.getpid(), **_floats(trainer.callback_metrics, self.keys)}
        Path(directory).mkdir(parents=True, exist_ok=True)
        with open(Path(directory) / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def read_step_log(directory: Path, rank: int = 0) -> list[dict]:
    path = Path(directory) / f"rank{rank}.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # the last line of a killed run may be cut
            pass
    return rows


def _steps(spec: Optional[str]) -> dict[int, Optional[int]]:
    """'3,5@1' -> {3: None, 5: 1}: steps, each on every rank or on one."""
    out: dict[int, Optional[int]] = {}
    for part in (spec or "").split(","):
        if part.strip():
            step, _, rank = part.partition("@")
            out[int(step)] = int(rank) if rank else None
    return out


class InjectFaults(Callback):
    """Real non-finite values at the given steps ('S' on every rank, 'S@R' on rank R only)."""

    def __init__(self, nan_loss: Optional[str] = None, inf_grad: Optional[str] = None,
                 nan_weight: Optional[str] = None) -> None:
        """
        Args:
            nan_loss: Steps whose first network's forward output is multiplied by NaN.
            inf_grad: Steps at which one weight's gradient becomes Inf (tensor hook).
            nan_weight: Steps before which one trainable weight is overwritten with NaN.
        """
        self.nan_loss, self.inf_grad, self.nan_weight = _steps(nan_loss), _steps(inf_grad), _steps(nan_weight)
        self._hooks = []

    @staticmethod
    def _hits(table: dict[int, Optional[int]], step: int, rank: int) -> bool:
        return step in table and table[step] in (None, rank)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        step, rank = trainer.global_step, trainer.global_rank
        network = next(n for n in pl_module.parallel_networks() if n is not None)
        weight = next(p for p in network.parameters() if p.requires_grad and p.ndim >= 2)
        if self._hits(self.nan_loss, step, rank):
            self._hooks.append(network.register_forward_hook(_poison_output))
        if self._hits(self.inf_grad, step, rank):
            self._hooks.append(weight.register_hook(lambda g: torch.full_like(g, float("inf"))))
        if self._hits(self.nan_weight, step, rank):
            with torch.no_grad():
                weight.fill_(float("nan"))


def _poison_output(module, inputs, out):
    if isinstance(out, tuple):
        return (out[0] * float("nan"), *out[1:])
    return out * float("nan")


class SlowShardWrite(Callback):
    """Test only. While $MASKVID_TEST_SLOW_SAVE is `NAME@STEP:RANK`, rank RANK stops right before it
    writes its shard of the sharded save of NAME at STEP (DCP's file writer, DeepSpeed's checkpoint
    engine), drops `slow-save-rank{RANK}` in the step-log directory, and waits to be killed. The
    other ranks write their shards meanwhile, so the kill finds a half-written checkpoint."""

    def setup(self, trainer, pl_module, stage) -> None:
        spec = os.environ.get(SLOW_SAVE_ENV)
        if not spec:
            return
        name, _, where = spec.partition("@")
        step, _, rank = where.partition(":")
        self._spec, self._target, self._trainer = (name, int(step), int(rank)), None, trainer

        from maskvid.launch import checkpoint_io

        atomic = checkpoint_io.save_directory_atomically

        def save_directory_atomically(strategy, filepath, write):
            self._target = Path(filepath).name
            try:
                return atomic(strategy, filepath, write)
            finally:
                self._target = None

        # The strategies import it when they save, so the module attribute is what they call.
        checkpoint_io.save_directory_atomically = save_directory_atomically
        from torch.distributed.checkpoint.filesystem import FileSystemWriter

        FileSystemWriter.write_data = self._stalling(FileSystemWriter.write_data)

    def on_train_start(self, trainer, pl_module) -> None:
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if getattr(self, "_spec", None) and engine is not None:
            engine.checkpoint_engine.save = self._stalling(engine.checkpoint_engine.save)

    def _stalling(self, write: Callable) -> Callable:
        def stalling(*args, **kwargs):
            name, step, rank = self._spec
            trainer = self._trainer
            if (self._target, trainer.global_step, trainer.global_rank) == (name, step, rank):
                directory = Path(os.environ.get(STEP_LOG_ENV) or trainer.default_root_dir)
                directory.mkdir(parents=True, exist_ok=True)
                (directory / f"slow-save-rank{rank}").write_text(f"{name} at step {step}\n")
                time.sleep(3600)
            return write(*args, **kwargs)

        return stalling


class _OneProcess:
    """What save_directory_atomically needs of a strategy, for one process."""

    is_global_zero = True

    def broadcast(self, obj):
        return obj

    def barrier(self, name=None):
        pass


def _write_forever(directory: Path, layout: str) -> None:
    """Save ever newer checkpoints to DIR/last.ckpt (a file, or a DCP directory) until killed;
    DIR/committed names the last version whose save returned."""
    import torch.distributed.checkpoint as dcp

    from maskvid.launch.checkpoint_io import AtomicCheckpointIO, save_directory_atomically

    io = AtomicCheckpointIO()
    weights = torch.randn(16, 1024, 1024)  # 64 MiB: each write takes a while
    version = 0
    while True:
        version += 1
        weights[0, 0, 0] = version
        state = {"version": torch.tensor(version), "weights": weights}
        if layout == "file":
            io.save_checkpoint({"version": version, "weights": weights}, directory / "last.ckpt")
        else:
            save_directory_atomically(_OneProcess(), directory / "last.ckpt",
                                      lambda staging: dcp.save(state, checkpoint_id=str(staging), no_dist=True))
        (directory / "committed").write_text(str(version))


# -- the test side: commands, launches, signals, checkpoint states ------------------------------------


def fit_command(setup, model: str, run: Path, strategy: str = "ddp", devices: int = 2, steps: int = STEPS,
                save_top_k: int = -1) -> list[str]:
    """One `maskvid fit` command line (the repo's configs/trainer/{strategy}.yaml), the same for the
    first run and every resume: checkpoints every 2 steps (and last.ckpt), a step log, and
    `--ckpt_path auto`."""
    data = setup["data"]
    return [
        sys.executable, "-m", "maskvid.launch.cli", "fit",
        "--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(REPO / f"configs/trainer/{strategy}.yaml"),
        "--config", str(setup["configs"][model]),
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.max_steps", str(steps),
        "--trainer.deterministic", "true", "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(run / "checkpoints"), "--trainer.callbacks.filename", "{step}",
        "--trainer.callbacks.every_n_train_steps", "2", "--trainer.callbacks.save_top_k", str(save_top_k),
        "--trainer.callbacks.save_last", "true",
        "--trainer.callbacks+=tests.reliability_helpers.StepLog",
        "--trainer.callbacks+=tests.reliability_helpers.SlowShardWrite",
        "--data.train_shards", str(data / "train"), "--data.val_shards", str(data / "val"),
        "--data.num_frames", "9", "--data.resolution", "32", "--data.batch_size", "2", "--data.num_workers", "0",
        "--ckpt_path", "auto",
    ]


def _env(log_dir: Path, extra: Optional[dict] = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    # One compute thread per rank whoever launches it (Lightning's launcher picks cores // ranks,
    # torchrun and launch/slurm/srun_fit.sh 1): another thread count sums in another order, and
    # a resumed run is compared bit for bit with a run started some other way.
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **{STEP_LOG_ENV: str(log_dir)}, **(extra or {}))
    return env


def launch(command: list[str], log_dir: Path, env: Optional[dict] = None) -> subprocess.Popen:
    """Lightning's own launcher: rank 0 starts rank 1 as its child. A session of its own, so a
    kill of the process group reaches every rank."""
    out = open(log_dir.with_suffix(".out"), "w")
    return subprocess.Popen(command, cwd=REPO, env=_env(log_dir, env), stdout=out, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, slurm_job: Optional[str] = None) -> dict:
    """What a launcher sets for one rank of a one-node job: torchrun-like variables (Lightning then
    starts no processes itself), or srun's when `slurm_job` is given (SLURMEnvironment)."""
    if slurm_job is None:
        return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                "NODE_RANK": "0", "LOCAL_RANK": str(rank)}
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "SLURM_JOB_ID": slurm_job,
            "SLURM_JOB_NAME": "maskvid-test", "SLURM_NTASKS": str(world), "SLURM_NTASKS_PER_NODE": str(world),
            "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
            "SLURM_NODELIST": "127.0.0.1"}


def launch_ranks(command: list[str], log_dir: Path, world: int = 2, slurm_job: Optional[str] = None,
                 env: Optional[dict] = None) -> list[subprocess.Popen]:
    """One process per rank, as torchrun or srun start them, so each can get its own signal and
    report its own exit status. Output of rank r goes to LOG_DIR.rank{r}.out."""
    port = free_port()
    procs = []
    for rank in range(world):
        out = open(log_dir.with_suffix(f".rank{rank}.out"), "w")
        procs.append(subprocess.Popen(command, cwd=REPO, env=_env(log_dir, {**rank_env(rank, world, port, slurm_job),
                                                                               **(env or {})}),
                                      stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return procs


def output(log_dir: Path, rank: Optional[int] = None) -> str:
    return (log_dir.with_suffix(".out") if rank is None else log_dir.with_suffix(f".rank{rank}.out")).read_text()


def finish(proc: subprocess.Popen, log_dir: Path, timeout: float = 400) -> str:
    proc.wait(timeout=timeout)
    return output(log_dir)


def run_to_end(command: list[str], log_dir: Path) -> str:
    proc = launch(command, log_dir)
    text = finish(proc, log_dir)
    assert proc.returncode == 0, text[-5000:]
    return text


def last_step(log_dir: Path, rank: int) -> int:
    return max((r["step"] for r in read_step_log(log_dir, rank)), default=-1)


def wait_until(condition: Callable[[], bool], procs: list[subprocess.Popen], log_dir: Path, what: str,
               timeout: float = 300) -> None:
    import pytest

    deadline = time.monotonic() + timeout
    while not condition():
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"the run ended before {what}:\n{_tails(log_dir)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached in {timeout} s\n{_tails(log_dir)}")
        time.sleep(0.02)


def _tails(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.parent.glob(log_dir.name + ".*out")))


def signal_at(proc: subprocess.Popen, log_dir: Path, step: int, signum: int, timeout: float = 300) -> None:
    """Send `signum` to the run's whole process group once both ranks have finished `step`."""
    wait_until(lambda: min(last_step(log_dir, r) for r in (0, 1)) >= step, [proc], log_dir, f"step {step}", timeout)
    os.killpg(proc.pid, signum)


def per_step(log_dir: Path, rank: int, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_step_log(log_dir, rank) if key in r}


def saved_step(path: Path) -> int:
    """The global step a complete checkpoint (file, DCP or DeepSpeed directory) holds."""
    from maskvid.checkpoint_files import checkpoint_kind, verify_checkpoint

    kind = checkpoint_kind(verify_checkpoint(path))
    if kind == "file":
        return torch.load(path, weights_only=True)["global_step"]
    if kind == "dcp":
        return torch.load(path / "meta.pt", weights_only=True)["global_step"]
    return torch.load(next(path.rglob("mp_rank_00_model_states.pt")), weights_only=False)["global_step"]


def training_state(path: Path) -> dict:
    """Everything a resume restores, from any checkpoint layout, sharded ones consolidated:
    `weights` (full tensors: trained, EMA, buffers), `optimizer` (AdamW moments and step counts,
    per rank for DeepSpeed, whose partitions depend only on the world size), `lr_schedulers`,
    `global_step`, `data` (the train loader's position) and the standing callbacks' state."""
    from maskvid.checkpoint_files import checkpoint_kind, verify_checkpoint

    path = Path(path)
    kind = checkpoint_kind(verify_checkpoint(path))
    if kind == "file":
        checkpoint = torch.load(path, weights_only=True)
        weights, optimizer = checkpoint["state_dict"], checkpoint["optimizer_states"]
    elif kind == "dcp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(path, Path(tmp) / "full.pt")
            full = torch.load(Path(tmp) / "full.pt", weights_only=True)
        checkpoint = torch.load(path / "meta.pt", weights_only=True)
        weights = full["state_dict"]
        optimizer = [full[k] for k in sorted(full) if k.startswith("optimizer_")]
    else:
        from maskvid.checkpoint_files import read_checkpoint

        weights = read_checkpoint(path)["state_dict"]  # ZeRO partitions gathered to full fp32 tensors
        tag = path / (path / "latest").read_text().strip()
        checkpoint = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
        # What the fp32 master partitions and AdamW moments of each rank hold; plain data only
        # (DeepSpeed's loss-scaler object aside).
        optimizer = {f.name: {k: v for k, v in torch.load(f, weights_only=False)["optimizer_state_dict"].items()
                              if k in ("base_optimizer_state", "single_partition_of_fp32_groups", "fp32_flat_groups")}
                     for f in sorted(tag.glob("*optim_states.pt"))}
    return {"global_step": checkpoint["global_step"], "weights": weights, "optimizer": optimizer,
            "lr_schedulers": checkpoint["lr_schedulers"],
            "data": checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"],
            "callbacks": {k: checkpoint["callbacks"][k] for k in ("NonFiniteGuard", "StepSeed")}}


def assert_close(x, y, where: str, tolerance: float = TOLERANCE) -> None:
    """Nested checkpoint data equal: tensors and floats to `tolerance`, everything else exactly."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.shape == y.shape, where
        assert torch.allclose(x.double(), y.double(), atol=tolerance, rtol=0), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            assert_close(x[k], y[k], f"{where}.{k}", tolerance)
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_close(u, v, f"{where}[{i}]", tolerance)
    elif isinstance(x, float):
        assert abs(x - y) <= tolerance, where
    else:
        assert x == y, where


def assert_same_state(a: Path, b: Path, tolerance: float = TOLERANCE) -> None:
    """Two checkpoints (any layout) hold the same training state: weights (EMA, codebook buffers),
    optimizer and scheduler states, step, data position and the standing callbacks' state."""
    sa, sb = training_state(a), training_state(b)
    assert sa["global_step"] == sb["global_step"]
    assert any(".ema" in k or "_ema." in k for k in sa["weights"])
    assert sa["optimizer"], "no optimizer state"
    for part in ("weights", "optimizer", "lr_schedulers", "data", "callbacks"):
        assert_close(sa[part], sb[part], part, tolerance)


def kill_and_resume(setup, model: str, tmp_path: Path, keys: tuple[str, ...], strategy: str = "ddp",
                    reference: Optional[Path] = None, seed: Optional[int] = None) -> dict:
    """kill -9 of a 2-process run at a seeded random step, then the very same command: every loss
    after the resume equals the uninterrupted run's (`reference`, run here unless given: the
    directory whose step log is REFERENCE.log and run dir REFERENCE) to TOLERANCE, and so does the
    final training state. Returns what happened, for the caller's own checks."""
    import random

    import pytest

    if reference is None:
        reference = tmp_path / "reference"
        run_to_end(fit_command(setup, model, reference, strategy), reference.with_suffix(".log"))
    run = tmp_path / "run"
    command = fit_command(setup, model, run, strategy)
    kill_step = random.Random(seed).randint(3, 8)
    proc = launch(command, tmp_path / "log-killed")
    signal_at(proc, tmp_path / "log-killed", kill_step, signal.SIGKILL)
    finish(proc, tmp_path / "log-killed")
    assert proc.returncode == -signal.SIGKILL, f"kill at step {kill_step}"
    # What the kill left: every checkpoint under its final name is complete.
    left = {path.name: saved_step(path) for path in (run / "checkpoints").glob("*.ckpt")}
    saved_at = max(left.values())
    assert 2 <= saved_at <= kill_step + 1, (left, kill_step)

    text = run_to_end(command, tmp_path / "log-resumed")  # the very same command
    chosen = [line.split(" -> ", 1)[1] for line in text.splitlines() if "--ckpt_path auto ->" in line]
    assert chosen and left.get(Path(chosen[0]).name) == saved_at, (chosen, left, text[-3000:])
    for rank in (0, 1):
        for key in keys:
            expected = per_step(reference.with_suffix(".log"), rank, key)
            before = per_step(tmp_path / "log-killed", rank, key)
            after = per_step(tmp_path / "log-resumed", rank, key)
            assert sorted(expected) == list(range(STEPS)) or key != "loss"
            resumed_from = min(after)
            assert resumed_from == saved_at and max(after) == STEPS - 1, (kill_step, saved_at, sorted(after))
            for step, value in {**before, **after}.items():
                assert value == pytest.approx(expected[step], abs=TOLERANCE), (
                    f"rank {rank} {key} at step {step}: killed at {kill_step}, resumed from {resumed_from}")
    assert_same_state(run / "checkpoints" / "last.ckpt", reference / "checkpoints" / "last.ckpt")
    return {"kill_step": kill_step, "saved_at": saved_at, "left": left}


if __name__ == "__main__":
    mode, _, layout = sys.argv[1].rpartition("-")
    if mode == "write-forever":
        _write_forever(Path(sys.argv[2]), layout)
