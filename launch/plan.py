"""`maskvid plan`: what one training step of a config needs on a GPU cluster, without a GPU.

The config is parsed and instantiated through the same LightningCLI path as `maskvid fit`, under
`FakeTensorMode` (no weights are allocated, nothing is downloaded: a stage-1 checkpoint or hub text
encoder that is missing is rebuilt from its config). One step of the module's own training logic
(forward, loss, backward, gradient clipping, optimizer step, EMA update) is traced twice, without
and with per-block activation checkpointing, under torch's `MemTracker` (memory by category) and a
roofline mode built on torch's FLOP formulas. The per-GPU memory of each strategy and world size
is then derived from those measurements (see docs/plan.md for the model and its accuracy).

PyTorch's CPU build cannot run autograd on fake `cuda` tensors, so the trace runs on fake `cpu`
tensors with the few CPU-only code paths of the models switched to their GPU form
(`gpu_code_paths`). `device="cpu"` runs the same code on real CPU tensors (the tests compare it
with real steps).

This file holds the GPU table, the strategy model and the report; launch/plan_build.py builds the
config, launch/plan_trace.py traces the step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

from torch import nn

from maskvid.launch.plan_build import PlanError, Recipe, load_recipe
from maskvid.launch.plan_trace import StepTrace, _parallel, trace_step

GiB = 1024**3


@dataclass(frozen=True)
class GPUSpec:
    """A GPU's published dense peak numbers (no sparsity) and memory."""

    name: str
    memory_gib: float  # what the driver reports as total memory
    bf16_tflops: float  # dense tensor-core bf16
    tf32_tflops: float  # dense tensor-core tf32 (fp32 matmuls with TF32 enabled)
    fp32_tflops: float  # non-tensor-core fp32
    hbm_tbps: float  # HBM / GDDR bandwidth, TB/s
    intra_node_gbps: float  # per-GPU one-direction bandwidth to the other GPUs of a node (NVLink or PCIe)
    inter_node_gbps: float  # per-GPU network bandwidth across nodes (assumed fabric, see docs/plan.md)


