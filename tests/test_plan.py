"""`maskvid plan` against reality: its per-GPU memory for the CPU device (the same trace on real
CPU tensors) against the peak of real `maskvid fit` steps on CPU, single process and over two gloo
processes with DDP and FSDP2, for both stages; and its verdict and advice on a config too big for
one GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import Callback

from tests.conftest import REPO, run_cli
from tests.stage2_fixtures import tiny_training_setup

TOLERANCE = 0.15
GiB = 1024**3


class PeakMemory(Callback):
    """Measures a real training step: live tensor storages (parameters, buffers, gradients,
    optimizer state, activations, temporaries, communication buffers) under torch's MemTracker
    (launch.plan's subclass without module hooks, which the GAN's R1 penalty breaks), from the
    start to the end of the last batch (optimizer state exists by then). Writes peak-rank{N}.json."""

    @staticmethod
    def _last(trainer) -> bool:
        return trainer.global_step + 1 == trainer.max_steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._last(trainer):
            return
        from torch import nn

        from launch.plan import _PeakTracker

        self.tracker = _PeakTracker()
        text_encoder = getattr(pl_module, "text_encoder", None)
        externals = [pl_module, *[getattr(o, "optimizer", o) for o in trainer.optimizers]]
        externals += [text_encoder] if isinstance(text_encoder, nn.Module) else []
        self.tracker.track_external(*externals)
        self.tracker._track_module_params_and_buffers(pl_module, install_grad_hooks=True)
        self.tracker.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if getattr(self, "tracker", None) is None:
            return
        self.tracker.__exit__(None, None, None)
        snap = self.tracker.get_tracker_snapshot("peak")
        peak = {getattr(k, "value", str(k)): int(v) for dev in snap.values() for k, v in dev.items()}
        Path(trainer.default_root_dir, f"peak-rank{trainer.global_rank}.json").write_text(json.dumps(peak))
        self.tracker = None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_training_setup(tmp_path_factory.mktemp("plan"))


# Every step of the GAN tokenizer with the adversarial term and the R1 penalty on: the planner's
# steady state (it plans the heaviest step).
# (From step 1: in a real fit the R1 penalty's autograd.grad fails on the very first batch, with
# "A leaf node was passed to _will_engine_execute_node", outside the planner.)
GAN_ON = ["--model.init_args.gan_start_step", "1", "--model.init_args.gp_every", "1"]
DATA = ["--data.num_frames", "9", "--data.resolution", "32", "--data.batch_size", "2", "--data.num_workers", "0"]


def configs(setup, model: str, strategy: str) -> list[str]:
    """configs/trainer/cpu.yaml and the strategy's YAML without their callbacks (the throughput
    callback's FLOP counter breaks the R1 penalty's autograd.grad in a real step)."""
    out = []
    for name in ["cpu"] + ([strategy] if strategy != "single" else []):
        doc = yaml.safe_load((REPO / f"configs/trainer/{name}.yaml").read_text())
        doc["trainer"].pop("callbacks", None)
        path = setup["root"] / f"trainer-{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        out.append(str(path))
    return out + [str(setup["configs"][model])]


def measured_peak(setup, model: str, strategy: str, devices: int, run: Path) -> int:
    """The largest per-process peak of the last batch of a real fit."""
    data = setup["data"]
    # Stage 1: batch 0 without the GAN, batch 1 the discriminator's first step, batch 2 measured.
    steps = 3 if model == "tokenizer" else 2
    args = [a for c in configs(setup, model, strategy) for a in ("--config", c)]
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.max_steps", str(steps),
             "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(run),
             "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
             "--trainer.enable_checkpointing", "false", "--trainer.callbacks+=tests.test_plan.PeakMemory",
             "--data.train_shards", str(data / "train"), "--data.val_shards", str(data / "val"), *DATA]
    args += GAN_ON if model == "tokenizer" else []
    out = run_cli("fit", *args, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]
    peaks = [json.loads((run / f"peak-rank{r}.json").read_text()) for r in range(devices)]
    return max(p["Total"] for p in peaks)


def planned_peak(setup, model: str, strategy: str, devices: int) -> tuple[int, object]:
    from launch.plan import make_plan, trace_recipe

    overrides = DATA + (GAN_ON if model == "tokenizer" else [])
    traces = trace_recipe(configs(setup, model, strategy), overrides, device="cpu", checkpointing=False)
    plan = make_plan(traces, "h100", devices, activation_checkpointing=False)
    return int(plan.memory_gib["total"] * GiB), plan


@pytest.mark.parametrize("model,strategy,devices", [
    ("tokenizer", "single", 1),
    ("mebt", "single", 1),
    ("maskgit", "ddp", 2),
    ("mebt", "fsdp", 2),
    ("tokenizer", "ddp", 2),
    ("tokenizer", "fsdp", 2),
])
def test_planned_memory_matches_a_real_cpu_step(setup, model, strategy, devices, tmp_path):
    real = measured_peak(setup, model, strategy, devices, tmp_path / "run")
    planned, plan = planned_peak(setup, model, strategy, devices)
    assert plan.strategy == (strategy if devices > 1 or strategy != "single" else "single")
    error = planned / real - 1
    print(f"{model} {strategy} x{devices}: planned {planned / 2**20:.2f} MiB, measured {real / 2**20:.2f} MiB, {error:+.1%}")
    assert abs(error) <= TOLERANCE, (planned, real, plan.memory_gib)
