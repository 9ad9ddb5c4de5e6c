"""Multi-process training on CPU over gloo, through the real `maskvid fit` and the repo's own
configs/trainer/*.yaml: stage 2 (both backbones) under DDP, FSDP2, ZeRO-2 and ZeRO-3; the GAN
tokenizer under DDP and FSDP2 (and refused by DeepSpeed); activation checkpointing under DDP, FSDP2
and ZeRO-3 (recomputed, same losses); FSDP2 resume at 2 -> 1 -> 2 processes; two "nodes" on one
machine through env vars and through torchrun."""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from tests.conftest import REPO, run_cli
from tests.stage2_fixtures import BACKBONES, tiny_training_setup

pytestmark = pytest.mark.slow

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_training_setup(tmp_path_factory.mktemp("dist"))


def fit_args(setup, model: str, strategy: str, run: Path, devices: int, steps: int) -> list[str]:
    data = setup["data"]
    return [
        "--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(REPO / f"configs/trainer/{strategy}.yaml"),
        "--config", str(setup["configs"][model]),
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.max_steps", str(steps),
        "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(run),
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(run / "checkpoints"), "--trainer.callbacks.filename", "{step}",
        "--trainer.callbacks.every_n_train_steps", "2", "--trainer.callbacks.save_top_k", "-1",
        "--trainer.callbacks.save_last", "true",
        "--data.train_shards", str(data / "train"), "--data.val_shards", str(data / "val"),
        "--data.num_frames", "9", "--data.resolution", "32", "--data.batch_size", "2", "--data.num_workers", "0",
    ]