GPUS: dict[str, GPUSpec] = {
    "h100": GPUSpec("NVIDIA H100 SXM5 80GB", 79.6, 989.4, 494.7, 66.9, 3.35, 450.0, 50.0),
    "a100": GPUSpec("NVIDIA A100 SXM4 80GB", 80.0, 312.0, 156.0, 19.5, 2.039, 300.0, 25.0),
    "h200": GPUSpec("NVIDIA H200 SXM 141GB", 140.4, 989.4, 494.7, 66.9, 4.8, 450.0, 50.0),
    "l40s": GPUSpec("NVIDIA L40S 48GB", 45.0, 362.05, 183.0, 91.6, 0.864, 32.0, 12.5),
}
STRATEGIES = ("single", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


# Fraction of the interconnects' bandwidth collectives reach, and of memory left for tensors.
COMM_EFFICIENCY = 0.8
USABLE_MEMORY = 0.92  # CUDA context, NCCL buffers and allocator fragmentation take the rest

# -- from one traced step to N GPUs --------------------------------------------------------------


@dataclass
class ModelCounts:
    """Parameter counts and bytes that the strategy model shards or replicates."""

    trainable: int  # parameters in some optimizer
    replicated: int  # of those, the ones FSDP keeps whole (networks marked replicate_under_fsdp)
    sharded_frozen: int  # frozen parameters of the sharded networks (EMA copies)
    frozen: int  # frozen networks kept whole on every GPU (text encoder, stage-2 tokenizer)
    buffers_bytes: int
    largest_unit: int  # parameters of the largest FSDP unit (a block)
    root_params: int  # parameters of the networks outside their blocks (gathered all step)
    optimizer_bytes: int  # full (unsharded) optimizer state, fp32
    frozen_bytes: int = 0  # the frozen networks' bytes, in their own dtypes (a bf16 text encoder: 2 a parameter)


def count_model(module) -> ModelCounts:
    from maskvid.launch.strategies import _blocks

    parallel = _parallel(module)
    seen: set[int] = set()
    trainable = sharded_frozen = replicated = 0
    largest = root = 0
    for network in parallel:
        if getattr(network, "replicate_under_fsdp", False):
            replicated += sum(p.numel() for p in network.parameters() if p.requires_grad)
        block_ids = set()
        for block in _blocks(network):
            n = sum(p.numel() for p in block.parameters())
            largest = max(largest, n)
            block_ids |= {id(p) for p in block.parameters()}
        for p in network.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                trainable += p.numel()
            else:
                sharded_frozen += p.numel()
            if id(p) not in block_ids:
                root += p.numel()
    frozen = frozen_bytes = 0
    extra = [*module.parameters()]
    text_encoder = getattr(module, "text_encoder", None)
    if isinstance(text_encoder, nn.Module):
        extra += list(text_encoder.parameters())
    for p in extra:
        if id(p) not in seen:
            seen.add(id(p))
            frozen += p.numel()
            frozen_bytes += p.numel() * p.element_size()
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    # AdamW: exp_avg and exp_avg_sq in fp32 per trainable parameter (+ a step counter).
    return ModelCounts(trainable, replicated, sharded_frozen, frozen, buffers, largest, root, 8 * trainable, frozen_bytes)


@dataclass
class Memory:
    """Per-GPU bytes."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    communication: int

    def total(self, checkpointing: bool) -> int:
        acts = self.activations_checkpointed if checkpointing else self.activations
        return self.parameters + self.gradients + self.optimizer + acts + self.communication


def per_gpu_memory(counts: ModelCounts, trace: StepTrace, trace_ac: StepTrace, strategy: str, world: int,
                   param_dtype: str) -> Memory:
    """The strategy model (docs/plan.md): sharded states / world + the per-GPU micro-batch's
    activations + what is gathered or bucketed at a time."""
    fp32 = 4
    compute_bytes = 2 if param_dtype == "bf16" else 4
    full_params = (counts.trainable + counts.sharded_frozen) * fp32
    frozen = counts.frozen_bytes + counts.buffers_bytes
    grads = counts.trainable * fp32
    opt = counts.optimizer_bytes
    # Gradients alive at the traced peak (with set_to_none some are not allocated yet).
    grad_seen = trace.peak.get("Gradient", 0)
    grad_dtype_scale = fp32 / compute_bytes if (strategy == "fsdp" and param_dtype == "bf16") else 1
    grad_at_peak = min(grads, int(grad_seen * grad_dtype_scale))
    acts = trace.peak.get("Activation", 0) + trace.peak.get("Temp", 0) + trace.peak.get("Other", 0)
    acts_ac = trace_ac.peak.get("Activation", 0) + trace_ac.peak.get("Temp", 0) + trace_ac.peak.get("Other", 0)
    comm = 0
    n = max(1, world)
    if strategy in ("single", "ddp"):
        params, gradients, optimizer = full_params + frozen, grads if (strategy == "ddp" and n > 1) else grad_at_peak, opt
    elif strategy == "fsdp":
        # Networks FSDP must not shard (the discriminator) stay whole: replicated data parallel.
        whole = counts.replicated * fp32
        params = _ceil_div(full_params - whole, n) + whole + frozen
        gradients = _ceil_div(grads - whole, n) + whole
        optimizer = _ceil_div(opt - 2 * whole, n) + 2 * whole
        # Gathered compute copies: the roots' parameters for the whole step, two blocks at a time
        # (the current one and the prefetched next), and one block's unsharded fp32 gradient
        # before its reduce-scatter.
        gathered = (counts.root_params + 2 * counts.largest_unit) * compute_bytes
        if param_dtype == "bf16" or n > 1:
            comm = gathered + counts.largest_unit * fp32
    elif strategy == "deepspeed_zero2":
        params, gradients, optimizer = full_params + frozen, _ceil_div(grads, n), _ceil_div(opt + full_params, n)
        comm = 2 * 200_000_000 * fp32 if n > 1 else 0  # reduce and all-gather buckets
    elif strategy == "deepspeed_zero3":
        params, gradients, optimizer = _ceil_div(full_params, n) + frozen, _ceil_div(grads, n), _ceil_div(opt + full_params, n)
        comm = (2 * 200_000_000 + 2 * counts.largest_unit) * fp32 if n > 1 else 0
    else:
        raise PlanError(f"unknown strategy {strategy}")
    return Memory(params, gradients, optimizer, acts, acts_ac, comm)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def communication_seconds(counts: ModelCounts, strategy: str, world: int, nodes: int, gpu: GPUSpec,
                          param_dtype: str) -> float:
    """Ring collectives: all-reduce moves 2(N-1)/N of the data per GPU, all-gather and
    reduce-scatter (N-1)/N each, over NVLink within a node and the network across nodes."""
    if world <= 1:
        return 0.0
    bw = (gpu.intra_node_gbps if nodes <= 1 else min(gpu.intra_node_gbps, gpu.inter_node_gbps)) * 1e9 * COMM_EFFICIENCY
    frac = (world - 1) / world
    params = counts.trainable + counts.sharded_frozen
    compute_bytes = 2 if param_dtype == "bf16" else 4
    if strategy == "ddp":
        volume = 2 * frac * counts.trainable * 4
    elif strategy == "fsdp":
        # Forward and backward all-gathers of the compute copies, one fp32 reduce-scatter.
        volume = frac * (2 * params * compute_bytes + counts.trainable * 4)
    elif strategy == "deepspeed_zero2":
        volume = frac * (counts.trainable * 4 + params * 4)
    elif strategy == "deepspeed_zero3":
        volume = frac * (2 * params * 4 + counts.trainable * 4 + params * 4)
    else:
        volume = 0.0
    return volume / bw


# -- the plan ------------------------------------------------------------------------------------


@dataclass
class Plan:
    config: list[str]
    stage: int
    gpu: str
    gpus: int
    nodes: int
    strategy: str
    activation_checkpointing: bool
    batch_per_gpu: int
    clip: str
    parameters: dict[str, int]
    tokens_per_clip: int
    memory_gib: dict[str, float]
    memory_gib_checkpointed: float
    capacity_gib: float
    fits: bool
    fits_with_checkpointing: bool
    flops_per_step: float
    model_flops_per_step: float
    compute_seconds: float
    communication_seconds: float
    step_seconds: float
    mfu: float
    suggestions: list[str]
    notes: list[str]
    top_ops_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def tokens_per_clip(recipe: Recipe) -> int:
    grid = recipe.module.tokenizer.token_grid(recipe.num_frames, recipe.resolution)
    return int(math.prod(grid))


@dataclass
class Traces:
    """The traced step (without and with checkpointing) a plan at any world size is made from."""

    recipe: Recipe
    counts: ModelCounts
    plain: StepTrace
    checkpointed: StepTrace
    tokens: int


def trace_recipe(configs: Sequence[str], overrides: Sequence[str] = (), gpu: str = "h100",
                 strategy: str | None = None, device: str = "cuda", checkpointing: bool = True) -> Traces:
    """Instantiate the config twice (a checkpointed copy for the second trace) and trace a step.
    checkpointing=False skips the second trace (its figures then repeat the first's)."""
    fake = device != "cpu"
    spec = GPUS[gpu]
    recipes = []
    for _ in range(2 if checkpointing else 1):
        recipe = load_recipe(configs, overrides, fake=fake)
        if strategy is not None:
            recipe.strategy = strategy
            if strategy != "fsdp":
                recipe.param_dtype = "bf16" if recipe.precision.startswith("bf16") else "fp32"
        recipes.append(recipe)
    counts = count_model(recipes[0].module)
    plain = trace_step(recipes[0], spec, activation_checkpointing=False, fake=fake)
    checkpointed = trace_step(recipes[1], spec, activation_checkpointing=True, fake=fake) if checkpointing else plain
    return Traces(recipes[0], counts, plain, checkpointed, tokens_per_clip(recipes[0]))


def make_plan(traces: Traces, gpu: str, gpus: int, nodes: int = 1, strategy: str | None = None,
              activation_checkpointing: bool | None = None) -> Plan:
    """Per-GPU memory, step time and MFU of the traced step on `gpus` x `gpu` over `nodes` nodes."""
    spec = GPUS[gpu]
    recipe, counts = traces.recipe, traces.counts
    strategy = strategy or recipe.strategy
    if strategy == "single" and gpus > 1:
        strategy = "ddp"
    ac = recipe.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    mem = per_gpu_memory(counts, traces.plain, traces.checkpointed, strategy, gpus, recipe.param_dtype)
    capacity = spec.memory_gib * USABLE_MEMORY
    total = mem.total(ac) / GiB
    total_ac = mem.total(True) / GiB
    trace = traces.checkpointed if ac else traces.plain
    compute = trace.seconds
    comm = communication_seconds(counts, strategy, gpus, nodes, spec, recipe.param_dtype)
    # Communication overlaps with compute (DDP buckets, FSDP prefetch); the longer one sets the step.
    step = max(compute, comm)
    peak = spec.bf16_tflops if recipe.param_dtype == "bf16" else spec.tf32_tflops
    model_flops = traces.plain.flops
    mfu = model_flops / (step * peak * 1e12) if step > 0 else 0.0
    fits = total <= capacity
    suggestions = [] if fits else _suggest(traces, gpu, gpus, nodes, strategy, ac, capacity)
    notes = []
    if trace.unknown_reads:
        notes.append(f"{trace.unknown_reads} values of large tensors were read during the trace and taken as 0")
    return Plan(
        config=recipe.configs, stage=recipe.stage, gpu=spec.name, gpus=gpus, nodes=nodes, strategy=strategy,
        activation_checkpointing=ac, batch_per_gpu=recipe.batch_size,
        clip=f"{recipe.num_frames}x{recipe.resolution}x{recipe.resolution}",
        parameters={"trainable": counts.trainable, "ema": counts.sharded_frozen, "frozen": counts.frozen},
        tokens_per_clip=traces.tokens,
        memory_gib={"parameters": mem.parameters / GiB, "gradients": mem.gradients / GiB,
                    "optimizer": mem.optimizer / GiB, "activations": mem.activations / GiB,
                    "activations_checkpointed": mem.activations_checkpointed / GiB,
                    "communication": mem.communication / GiB, "total": total},
        memory_gib_checkpointed=total_ac, capacity_gib=capacity, fits=fits, fits_with_checkpointing=total_ac <= capacity,
        flops_per_step=float(trace.flops), model_flops_per_step=float(model_flops), compute_seconds=compute,
        communication_seconds=comm, step_seconds=step, mfu=mfu, suggestions=suggestions, notes=notes,
        top_ops_ms={k: round(v * 1e3, 3) for k, v in trace.top_ops.items()},
    )


def _suggest(traces: Traces, gpu: str, gpus: int, nodes: int, strategy: str, ac: bool, capacity: float) -> list[str]:
    """What would make it fit, each checked with the same model."""
    out = []
    dtype = traces.recipe.param_dtype

    def total(s: str, n: int, checkpointing: bool) -> float:
        return per_gpu_memory(traces.counts, traces.plain, traces.checkpointed, s, n, dtype).total(checkpointing) / GiB

    if not ac and total(strategy, gpus, True) <= capacity:
        out.append("turn on activation checkpointing (configs/trainer/fsdp.yaml: activation_checkpointing: true)")
    for s in ("fsdp", "deepspeed_zero3"):
        if s != strategy and total(s, gpus, ac) <= capacity:
            out.append(f"shard parameters, gradients and optimizer state: {s} on the same {gpus} GPU(s)")
        if s != strategy and total(s, gpus, True) <= capacity and not ac:
            out.append(f"{s} with activation checkpointing on the same {gpus} GPU(s)")
    sharded = strategy if strategy in ("fsdp", "deepspeed_zero3") else "fsdp"
    for n in (2, 4, 8, 16, 32, 64, 128, 256, 512):
        if n > gpus and total(sharded, n, True) <= capacity:
            out.append(f"more GPUs: {n} x {gpu} with {sharded} and activation checkpointing")
            break
    acts = traces.checkpointed.peak if ac else traces.plain.peak
    act_bytes = (acts.get("Activation", 0) + acts.get("Temp", 0) + acts.get("Other", 0)) / GiB
    rest = total(sharded, gpus, True) - act_bytes
    b = traces.recipe.batch_size
    if rest < capacity and act_bytes > 0:
        fit_b = int(b * (capacity - rest) / act_bytes)
        if 0 < fit_b < b:
            how = "activation checkpointing" if gpus == 1 else f"{sharded} and activation checkpointing"
            out.append(f"smaller batch: data.batch_size {fit_b} per GPU (with {how}), "
                       f"gradient accumulation (trainer.accumulate_grad_batches) to keep the global batch")
    if not out:
        out.append("no single change fits: the sharded states alone exceed the GPU; use more GPUs or a smaller model")
    return out


def format_plan(plan: Plan) -> str:
    m = plan.memory_gib
    p = plan.parameters
    lines = [
        f"maskvid plan: {' + '.join(plan.config)}",
        f"  stage {plan.stage}, {plan.gpus} x {plan.gpu} on {plan.nodes} node(s), strategy {plan.strategy}, "
        f"activation checkpointing {'on' if plan.activation_checkpointing else 'off'}",
        f"  parameters: {p['trainable'] / 1e6:.1f}M trainable, {p['ema'] / 1e6:.1f}M EMA copy, "
        f"{p['frozen'] / 1e6:.1f}M frozen (text encoder, tokenizer)",
        f"  per-GPU batch: {plan.batch_per_gpu} clips of {plan.clip} -> {plan.tokens_per_clip} tokens per clip",
        "  per-GPU peak memory (GiB):",
        f"    parameters   {m['parameters']:9.2f}",
        f"    gradients    {m['gradients']:9.2f}",
        f"    optimizer    {m['optimizer']:9.2f}",
        f"    activations  {m['activations']:9.2f}   (with checkpointing {m['activations_checkpointed']:.2f})",
        f"    gathered/buffers {m['communication']:5.2f}",
        f"    total        {m['total']:9.2f}   of {plan.capacity_gib:.1f} usable"
        f"   (with checkpointing {plan.memory_gib_checkpointed:.2f})",
        f"  FLOPs per step per GPU: {plan.flops_per_step / 1e12:.2f} TFLOP (model {plan.model_flops_per_step / 1e12:.2f})",
        f"  step time: {plan.step_seconds * 1e3:.1f} ms (compute {plan.compute_seconds * 1e3:.1f} ms, "
        f"communication {plan.communication_seconds * 1e3:.1f} ms, overlapped), MFU {plan.mfu * 100:.1f}%",
    ]
    if plan.fits:
        lines.append("  fits.")
    else:
        lines.append(f"  DOES NOT FIT: {m['total']:.1f} GiB per GPU > {plan.capacity_gib:.1f} GiB usable. What would make it fit:")
        lines += [f"    - {s}" for s in plan.suggestions]
    if plan.top_ops_ms:
        lines.append("  most roofline time: " + ", ".join(f"{k} {v:.1f} ms" for k, v in list(plan.top_ops_ms.items())[:5]))
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
