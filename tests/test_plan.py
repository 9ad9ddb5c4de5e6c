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
    (maskvid.launch.plan's subclass without module hooks, which the GAN's R1 penalty breaks), from the
    start to the end of the last batch (optimizer state exists by then). Writes peak-rank{N}.json."""

    @staticmethod
    def _last(trainer) -> bool:
        return trainer.global_step + 1 == trainer.max_steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._last(trainer):
            return
        from torch import nn

        from maskvid.launch.plan_trace import _PeakTracker

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
    from maskvid.launch.plan import make_plan, trace_recipe

    overrides = DATA + (GAN_ON if model == "tokenizer" else [])
    traces = trace_recipe(configs(setup, model, strategy), overrides, device="cpu", checkpointing=False)
    plan = make_plan(traces, "h100", devices, activation_checkpointing=False)
    return int(plan.memory_gib["total"] * GiB), plan


@pytest.mark.parametrize("model,strategy,devices", [
    ("tokenizer", "single", 1),
    ("mebt", "single", 1),
    pytest.param("maskgit", "ddp", 2, marks=pytest.mark.slow),
    pytest.param("mebt", "fsdp", 2, marks=pytest.mark.slow),
    pytest.param("tokenizer", "ddp", 2, marks=pytest.mark.slow),
    pytest.param("tokenizer", "fsdp", 2, marks=pytest.mark.slow),
])
def test_planned_memory_matches_a_real_cpu_step(setup, model, strategy, devices, tmp_path):
    real = measured_peak(setup, model, strategy, devices, tmp_path / "run")
    planned, plan = planned_peak(setup, model, strategy, devices)
    assert plan.strategy == (strategy if devices > 1 or strategy != "single" else "single")
    error = planned / real - 1
    print(f"{model} {strategy} x{devices}: planned {planned / 2**20:.2f} MiB, measured {real / 2**20:.2f} MiB, {error:+.1%}")
    assert abs(error) <= TOLERANCE, (planned, real, plan.memory_gib)


# The demo's maskgit widened to d=8192 (4.4B trainable parameters): too big for one L40S.
BIG = ["--set", "model.init_args.backbone.init_args.dim=8192"]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """The JSON plan from the CLI on 1 x L40S, and the traces for other world sizes (fake tensors:
    the trace of a 4B-parameter model costs what the tiny one's does)."""
    import contextlib
    import io

    from maskvid.launch.cli import main
    from maskvid.launch.plan import trace_recipe

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["plan", "--config", str(REPO / "configs/experiment/maskgit_demo.yaml"), *BIG,
                       "--gpus", "1", "--gpu", "l40s", "--json"])
    assert status == 0
    traces = trace_recipe([str(REPO / "configs/experiment/maskgit_demo.yaml")],
                          ["--model.init_args.backbone.init_args.dim", "8192"], gpu="h100", checkpointing=False)
    return json.loads(out.getvalue()), traces


def test_too_big_for_one_gpu_says_so_and_what_would_fit(big):
    plan, _ = big
    assert 4e9 < plan["parameters"]["trainable"] < 5e9
    assert not plan["fits"] and plan["memory_gib"]["total"] > plan["capacity_gib"]
    # The fp32 parameters (and EMA copy) and AdamW state of 4.4B parameters alone.
    assert plan["memory_gib"]["parameters"] + plan["memory_gib"]["optimizer"] > 40
    advice = " ".join(plan["suggestions"])
    assert "more GPUs" in advice and ("fsdp" in advice or "deepspeed_zero3" in advice)
    assert plan["tokens_per_clip"] == 5 * 8 * 8
    # About 6 FLOPs per trainable parameter per token (forward and backward matmuls), plus the
    # attention's: a forward-only or double count falls outside.
    dense = 6 * plan["parameters"]["trainable"] * plan["tokens_per_clip"] * plan["batch_per_gpu"]
    assert 1.0 < plan["flops_per_step"] / dense < 2.0, plan["flops_per_step"] / dense
    # MFU: the model FLOPs over the step time at the GPU's peak (TF32, the parameters being fp32).
    from maskvid.launch.plan import GPUS

    peak = GPUS["l40s"].tf32_tflops * 1e12
    assert plan["mfu"] == pytest.approx(plan["model_flops_per_step"] / (plan["step_seconds"] * peak), rel=1e-9)
    assert 0 < plan["mfu"] < 1


def test_fsdp_divides_parameter_memory_by_the_world_size(big):
    from maskvid.launch.plan import format_plan, make_plan

    _, traces = big
    frozen = make_plan(traces, "h100", 1, strategy="fsdp").parameters["frozen"] * 4 / GiB
    sharded = {n: make_plan(traces, "h100", n, strategy="fsdp").memory_gib["parameters"] - frozen for n in (1, 8, 64)}
    assert sharded[8] == pytest.approx(sharded[1] / 8, rel=0.02)
    assert sharded[64] == pytest.approx(sharded[1] / 64, rel=0.05)
    ddp = make_plan(traces, "h100", 8, strategy="ddp")
    fsdp = make_plan(traces, "h100", 8, nodes=1, strategy="fsdp")
    assert fsdp.memory_gib["optimizer"] == pytest.approx(ddp.memory_gib["optimizer"] / 8, rel=0.02)
    assert not ddp.fits and fsdp.fits
    # Across nodes the network, slower than NVLink, carries the collectives.
    assert make_plan(traces, "h100", 64, nodes=8, strategy="fsdp").communication_seconds > \
        make_plan(traces, "h100", 8, nodes=1, strategy="fsdp").communication_seconds
    text = format_plan(ddp)
    assert "DOES NOT FIT" in text and "fsdp" in text


def test_a_bf16_text_encoder_is_planned_at_two_bytes_a_parameter():
    from maskvid.launch.plan import count_model, load_recipe

    demo = [str(REPO / "configs/experiment/mebt_demo.yaml")]
    full = count_model(load_recipe(demo).module)
    half = count_model(load_recipe(demo, ["--model.init_args.text_encoder_dtype", "bf16"]).module)
    encoder = load_recipe(demo).module.text_encoder
    encoder_params = sum(p.numel() for p in encoder.parameters())
    assert full.frozen == half.frozen and encoder_params > 1e6
    assert full.frozen_bytes - half.frozen_bytes == 2 * encoder_params
