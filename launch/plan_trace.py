"""`maskvid plan`, part 2: one training step traced, its memory, FLOPs and roofline time.

Two steps of the module's own training logic run (the first creates the optimizer state, the
second is measured) under torch's `MemTracker` for memory by category and a roofline mode built
on torch's FLOP formulas. On fake tensors (`FakeTensorMode`), small tensors keep real values
(`ConcreteSmallTensors`) so that data-dependent shapes come out right, and the models' CPU-only
code paths take their GPU form (`gpu_code_paths`). See docs/plan.md.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterator
from unittest import mock

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from maskvid.launch.plan_build import Recipe

# Fractions of the peaks that kernels reach (roofline efficiencies).
FLOP_EFFICIENCY = 0.75
BANDWIDTH_EFFICIENCY = 0.8


@contextlib.contextmanager
def gpu_code_paths() -> Iterator[None]:
    """Run the models' GPU code paths on (fake) CPU tensors: attention in the input dtype (the CPU
    form upcasts bf16 to fp32), MeBT's sets exact and padded per batch where the CPU form differs,
    and the fused AdamW step a GPU takes."""
    import torch.nn.functional as F

    import maskvid.lightning_modules.masked_video_module as stage2
    import maskvid.lightning_modules.tokenizer_module as stage1
    import maskvid.models.attention as attention
    from maskvid.lightning_modules.optim import _grad_scaler

    def sdpa(q, k, v, attn_mask=None, is_causal=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    def adamw(param_groups, trainer, **kwargs):
        # maskvid.lightning_modules.optim.adamw's rule, for which fake parameters are not plain ones: the
        # fused kernel whenever no fp16 scaler is involved.
        return torch.optim.AdamW(param_groups, fused=_grad_scaler(trainer) is None, **kwargs)

    patches = [(attention, "attention", sdpa), (stage1, "adamw", adamw), (stage2, "adamw", adamw)]
    with contextlib.ExitStack() as stack:
        for owner, name, value in patches:
            stack.enter_context(mock.patch.object(owner, name, value))
        yield


# -- data-dependent values under fake tensors ----------------------------------------------------


class ConcreteSmallTensors(TorchDispatchMode):
    """Under FakeTensorMode, keeps a real CPU copy ("shadow") of every small tensor whose inputs all
    have one (token ids, masks, random draws, counts), so that data-dependent steps (`.item()`,
    `.tolist()`, `nonzero`, boolean indexing) get real values and the fake trace stays exact for
    ragged shapes. Values of large (activation) tensors are unknown; reading one gives 0."""

    LIMIT = 1 << 20  # elements

    def __init__(self) -> None:
        super().__init__()
        self.shadows: dict[int, tuple[Any, torch.Tensor]] = {}
        self.unknown_reads = 0

    def _shadow(self, t: torch.Tensor) -> torch.Tensor | None:
        from torch._subclasses.fake_tensor import FakeTensor

        if not isinstance(t, FakeTensor):
            return t
        entry = self.shadows.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1]

    def _remember(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        key = id(fake)
        self.shadows[key] = (weakref.ref(fake, lambda _, k=key: self.shadows.pop(k, None)), real)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensor

        kwargs = kwargs or {}
        tensors = [t for t in _flat_tensors((args, kwargs))]
        shadows = [self._shadow(t) for t in tensors]
        known = all(s is not None for s in shadows)
        aten = torch.ops.aten
        if func in (aten._local_scalar_dense.default,):
            if known:
                with torch.utils._python_dispatch._disable_current_modes():
                    return shadows[0].item()
            self.unknown_reads += 1
            return False if args[0].dtype == torch.bool else 0
        if func is aten.nonzero.default:
            real = self._real(func, args, kwargs) if known else None
            count = int(real.shape[0]) if real is not None else args[0].numel() // 2
            out = torch.empty((count, args[0].dim()), dtype=torch.long, device=args[0].device)
            if real is not None:
                self._remember(out, real)
            return out
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default):
            # Boolean masks -> the long indices of their True positions (shapes then known).
            indices = list(args[1])
            for i, idx in enumerate(indices):
                if idx is not None and idx.dtype == torch.bool:
                    # Through this mode again (it is not active inside its own handler).
                    nz = self.__torch_dispatch__(aten.nonzero.default, types, (idx,))
                    indices[i:i + 1] = list(self.__torch_dispatch__(aten.unbind.int, types, (nz, 1)))
            args = (args[0], indices, *args[2:])
            tensors = [t for t in _flat_tensors((args, kwargs))]
            shadows = [self._shadow(t) for t in tensors]
            known = all(s is not None for s in shadows)
        try:
            out = func(*args, **kwargs)
        except DynamicOutputShapeException:
            # The output's shape depends on values (bincount, unique, ...): from the shadows.
            real = self._real(func, args, kwargs) if known else None
            if real is None:
                if func is not aten.bincount.default:
                    raise
                self.unknown_reads += 1
                length = int(kwargs.get("minlength", args[2] if len(args) > 2 else 0))
                return torch.zeros(length, dtype=torch.long, device=args[0].device)
            out = tree_map_only(torch.Tensor, lambda r: torch.empty(r.shape, dtype=r.dtype, device=tensors[0].device), real)
            for fake_t, real_t in zip(_flat_tensors(out), _flat_tensors(real)):
                self._remember(fake_t, real_t)
            return out
        outs = [t for t in _flat_tensors(out) if isinstance(t, FakeTensor)]
        if not known and outs and all(not t.dtype.is_floating_point and t.numel() <= self.LIMIT for t in outs):
            # Integers computed from activations (token ids from a quantizer's argmin): zeros, a
            # valid id, so that masks built from them by comparison come out right.
            self.unknown_reads += 1
            with torch.utils._python_dispatch._disable_current_modes():
                for t in outs:
                    self._remember(t, torch.zeros(t.shape, dtype=t.dtype))
            return out
        if known and outs and all(t.numel() <= self.LIMIT for t in outs) and all(
                s.numel() <= self.LIMIT for s in shadows):
            real = self._real(func, args, kwargs)
            for fake_t, real_t in zip(_flat_tensors(out), _flat_tensors(real)):
                if isinstance(fake_t, FakeTensor) and isinstance(real_t, torch.Tensor):
                    self._remember(fake_t, real_t)
        return out

    def _real(self, func, args, kwargs):
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        def real(x):
            return self._shadow(x) if isinstance(x, FakeTensor) else x

        def cpu(x):
            return torch.device("cpu") if isinstance(x, torch.device) else x

        with unset_fake_temporarily(), torch.utils._python_dispatch._disable_current_modes():
            r_args = tree_map_only(torch.Tensor, real, args)
            r_kwargs = tree_map_only(torch.Tensor, real, kwargs)
            r_kwargs = {k: cpu(v) for k, v in r_kwargs.items()}
            if func in (torch.ops.aten.index_put_.default, torch.ops.aten._index_put_impl_.default):
                r_args = (r_args[0].clone(), *r_args[1:])
            return func(*r_args, **r_kwargs)


def _flat_tensors(tree) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


# -- FLOPs and roofline time ---------------------------------------------------------------------


class Roofline(TorchDispatchMode):
    """Counts FLOPs (torch.utils.flop_counter's formulas) and the bytes each op reads and writes
    (torch.utils._runtime_estimation's rule), and sums per op max(compute time, memory time) for a
    GPU's peaks: time = max(FLOPs / (peak * FLOP_EFFICIENCY), bytes / (bandwidth * BANDWIDTH_EFFICIENCY))."""

    def __init__(self, gpu: Any, fp32_matmul: str = "tf32") -> None:
        super().__init__()
        self.gpu = gpu
        self.fp32_peak = gpu.tf32_tflops if fp32_matmul == "tf32" else gpu.fp32_tflops
        self.flops = 0
        self.bytes = 0
        self.seconds = 0.0
        self.by_op: dict[str, float] = {}  # roofline seconds per aten op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._runtime_estimation import _IGNORE_OPS, get_num_bytes
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        # Views and factories move nothing; nor do queries without a tensor result (prim.device).
        if packet in _IGNORE_OPS or func.namespace == "prim" or not _flat_tensors(out):
            return out
        flops = 0
        if packet in flop_registry:
            flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
        moved = sum(get_num_bytes(t) for t in _flat_tensors((args, kwargs, out)) if t.dtype.is_floating_point
                    or t.dtype in (torch.int64, torch.int32, torch.bool))
        dtypes = {t.dtype for t in _flat_tensors(out)}
        peak = self.gpu.bf16_tflops if dtypes & {torch.bfloat16, torch.float16} else self.fp32_peak
        compute = flops / (peak * 1e12 * FLOP_EFFICIENCY)
        memory = moved / (self.gpu.hbm_tbps * 1e12 * BANDWIDTH_EFFICIENCY)
        self.flops += flops
        self.bytes += moved
        self.seconds += max(compute, memory)
        self.by_op[str(packet)] = self.by_op.get(str(packet), 0.0) + max(compute, memory)
        return out


# -- one traced step -----------------------------------------------------------------------------


class _Optimizer:
    """What `LightningModule.optimizers()` hands a manual-optimization step: the step hooks that
    `_step_uncounted` swaps, around a plain torch optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._on_before_step = self._on_after_step = lambda: None

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self, closure=None):
        self._on_before_step()
        out = self.optimizer.step(closure)
        self._on_after_step()
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def _attach_trainer(module, recipe: Recipe, step: int) -> None:
    """A stand-in trainer with what the modules' training steps read (step, precision, limits)."""
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    plugin = MixedPrecision("bf16-mixed", "cpu") if recipe.precision.startswith("bf16") else Precision()
    stub = SimpleNamespace(global_step=step, max_steps=recipe.max_steps, estimated_stepping_batches=recipe.max_steps,
                           precision_plugin=plugin, world_size=1, global_rank=0, is_global_zero=True,
                           sanity_checking=False, strategy=SimpleNamespace(), datamodule=None,
                           gradient_clip_val=None, gradient_clip_algorithm=None)
    module._trainer = stub
    module.log = lambda *a, **k: None
    module.log_dict = lambda *a, **k: None


def make_batch(recipe: Recipe, device: str | torch.device = "cpu") -> dict:
    """A batch of the configured shapes (per process)."""
    b = recipe.batch_size
    module = recipe.module
    captions = ["a red circle moving left"] * b
    if recipe.stage == 2 and recipe.samples == "tokens":
        grid = module.tokenizer.token_grid(recipe.num_frames, recipe.resolution)
        text_dim = module.text_encoder.dim if module.text_encoder is not None else 1  # unconditional: unread
        return {"tokens": torch.randint(0, module.backbone.vocab_size, (b, *grid), device=device),
                "text_emb": torch.randn(b, recipe.text_length, text_dim, device=device),
                "text_mask": torch.ones(b, recipe.text_length, dtype=torch.bool, device=device), "caption": captions}
    video = torch.rand(b, 3, recipe.num_frames, recipe.resolution, recipe.resolution, device=device) * 2 - 1
    return {"video": video, "caption": captions}


@dataclass
class StepTrace:
    """Memory at the step's peak (bytes by MemTracker category), FLOPs and roofline seconds."""

    peak: dict[str, int]
    flops: int
    seconds: float
    bytes_moved: int
    unknown_reads: int
    top_ops: dict[str, float] = field(default_factory=dict)  # the ops taking most roofline time


def _peak_tracker_class():
    from copy import deepcopy

    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class PeakTracker(MemTracker):
        """MemTracker keeping only the whole step's peak: its per-module peaks walk every module
        on every op, which dominated the trace's time."""

        def _update_peak_stats(self, peak_state) -> None:
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = deepcopy(dev_snap)

        # No module hooks: ModTracker's backward hooks break the R1 penalty's autograd.grad on a
        # leaf, and its per-module statistics refuse a module run twice a step (the
        # discriminator). Parameters and their gradient hooks are registered up front instead
        # (trace_step), and everything else is an activation or temporary, which the plan sums.
        def __enter__(self):
            self._mod_tracker = _NoModules()
            return super().__enter__()

        def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
            # MemTracker puts gradient hooks on frozen parameters too, which torch refuses (the
            # text encoder; the discriminator while the generator's loss goes through it).
            noop = SimpleNamespace(remove=lambda: None)
            frozen = [p for p in module.parameters() if not p.requires_grad and p not in self._param_to_grad_hook_handles]
            for p in frozen:
                self._param_to_grad_hook_handles[p] = (noop, noop)
            try:
                return super()._track_module_params_and_buffers(module, install_grad_hooks)
            finally:
                for p in frozen:  # hooked when it trains again
                    self._param_to_grad_hook_handles.pop(p, None)

    return PeakTracker


class _NoModules:
    """Stands in for MemTracker's ModTracker (see PeakTracker)."""

    is_bw = False
    parents: set = set()

    def register_user_hooks(self, *hooks) -> None:
        pass

    def clear_user_hooks(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        pass


def _PeakTracker():
    return _peak_tracker_class()()


def _checkpoint_blocks(module) -> int:
    from torch.distributed._composable import checkpoint

    from maskvid.launch.strategies import _blocks, _networks

    count = 0
    for network in _networks(module):
        for block in _blocks(network):
            checkpoint(block)
            count += 1
    return count


def _run_step(module, recipe: Recipe, batch: dict, optimizers: list, schedulers: list) -> None:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if recipe.precision.startswith("bf16") else contextlib.nullcontext()
    if recipe.stage == 1:
        module.optimizers = lambda: optimizers
        module.lr_schedulers = lambda: schedulers
        module.manual_backward = lambda loss, *a, **k: loss.backward(*a, **k)
        with autocast:
            module.training_step(batch, 0)
        return
    (opt,) = optimizers

    def closure():
        with autocast:
            loss = module.training_step(batch, 0)
        loss.backward()
        module.configure_gradient_clipping(opt)
        return loss

    opt.zero_grad(set_to_none=True)
    # The closure first, outside optimizer.step, so that MemTracker files the forward and
    # backward under activations and gradients rather than optimizer state.
    loss = closure()
    module.optimizer_step(0, 0, opt, lambda: loss)
    schedulers[0].step()


def trace_step(recipe: Recipe, gpu: Any, activation_checkpointing: bool, fake: bool = True) -> StepTrace:
    """Run two training steps of the recipe's module (the first creates the optimizer state) and
    measure the second: peak memory by category, FLOPs and roofline time."""
    module = recipe.module
    if activation_checkpointing:
        _checkpoint_blocks(module)
    # The steady state: the GAN on and, on an R1 step, the penalty's double backward too.
    step = 0
    curriculum = getattr(module.hparams, "length_curriculum", None) if recipe.stage == 2 else None
    if curriculum:
        step = max(int(start) for start, _ in curriculum)  # the longest clips of the curriculum
    if recipe.stage == 1 and module.discriminator is not None:
        gp = max(1, int(module.hparams.gp_every))
        step = int(math.ceil(module.hparams.gan_start_step / gp) * gp)
    _attach_trainer(module, recipe, step)
    module.train()
    fake_mode = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    concrete = ConcreteSmallTensors() if fake else contextlib.nullcontext()
    paths = gpu_code_paths() if fake else contextlib.nullcontext()
    trainable = recipe.param_dtype == "bf16" and recipe.strategy == "fsdp"
    with fake_mode, paths:
        if fake:
            module.to_empty(device="cpu")
            module._device = torch.device("cpu")  # LightningModule.device (it was built on meta)
            text_encoder = getattr(module, "text_encoder", None)
            if isinstance(text_encoder, nn.Module):
                text_encoder.to_empty(device="cpu")
        if trainable:
            _fsdp_compute_dtypes(module)
        result = module.configure_optimizers()
        optimizers, schedulers = _optimizers(result)
        wrapped = [_Optimizer(o) for o in optimizers] if recipe.stage == 1 else optimizers
        text_encoder = getattr(module, "text_encoder", None)
        externals = [module, *optimizers] + ([text_encoder] if isinstance(text_encoder, nn.Module) else [])
        with concrete:
            batch = make_batch(recipe)
            _run_step(module, recipe, batch, wrapped, schedulers)
            tracker = _PeakTracker()
            tracker.track_external(*externals)
            tracker._track_module_params_and_buffers(module, install_grad_hooks=True)
            roof = Roofline(gpu)
            with tracker, roof:
                _run_step(module, recipe, batch, wrapped, schedulers)
        snap = tracker.get_tracker_snapshot("peak")
        peak = {getattr(k, "value", str(k)): int(v) for dev in snap.values() for k, v in dev.items()}
    return StepTrace(peak=peak, flops=roof.flops, seconds=roof.seconds, bytes_moved=roof.bytes,
                     unknown_reads=getattr(concrete, "unknown_reads", 0),
                     top_ops=dict(sorted(roof.by_op.items(), key=lambda kv: -kv[1])[:8]))


def _fsdp_compute_dtypes(module) -> None:
    """FSDP2's mixed precision in a one-process trace: the sharded networks compute in bf16 and
    their `full_precision` parts (quantizers) in fp32, each casting its floating inputs to its
    dtype as FSDP's units do; networks FSDP replicates stay fp32. (The fp32 shards are counted
    apart, in per_gpu_memory.)"""

    def caster(dtype: torch.dtype):
        def cast(mod, args, kwargs):
            def to(t: torch.Tensor) -> torch.Tensor:
                return t.to(dtype) if t.is_floating_point() else t

            return tree_map_only(torch.Tensor, to, args), tree_map_only(torch.Tensor, to, kwargs)

        return cast

    for network in _parallel(module):
        if getattr(network, "replicate_under_fsdp", False):
            continue
        keep = set()
        for sub in network.modules():
            if sub is not network and getattr(sub, "full_precision", False):
                keep |= {id(p) for p in sub.parameters()}
                sub.register_forward_pre_hook(caster(torch.float32), with_kwargs=True)
        # Parameters only (FSDP leaves buffers alone), replaced rather than converted in place:
        # `Module.to` cannot swap fake tensors.
        cast: dict[int, nn.Parameter] = {}
        for sub in network.modules():
            for name, p in list(sub._parameters.items()):
                if p is None or id(p) in keep or not p.is_floating_point():
                    continue
                if id(p) not in cast:
                    cast[id(p)] = nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=p.requires_grad)
                sub._parameters[name] = cast[id(p)]
        network.register_forward_pre_hook(caster(torch.bfloat16), with_kwargs=True)


def _optimizers(result) -> tuple[list, list]:
    if isinstance(result, dict):
        sched = result.get("lr_scheduler")
        sched = sched["scheduler"] if isinstance(sched, dict) else sched
        return [result["optimizer"]], [sched] if sched is not None else []
    optimizers, schedulers = result
    return list(optimizers), list(schedulers)


def _parallel(module) -> list[nn.Module]:
    from maskvid.launch.strategies import _networks

    return _networks(module)