def losses(run: Path, key: str = "train/loss") -> dict[int, float]:
    out = {}
    for path in sorted(run.rglob("metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    out[int(row["step"])] = float(row[key])
    return out


def saved_step(path: Path) -> int:
    """global_step recorded in a checkpoint file or a sharded checkpoint directory."""
    if path.is_dir():
        meta = path / "meta.pt"
        if meta.is_file():  # DCP (FSDP2)
            return torch.load(meta, weights_only=True)["global_step"]
        # DeepSpeed: Lightning's state rides with rank 0's model states (ZeRO-3 writes one per rank).
        client = min(path.rglob("*model_states.pt"), key=lambda p: (p.name != "mp_rank_00_model_states.pt", p.name))
        return torch.load(client, weights_only=False)["global_step"]
    return torch.load(path, weights_only=True)["global_step"]


class _CheckFSDPLayout(Callback):
    """Records, inside an FSDP2 run, what the strategy did to every network, as
    `layout-rank{N}.json` in the run directory: the dtype each FSDP unit computes in (seen by a
    forward pre-hook, after FSDP's own has gathered the weights), and what is sharded, fp32 and
    optimised."""

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp import FSDPModule

        self.compute = {}
        for network in pl_module.parallel_networks():
            for name, sub in (network.named_modules() if network is not None else ()):
                if isinstance(sub, FSDPModule) and sub is not network:
                    # A checkpointed block's unit is its wrapper: name it by the block inside.
                    inner = sub._checkpoint_wrapped_module if isinstance(sub, CheckpointWrapper) else sub
                    kind = type(inner).__name__.removeprefix("FSDP")
                    sub.register_forward_pre_hook(functools.partial(self._record, kind))

    def _record(self, kind: str, module, args) -> None:
        self.compute.setdefault(kind, set()).add(str(next(module.parameters()).dtype))

    def on_train_end(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        networks = [n for n in pl_module.parallel_networks() if n is not None]
        trained = [n for n in networks if not getattr(n, "replicate_under_fsdp", False)]
        replicated = [n for n in networks if getattr(n, "replicate_under_fsdp", False)]
        optimised = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        frozen = []
        if hasattr(pl_module, "text_encoder"):  # stage 2: the tokenizer and the text encoder
            frozen = [*pl_module.tokenizer.parameters(), *pl_module.text_encoder.model.parameters()]
        report = {
            "compute_dtypes": {k: sorted(v) for k, v in self.compute.items()},
            "trained_all_sharded": all(isinstance(p, DTensor) for n in trained for p in n.parameters()),
            "replicated": [type(n).__name__ for n in replicated
                           if not any(isinstance(p, DTensor) for p in n.parameters())],
            # Replicas must stay identical: their gradients are averaged over the ranks.
            "replicated_checksum": [float(sum(p.double().abs().sum() for p in n.parameters())) for n in replicated],
            "codes_restarted": int(getattr(getattr(pl_module.tokenizer, "quantizer", None), "restarted_total", 0)),
            "master_dtypes": sorted({str(p.dtype) for n in networks for p in n.parameters()}),
            "buffer_dtypes": sorted({str(b.dtype) for n in trained for b in n.buffers() if b.is_floating_point()}),
            "checkpointed_blocks": sum(isinstance(m, CheckpointWrapper) for n in networks for m in n.modules()),
            "frozen_count": len(frozen),
            "frozen_sharded": any(isinstance(p, DTensor) for p in frozen),
            "frozen_trainable": any(p.requires_grad for p in frozen),
            "frozen_optimised": any(id(p) in optimised for p in frozen),
        }
        Path(trainer.default_root_dir, f"layout-rank{trainer.global_rank}.json").write_text(json.dumps(report))


def check_fsdp_layout(run: Path, units: dict[str, str]) -> dict:
    for rank in (0, 1):
        layout = json.loads((run / f"layout-rank{rank}.json").read_text())
        for unit, dtype in units.items():
            assert layout["compute_dtypes"].get(unit) == [dtype], layout
        assert layout["trained_all_sharded"] and layout["master_dtypes"] == ["torch.float32"], layout
        assert set(layout["buffer_dtypes"]) <= {"torch.float32"}, layout
        assert not (layout["frozen_sharded"] or layout["frozen_trainable"] or layout["frozen_optimised"]), layout
    return layout


def check_run(out: subprocess.CompletedProcess, run: Path, steps: int) -> dict[int, float]:
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]
    logged = losses(run)
    assert sorted(logged) == list(range(steps)), logged
    assert all(math.isfinite(v) for v in logged.values())
    assert saved_step(run / "checkpoints" / "last.ckpt") == steps
    return logged


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
@pytest.mark.parametrize("backbone", ["maskgit", "mebt"])
def test_stage2_trains_on_two_processes(setup, strategy, backbone, tmp_path):
    run = tmp_path / "run"
    layout = ["--trainer.callbacks+=tests.test_distributed._CheckFSDPLayout"] if strategy == "fsdp" else []
    out = run_cli("fit", *fit_args(setup, backbone, strategy, run, devices=2, steps=4), *layout, timeout=600)
    check_run(out, run, 4)
    if strategy == "fsdp":
        # Blocks compute in bf16 over fp32 master weights; the frozen tokenizer and text encoder
        # stay whole, frozen and outside the optimizer.
        block = {"maskgit": "CrossBlock", "mebt": "EncoderLayer"}[backbone]
        assert check_fsdp_layout(run, {block: "torch.bfloat16"})["frozen_count"] > 0
    last = run / "checkpoints" / "last.ckpt"
    # Sharded strategies write sharded directories; DDP one file.
    assert last.is_dir() == (strategy != "ddp")
    if backbone == "maskgit":
        # Any of them exports to a model directory (config.json + model.safetensors, no optimizer
        # state) that `maskvid generate` takes, with the very weights the checkpoint holds.
        from safetensors.torch import load_file

        from maskvid import TextToVideo

        exported = tmp_path / "model"
        out = run_cli("ckpt", "export", str(last), "--out", str(exported))
        assert out.returncode == 0, out.stderr[-3000:]
        assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
        weights = load_file(exported / "model.safetensors")
        assert weights and all(k.startswith(("backbone.", "tokenizer.")) for k in weights)
        direct, loaded = TextToVideo.from_checkpoint(last), TextToVideo.from_pretrained(exported)
        for a, b in ((direct.backbone, loaded.backbone), (direct.tokenizer.network, loaded.tokenizer.network)):
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        gen = run_cli("generate", "--ckpt", str(exported), "--prompt", "a red circle moving left", "--num-frames", "9",
                      "--steps", "2", "--out", str(tmp_path / "gen"), "--quiet")
        assert gen.returncode == 0, gen.stderr[-3000:]
        from maskvid.datamodules.video_io import decode_all

        (item,) = json.loads((tmp_path / "gen" / "index.json").read_text())
        assert item["prompt"] == "a red circle moving left"
        assert decode_all(Path(item["path"]).read_bytes()).shape == (9, 32, 32, 3)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gan_tokenizer_trains_on_two_processes(setup, strategy, tmp_path):
    run = tmp_path / "run"
    layout = ["--trainer.callbacks+=tests.test_distributed._CheckFSDPLayout"] if strategy == "fsdp" else []
    out = run_cli("fit", *fit_args(setup, "tokenizer", strategy, run, devices=2, steps=4), *layout, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]
    if strategy == "fsdp":
        # The codebook computes in fp32 (its own unit), the transformer blocks in bf16.
        layout = check_fsdp_layout(run, {"VectorQuantizer": "torch.float32", "Block": "torch.bfloat16"})
        assert layout["replicated"] == ["VideoDiscriminator"]  # R1's double backward: not sharded
        other = json.loads((run / "layout-rank0.json").read_text())
        assert layout["replicated_checksum"] == other["replicated_checksum"]
        # Dead codes were restarted (every 2 steps) by writing into the sharded codebook.
        assert layout["codes_restarted"] > 0
    assert all(math.isfinite(v) for v in losses(run, "train/d_loss").values()) and losses(run, "train/d_loss")
    assert saved_step(run / "checkpoints" / "last.ckpt") == 4


def test_deepspeed_refuses_the_gan_tokenizer_with_a_reason(setup, tmp_path):
    out = run_cli("fit", *fit_args(setup, "tokenizer", "deepspeed_zero2", tmp_path / "run", devices=1, steps=2))
    assert out.returncode != 0
    assert "DeepSpeed takes one optimizer" in out.stderr and "fsdp.yaml" in out.stderr


def test_fsdp_checkpoint_resumes_on_one_and_on_two_processes(setup, tmp_path):
    full = tmp_path / "full"
    reference = check_run(run_cli("fit", *fit_args(setup, "maskgit", "fsdp", full, devices=2, steps=6), timeout=600),
                          full, 6)
    at4 = full / "checkpoints" / "step=4.ckpt"
    assert (at4 / ".metadata").is_file()

    # Same world size: the resumed steps are the uninterrupted ones. This run also recomputes
    # activations (activation checkpointing per block), which must not change a loss either.
    two = tmp_path / "resume2"
    out = run_cli("fit", *fit_args(setup, "maskgit", "fsdp", two, devices=2, steps=6), "--ckpt_path", str(at4),
                  "--trainer.strategy.init_args.activation_checkpointing", "true",
                  "--trainer.callbacks+=tests.test_distributed._CheckFSDPLayout", timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    blocks = BACKBONES["maskgit"]["init_args"]["depth"]
    # Every block of the backbone is checkpointed (not its EMA copy's, which never runs backward).
    assert check_fsdp_layout(two, {"CrossBlock": "torch.bfloat16"})["checkpointed_blocks"] == blocks
    resumed = losses(two)
    assert sorted(resumed) == [4, 5]
    for step in (4, 5):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5)

    # One process (DCP reshards 2 -> 1): rank 0 sees the same batch at step 4, so the first loss
    # continues the sequence; later ones differ (one rank's gradient instead of two).
    one = tmp_path / "resume1"
    out = run_cli("fit", *fit_args(setup, "maskgit", "fsdp", one, devices=1, steps=6), "--ckpt_path", str(at4),
                  timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    resumed = losses(one)
    assert sorted(resumed) == [4, 5] and resumed[4] == pytest.approx(reference[4], abs=1e-5)
    assert saved_step(one / "checkpoints" / "last.ckpt") == 6

    # And back to two processes (1 -> 2).
    again = tmp_path / "resume2b"
    out = run_cli("fit", *fit_args(setup, "maskgit", "fsdp", again, devices=2, steps=8),
                  "--ckpt_path", str(one / "checkpoints" / "last.ckpt"), timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    assert sorted(losses(again)) == [6, 7]
    assert saved_step(again / "checkpoints" / "last.ckpt") == 8


class _RecordCheckpointing(Callback):
    """Writes `checkpointing-rank{N}.json` in the run directory: how many blocks of the trained
    backbone and of its EMA copy are wrapped for checkpointing, how many block forwards each
    training step ran (recomputation in backward doubles them), the local world size the data
    workers see and the decoder threads that gives, and the throughput callback's FLOP count."""

    def on_train_start(self, trainer, pl_module) -> None:
        from maskvid.launch.strategies import _top_blocks

        self.forwards, self.now = {}, 0
        for blocks, index in _top_blocks(pl_module.backbone):
            inner = getattr(blocks[index], "_checkpoint_wrapped_module", blocks[index])
            inner.register_forward_pre_hook(self._count)

    def _count(self, *_) -> None:
        self.now += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.now = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.forwards[trainer.global_step] = self.now

    def on_train_end(self, trainer, pl_module) -> None:
        from maskvid.datamodules.cpus import decode_threads
        from maskvid.lightning_modules.throughput import TrainingThroughput

        wrapped = lambda net: sum(isinstance(m, CheckpointWrapper) for m in net.modules())  # noqa: E731
        (meter,) = [c for c in trainer.callbacks if isinstance(c, TrainingThroughput) and c._active]
        Path(trainer.default_root_dir, f"checkpointing-rank{trainer.global_rank}.json").write_text(json.dumps({
            "wrapped": wrapped(pl_module.backbone), "ema_wrapped": wrapped(pl_module.backbone_ema.module),
            "forwards": sorted(set(self.forwards.values())),
            "local_world_size": os.environ.get("LOCAL_WORLD_SIZE"), "decode_threads_2_workers": decode_threads(2),
            "flops_per_batch": meter.flops_per_batch,
        }))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed_zero3"])
def test_activation_checkpointing_recomputes_and_keeps_the_losses(setup, strategy, tmp_path):
    """Two processes, the repo's trainer file, with and without `activation_checkpointing`: the
    blocks are wrapped and run twice a step (forward, then recomputed in backward) only when it
    is on, and the losses, after updates too, are the same."""
    blocks = BACKBONES["maskgit"]["init_args"]["depth"]
    runs = {}
    for checkpointing in (False, True):
        run = tmp_path / f"ac-{checkpointing}"
        out = run_cli("fit", *fit_args(setup, "maskgit", strategy, run, devices=2, steps=4),
                      "--trainer.strategy.init_args.activation_checkpointing", str(checkpointing).lower(),
                      "--trainer.callbacks+=tests.test_distributed._RecordCheckpointing", timeout=600)
        runs[checkpointing] = check_run(out, run, 4)
        # Throughput is logged from the second step on (the first is the one whose FLOPs are counted).
        assert sorted(losses(run, "throughput/flops_per_sec")) == [1, 2, 3]
        for rank in (0, 1):
            record = json.loads((run / f"checkpointing-rank{rank}.json").read_text())
            assert record["wrapped"] == (blocks if checkpointing else 0) and record["ema_wrapped"] == 0, record
            assert record["forwards"] == [(2 if checkpointing else 1) * blocks], record
            # The strategy told the data workers that two ranks share this node's CPUs.
            assert record["local_world_size"] == "2" and record["decode_threads_2_workers"] == max(
                1, len(os.sched_getaffinity(0)) // 4), record
            assert record["flops_per_batch"] > 0
    for step in range(4):
        assert runs[True][step] == pytest.approx(runs[False][step], abs=1e-6), (step, runs)


def test_deepspeed_checkpoint_resumes_on_one_process_after_conversion(setup, tmp_path):
    full = tmp_path / "full"
    reference = check_run(
        run_cli("fit", *fit_args(setup, "maskgit", "deepspeed_zero2", full, devices=2, steps=6), timeout=600), full, 6)
    at4 = full / "checkpoints" / "step=4.ckpt"

    # Ahead of time, with the command...
    universal = tmp_path / "step4.universal"
    out = run_cli("ckpt", "universal", str(at4), "--out", str(universal))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "written by 2 ranks" in out.stdout
    one = tmp_path / "resume1"
    out = run_cli("fit", *fit_args(setup, "maskgit", "deepspeed_zero2", one, devices=1, steps=6),
                  "--ckpt_path", str(universal), timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    resumed = losses(one)
    # Rank 0 sees the same batch at step 4, so the loss continues the 2-process sequence.
    assert sorted(resumed) == [4, 5] and resumed[4] == pytest.approx(reference[4], abs=1e-5)
    assert saved_step(one / "checkpoints" / "last.ckpt") == 6

    # ...or by itself, when the world size differs.
    auto = tmp_path / "resume_auto"
    out = run_cli("fit", *fit_args(setup, "maskgit", "deepspeed_zero2", auto, devices=1, steps=6),
                  "--ckpt_path", str(at4), timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    assert "converting it to a universal checkpoint" in out.stdout
    assert losses(auto)[4] == pytest.approx(reference[4], abs=1e-5)


def _two_nodes(commands: list[list[str]], envs: list[dict]) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, env in zip(commands, envs)]
    results = []
    for cmd, p in zip(commands, procs):
        stdout, stderr = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    return results


@pytest.mark.parametrize("launcher", ["env", "torchrun"])
def test_two_nodes_on_one_machine(setup, launcher, tmp_path):
    run = tmp_path / "run"
    port = free_port()
    args = ["fit", *fit_args(setup, "maskgit", "ddp", run, devices=1, steps=4),
            "--config", str(REPO / "configs/trainer/multinode.yaml")]
    if launcher == "env":
        commands = [[sys.executable, "-m", "maskvid.launch.cli", *args]] * 2
        envs = [{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(n), "WORLD_SIZE": "2",
                 "LOCAL_RANK": "0"} for n in range(2)]
    else:  # the repo's launcher for clusters without SLURM, once per "node"
        commands = [["bash", str(REPO / "launch/torchrun.sh"), str(setup["configs"]["maskgit"]), "ddp", *args[1:]]] * 2
        envs = [{"NNODES": "2", "NODE_RANK": str(n), "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port), "PYTHON": sys.executable} for n in range(2)]
    results = _two_nodes(commands, envs)
    for r in results:
        assert r.returncode == 0, r.stderr[-5000:]
    # The second "node" joined as global rank 1 of 2.
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in results[1].stderr + results[1].stdout
    check_run(results[0], run, 4)
