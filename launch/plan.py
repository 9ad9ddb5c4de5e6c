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
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Sequence
from unittest import mock

import torch
import yaml
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

REPO = Path(__file__).resolve().parents[1]
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
# Fractions of the peaks that kernels reach (roofline efficiencies) and of memory left for tensors.
FLOP_EFFICIENCY = 0.75
BANDWIDTH_EFFICIENCY = 0.8
COMM_EFFICIENCY = 0.8
USABLE_MEMORY = 0.92  # CUDA context, NCCL buffers and allocator fragmentation take the rest

# Hub text encoders the base recipes name, as T5Config fields: built, never downloaded.
T5_CONFIGS: dict[str, dict[str, Any]] = {
    "t5-v1_1-small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6, feed_forward_proj="gated-gelu"),
    "t5-v1_1-base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12, feed_forward_proj="gated-gelu"),
    "t5-v1_1-large": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16, feed_forward_proj="gated-gelu"),
    "t5-v1_1-xl": dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32, feed_forward_proj="gated-gelu"),
    "t5-v1_1-xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"),
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "t5-base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "t5-large": dict(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16),
    "t5-3b": dict(d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_heads=32),
    "t5-11b": dict(d_model=1024, d_kv=128, d_ff=65536, num_layers=24, num_heads=128),
}
STRATEGIES = ("single", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


class PlanError(ValueError):
    """The config cannot be planned (one line for the user)."""


# -- building the module from the config ---------------------------------------------------------


class _PlanTextEncoder(nn.Module):
    """Stand-in for models.text_encoder.TextEncoder with the named model's architecture and random
    weights: a hub T5 from T5_CONFIGS, anything local from its config file."""

    def __init__(self, name_or_path: str = "packaged:minilm", max_length: int = 32) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, ByT5Tokenizer, T5Config, T5EncoderModel

        from models.text_encoder import resolve_text_encoder

        self.max_length = max_length
        key = name_or_path.rsplit("/", 1)[-1]
        source = resolve_text_encoder(name_or_path)
        if key in T5_CONFIGS and not Path(source).is_dir():
            hf_config = T5Config(vocab_size=32128, **T5_CONFIGS[key])
        elif Path(source).is_dir():
            hf_config = AutoConfig.from_pretrained(source, local_files_only=True)
        else:
            raise PlanError(f"text encoder {name_or_path!r}: not a local directory and not a known T5 "
                            f"({', '.join(sorted(T5_CONFIGS))})")
        is_t5 = hf_config.model_type in ("t5", "mt5", "umt5")
        self.model = T5EncoderModel(hf_config) if is_t5 else AutoModel.from_config(hf_config)
        self.model.requires_grad_(False).eval()
        self.vocab = int(hf_config.vocab_size)
        self.dim = int(getattr(hf_config, "d_model", None) or hf_config.hidden_size)
        self.tokenizer = ByT5Tokenizer()  # shapes only: captions are padded to max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> "_PlanTextEncoder":
        return super().train(False)

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, min(self.vocab, 384), (len(captions), self.max_length), device=self.device)
        mask = torch.ones_like(ids)
        out = self.model(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state.float(), mask.bool()


def _tokenizer_from_config(path: str, vocab_size: int | None = None):
    """The stage-1 tokenizer a checkpoint describes (its recorded config, weights not read), or
    the configs/ C-ViViT with `vocab_size` codes when the checkpoint does not exist yet."""
    from models.config import instantiate
    from models.tokenizer_checkpoint import CHECKPOINT_KEY

    if Path(path).is_file():
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            info = torch.load(path, map_location="cpu", weights_only=True, mmap=True)[CHECKPOINT_KEY]
        return instantiate(info["config"]).eval().requires_grad_(False)
    candidates = sorted((REPO / "configs/experiment").glob("tokenizer_*.yaml")) + sorted((REPO / "configs/model").glob("cvivit_*.yaml"))
    docs = [_merged(cfg) for cfg in candidates]
    # The stage-1 recipe that writes this checkpoint (its default_root_dir holds the path) first.
    writes = [str(path).startswith(str((d.get("trainer") or {}).get("default_root_dir") or "//")) for d in docs]
    for _, doc in sorted(zip(writes, docs), key=lambda pair: not pair[0]):
        spec = ((doc.get("model") or {}).get("init_args") or {}).get("tokenizer")
        if not isinstance(spec, dict) or "class_path" not in spec:
            continue  # a partial override of another file's tokenizer
        tokenizer = instantiate(spec)
        if vocab_size is None or tokenizer.vocab_size == vocab_size:
            return tokenizer.eval().requires_grad_(False)
    raise PlanError(f"tokenizer_path {path} does not exist and no configs/ C-ViViT has {vocab_size} codes")


def _merged(path: Path) -> dict:
    """A config as the CLI sees it: its `include:` files first, later ones override (dicts merge)."""
    from launch.config_includes import expand_config_includes

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for key, value in b.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    doc: dict = {}
    for part in expand_config_includes(["--config", str(path)])[1::2]:
        is_file = "\n" not in part and Path(part).is_file()  # else the YAML text of a file's own keys
        loaded = yaml.safe_load(Path(part).read_text() if is_file else part)
        doc = merge(doc, loaded if isinstance(loaded, dict) else {})
    return doc


@contextlib.contextmanager
def _stand_ins() -> Iterator[None]:
    """Frozen stage-2 parts built from configs instead of loaded (nothing to download or read)."""
    import lightning_modules.masked_video_module as mvm

    pending: dict[str, int] = {}
    real_init = mvm.MaskedVideoModule.__init__

    @functools.wraps(real_init)  # jsonargparse reads the signature through __wrapped__
    def init(self, backbone, *args, **kwargs):
        pending["vocab"] = getattr(backbone, "vocab_size", None)
        real_init(self, backbone, *args, **kwargs)

    with mock.patch.object(mvm.MaskedVideoModule, "__init__", init), \
            mock.patch.object(mvm, "load_tokenizer", lambda path, *a, **k: _tokenizer_from_config(path, pending.get("vocab"))), \
            mock.patch.object(mvm, "TextEncoder", _PlanTextEncoder):
        yield


@contextlib.contextmanager
def gpu_code_paths() -> Iterator[None]:
    """Run the models' GPU code paths on (fake) CPU tensors: attention in the input dtype (the CPU
    form upcasts bf16 to fp32), MeBT's sets exact and padded per batch where the CPU form differs,
    and the fused AdamW step a GPU takes."""
    import torch.nn.functional as F

    import models.attention as attention
    import models.mebt as mebt

    def sdpa(q, k, v, attn_mask=None, is_causal=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    import lightning_modules.masked_video_module as stage2
    import lightning_modules.tokenizer_module as stage1
    from lightning_modules.optim import _grad_scaler

    def adamw(param_groups, trainer, **kwargs):
        # lightning_modules.optim.adamw's rule, for which fake parameters are not plain ones: the
        # fused kernel whenever no fp16 scaler is involved.
        return torch.optim.AdamW(param_groups, fused=_grad_scaler(trainer) is None, **kwargs)

    patches = [(attention, "attention", sdpa), (mebt, "pack_multiple", lambda d: 1), (mebt, "ragged_attention", lambda d: False),
               (stage1, "adamw", adamw), (stage2, "adamw", adamw)]
    with contextlib.ExitStack() as stack:
        for owner, name, value in patches:
            if hasattr(owner, name):  # the models' CPU-only switches, where they exist
                stack.enter_context(mock.patch.object(owner, name, value))
        yield


@dataclass
class Recipe:
    """What the config asks for: the module, the per-process batch and the strategy."""

    module: Any
    stage: int
    batch_size: int
    num_frames: int
    resolution: int
    samples: str
    text_length: int
    strategy: str
    activation_checkpointing: bool
    param_dtype: str  # compute dtype of trainable parameters under FSDP ("bf16"/"fp32"); else the precision's
    precision: str
    devices: Any
    num_nodes: int
    max_steps: int
    configs: list[str] = field(default_factory=list)


def _strategy_kind(strategy: Any) -> tuple[str, bool, str]:
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp", bool(getattr(strategy, "activation_checkpointing", False)), getattr(strategy, "param_dtype", "bf16")
    if isinstance(strategy, DeepSpeedStrategy):
        stage = int(strategy.config.get("zero_optimization", {}).get("stage", 2))
        return f"deepspeed_zero{stage}", False, "fp32"
    if isinstance(strategy, DDPStrategy):
        return "ddp", False, "fp32"
    return "single", False, "fp32"


def load_recipe(configs: Sequence[str], overrides: Sequence[str] = (), fake: bool = True) -> Recipe:
    """Instantiate the config as `maskvid fit` would (model, data, trainer), with fake weights."""
    from launch.lightning_cli import MaskvidCLI
    from lightning_modules.masked_video_module import MaskedVideoModule
    from lightning_modules.tokenizer_module import TokenizerModule

    args: list[str] = []
    for c in configs:
        args += ["--config", str(c)]
    # Instantiated on this machine's CPU whatever the recipe's accelerator; the plan supplies the GPUs.
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", *overrides]
    # Built on the meta device (no memory, no initialisation); trace_step turns the weights into
    # fake tensors. (Constructing under FakeTensorMode itself trips torchmetrics' states.)
    mode = torch.device("meta") if fake else contextlib.nullcontext()
    with _stand_ins(), mode, mock.patch("sys.argv", ["maskvid"]):
        cli = MaskvidCLI(args=args, run=False)
    module, data, trainer = cli.model, cli.datamodule, cli.trainer
    if isinstance(module, TokenizerModule):
        stage = 1
    elif isinstance(module, MaskedVideoModule):
        stage = 2
    else:
        raise PlanError(f"{type(module).__name__}: the planner knows TokenizerModule and MaskedVideoModule")
    hp = dict(getattr(data, "hparams", {}))
    if stage == 2 and hp.get("samples") == "tokens" and getattr(module.tokenizer, "image_size", None):
        # Token shards hold the grid the tokenizer made at its own frame size.
        hp["resolution"] = int(module.tokenizer.image_size)
    kind, ac, param_dtype = _strategy_kind(trainer.strategy)
    precision = str(trainer.precision)
    if kind != "fsdp":
        param_dtype = "bf16" if precision.startswith("bf16") else "fp32"
    cfg = cli.config
    return Recipe(
        module=module, stage=stage, batch_size=int(hp.get("batch_size", 1)), num_frames=int(hp.get("num_frames", 17)),
        resolution=int(hp.get("resolution", 64)), samples=str(hp.get("samples", "video")),
        text_length=int(getattr(module.hparams, "text_max_length", 0) or 0), strategy=kind,
        activation_checkpointing=ac, param_dtype=param_dtype, precision=precision,
        devices=cfg.get("trainer", {}).get("devices"), num_nodes=int(trainer.num_nodes or 1),
        max_steps=int(trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else 1000),
        configs=[str(c) for c in configs],
    )


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

    def __init__(self, gpu: GPUSpec, fp32_matmul: str = "tf32") -> None:
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
        text_dim = module.text_encoder.dim
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

    from launch.strategies import _blocks, _networks

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


def trace_step(recipe: Recipe, gpu: GPUSpec, activation_checkpointing: bool, fake: bool = True) -> StepTrace:
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
    from launch.strategies import _networks

    return _networks(module)


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


def count_model(module) -> ModelCounts:
    from launch.strategies import _blocks

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
    frozen = 0
    extra = [*module.parameters()]
    text_encoder = getattr(module, "text_encoder", None)
    if isinstance(text_encoder, nn.Module):
        extra += list(text_encoder.parameters())
    for p in extra:
        if id(p) not in seen:
            seen.add(id(p))
            frozen += p.numel()
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    # AdamW: exp_avg and exp_avg_sq in fp32 per trainable parameter (+ a step counter).
    return ModelCounts(trainable, replicated, sharded_frozen, frozen, buffers, largest, root, 8 * trainable)


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
    frozen = counts.frozen * fp32 + counts.buffers_bytes
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
    if strategy in ("single", "ddp") or (strategy == "fsdp" and n == 1 and False):
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
            out.append(f"smaller batch: data.batch_size {fit_b} per GPU (with {sharded} and checkpointing), "
                       f"gradient accumulation to keep the global batch")
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
