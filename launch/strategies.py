"""Every parallelism choice maskvid makes, in one place.

Configs pick a strategy by class_path (configs/trainer/*.yaml). LightningModules know nothing of
sharding: they list their trainable networks (`parallel_networks()`) and their frozen ones stay
plain replicated modules, outside every optimizer. Their configure_model hook calls the strategy's `parallelize(module)`, which
applies, network by network, activation checkpointing (the strategy's `activation_checkpointing`:
all blocks, none or every k-th), then torch.compile per block (the model's `compile` option), then
sharding (FSDP2); DDP and DeepSpeed wrap the module afterwards, in their setup. Every strategy
below has that option, the single-device one included.

- single:     One device (MaskvidSingleDeviceStrategy). Lightning's own strategies apply neither
              checkpointing nor compile.
- ddp:        Lightning's DDP; finds unused parameters by itself for the GAN tokenizer, whose
              generator step leaves the discriminator without gradients.
- fsdp:       FSDP2 (`fully_shard`) through ModelParallelStrategy: one FSDP unit per transformer
              block, then each network's root; bf16 parameters with fp32 gradient reduction;
              modules marked `full_precision` (quantizers, whose codes bf16 would round onto each
              other) compute in fp32; buffers untouched.
              Networks marked `replicate_under_fsdp` (the discriminator: R1's double backward)
              are replicated data-parallel instead.
              Checkpoints are DCP directories, loadable at another world size.
- deepspeed:  ZeRO stage 2 or 3; on a CPU accelerator (tests, laptops) the same class runs over
              gloo. One optimizer only: the GAN tokenizer is refused at startup.

Sharded checkpoint directories are written under a staging name and renamed into place once every
rank has written (launch/checkpoint_io.py), and verified before they are loaded.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from typing import Callable, Literal

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from torch import nn


class StrategyConfigError(ValueError):
    """A strategy asked for something this model or machine cannot do."""


def _blocks(network: nn.Module) -> list[nn.Module]:
    """Transformer blocks: every member of every ModuleList in the network (layers live there),
    innermost first, because fully_shard must reach a child before its parent."""
    found = []
    for module in network.modules():
        if isinstance(module, nn.ModuleList):
            found.extend(m for m in module if any(True for _ in m.parameters()))
    return found[::-1]


def _networks(module) -> list[nn.Module]:
    networks = getattr(module, "parallel_networks", None)
    if networks is None:
        raise StrategyConfigError(
            f"{type(module).__name__} does not list its trainable networks (`parallel_networks()`), "
            "so it cannot be sharded"
        )
    return [n for n in networks() if n is not None]


def _top_blocks(network: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """Where each transformer block sits (its ModuleList and index), in forward order. A block
    nested inside another is left out: checkpointing or compiling the outer one covers it."""
    taken: set[int] = set()
    found = []
    for module in network.modules():
        if isinstance(module, nn.ModuleList) and id(module) not in taken:
            for index, block in enumerate(module):
                if any(True for _ in block.parameters()):
                    found.append((module, index))
                    taken.update(id(m) for m in block.modules())
    return found


def _checkpoint_every(activation_checkpointing: bool | int) -> int:
    """0 (none), 1 (every block) or k (every k-th block)."""
    every = int(activation_checkpointing)
    if every < 0:
        raise StrategyConfigError(
            f"activation_checkpointing must be true, false or k >= 0, got {activation_checkpointing!r}")
    return every


def checkpoint_blocks(network: nn.Module, activation_checkpointing: bool | int) -> int:
    """Wrap the selected blocks of `network` for activation checkpointing (non-reentrant: their
    activations are recomputed in backward), in place. A wrapper rather than hooks, because
    torch.compile traces the wrapper's checkpoint as one region, where hooks break the graph.
    State-dict keys are unchanged. Returns how many blocks were wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    every = _checkpoint_every(activation_checkpointing)
    count = 0
    for blocks, index in _top_blocks(network) if every else ():
        if index % every == 0:
            blocks[index] = checkpoint_wrapper(blocks[index])
            count += 1
    return count


def compile_blocks(module) -> int:
    """torch.compile each top-level transformer block of the module's trainable networks (or of
    one network) in place (`nn.Module.compile`: parameter names and checkpoints unchanged), per
    block so that graph breaks stay local. Returns how many."""
    networks = _networks(module) if hasattr(module, "parallel_networks") else [module]
    count = 0
    for network in networks:
        for blocks, index in _top_blocks(network):
            blocks[index].compile()
            count += 1
    return count


def parallelize(module, activation_checkpointing: bool | int = False, compile: bool = False,
                shard: Callable[[nn.Module], None] | None = None) -> None:
    """Apply activation checkpointing, then torch.compile, then sharding, to each of the module's
    networks (`parallel_networks()`), once. The order FSDP2 wants: the checkpoint wrapper is what
    gets compiled (the recomputation traced with its block, no graph break at checkpoint hooks)
    and what becomes the FSDP unit (its weights gathered again, as one, for the recomputation).
    Checkpointing only touches networks that train (an EMA copy never runs backward). DDP and
    DeepSpeed pass no `shard`: they wrap the whole module afterwards, in their own setup."""
    if getattr(module, "_maskvid_parallelized", False):
        return
    for network in _networks(module):
        if any(p.requires_grad for p in network.parameters()):
            checkpoint_blocks(network, activation_checkpointing)
        if compile:
            compile_blocks(network)
        if shard is not None:
            shard(network)
    module._maskvid_parallelized = True


def _export_local_world_size(strategy) -> None:
    """Say how many training processes share this node, as torchrun does (Lightning's own launcher
    does not): DataLoader workers, forked later, size their decoder threads by it
    (datamodules/cpus.py)."""
    processes = getattr(strategy, "num_processes", 1)
    if processes > 1:
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(processes))


class _Parallelize:
    """What every maskvid strategy shares: `parallelize(module)`, which LightningModules call from
    their configure_model hook, with this strategy's checkpointing choice and the model's own
    `compile` option."""

    _activation_checkpointing: bool | int = False
    # Shards one network in place (FSDP2); data-parallel strategies wrap the module later instead.
    shard_network: Callable[[nn.Module], None] | None = None

    @property
    def activation_checkpointing(self) -> bool | int:
        return self._activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool | int) -> None:
        _checkpoint_every(value)  # refuse a bad value when the strategy is built, not at setup
        self._activation_checkpointing = value

    def setup_environment(self) -> None:
        _export_local_world_size(self)
        super().setup_environment()

    def parallelize(self, module) -> None:
        compile = bool(getattr(module, "hparams", {}).get("compile", False))
        parallelize(module, self.activation_checkpointing, compile=compile, shard=self.shard_network)


class MaskvidSingleDeviceStrategy(_Parallelize, SingleDeviceStrategy):
    """One device (one GPU, or the CPU), with maskvid's activation checkpointing and compile."""

    def __init__(self, activation_checkpointing: bool | int = False, device: str | None = None) -> None:
        """
        Args:
            activation_checkpointing: Recompute block activations in backward instead of keeping
                them (less memory, about one more forward of compute): true for every transformer
                block, false for none, an integer k for every k-th block of each block list.
            device: The device, e.g. "cuda:0" or "cpu"; null takes the accelerator's first.
        """
        super().__init__(device=device or "cpu")
        self._device_given = device is not None
        self.activation_checkpointing = activation_checkpointing

    @property
    def root_device(self) -> torch.device:
        if not self._device_given and self.accelerator is not None and not isinstance(self.accelerator, CPUAccelerator):
            # The accelerator decides (Lightning sets no device on a strategy object it is handed).
            return self.accelerator.get_parallel_devices(self.accelerator.parse_devices(1))[0]
        return self._root_device


class MaskvidDDPStrategy(_Parallelize, DDPStrategy):
    """DDP that finds unused parameters by itself where the model needs it: with manual
    optimization (the GAN tokenizer) the generator's backward leaves the discriminator unused."""

    def __init__(self, find_unused_parameters: bool | None = None, static_graph: bool = False,
                 gradient_as_bucket_view: bool = True, process_group_backend: str | None = None,
                 activation_checkpointing: bool | int = False) -> None:
        """
        Args:
            find_unused_parameters: None decides from the model (True for manual optimization).
            static_graph: The set of used parameters never changes between steps.
            gradient_as_bucket_view: Gradients are views into the all-reduce buckets (less memory).
            process_group_backend: nccl on GPUs, gloo on CPU by default.
            activation_checkpointing: Recompute block activations in backward instead of keeping
                them (less memory, about one more forward of compute): true for every transformer
                block, false for none, an integer k for every k-th block of each block list.
        """
        super().__init__(static_graph=static_graph, gradient_as_bucket_view=gradient_as_bucket_view,
                         process_group_backend=process_group_backend)
        self.find_unused_parameters = find_unused_parameters
        self.activation_checkpointing = activation_checkpointing

    def setup(self, trainer) -> None:
        find = self.find_unused_parameters
        if find is None:
            find = not self.lightning_module.automatic_optimization
        self._ddp_kwargs["find_unused_parameters"] = find
        super().setup(trainer)


class FSDP2Strategy(_Parallelize, ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over every process, with per-block units."""

    def __init__(
        self,
        activation_checkpointing: bool | int = False,
        param_dtype: Literal["bf16", "fp32"] = "bf16",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout_minutes: float = 30.0,
    ) -> None:
        """
        Args:
            activation_checkpointing: Recompute block activations in backward instead of keeping
                them (less memory, about one more forward of compute): true for every transformer
                block, false for none, an integer k for every k-th block of each block list.
            param_dtype: Dtype that parameters are gathered in for compute. Gradients are reduced
                and kept in fp32, and so are the sharded master weights and all buffers.
            reshard_after_forward: Free gathered block weights after forward (ZeRO-3 like);
                False keeps them until backward (ZeRO-2 like, more memory, less communication).
            save_distributed_checkpoint: Each rank writes its own shards (a DCP directory,
                loadable at another world size). False gathers one file on rank 0.
            process_group_backend: nccl on GPUs, gloo on CPU by default.
            timeout_minutes: Collective timeout.
        """
        # One data-parallel dimension over every process: maskvid does not use tensor parallelism.
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timedelta(minutes=timeout_minutes),
        )
        self.activation_checkpointing = activation_checkpointing
        self.param_dtype = param_dtype
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # Lightning's "auto" puts processes on the tensor-parallel axis; ours all shard data.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)  # one file: CheckpointIO
        from maskvid.launch.checkpoint_io import save_directory_atomically

        save_directory_atomically(self, filepath, lambda staging: super(FSDP2Strategy, self).save_checkpoint(
            checkpoint, staging, storage_options))

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        from maskvid.checkpoint_files import verify_checkpoint

        verify_checkpoint(self.broadcast(str(checkpoint_path)))
        return super().load_checkpoint(checkpoint_path, weights_only)

    def shard_network(self, network: nn.Module) -> None:
        """fully_shard one network: its fp32 modules, each block, then its root."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        if getattr(network, "replicate_under_fsdp", False):
            _replicate(network, mesh.get_group())
            return
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[self.param_dtype]
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        # Modules that must compute in fp32 (quantizer codebooks) say so with
        # `full_precision = True`, and become FSDP units of their own.
        for sub in network.modules():
            if sub is not network and getattr(sub, "full_precision", False):
                fully_shard(sub, mesh=mesh, mp_policy=fp32, reshard_after_forward=self.reshard_after_forward)
        for block in _blocks(network):
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        fully_shard(network, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)


def _replicate(network: nn.Module, group) -> None:
    """Data parallel by hand for a network that FSDP2 must not shard: rank 0's weights on every
    rank, and each gradient averaged over the group as soon as it is accumulated. (DDP itself
    refuses a network whose parameters are frozen at its first forward, as the discriminator is
    during the generator's step.)"""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    source = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for tensor in [*network.parameters(), *network.buffers()]:
            dist.broadcast(tensor, src=source, group=group)

    def average(param: torch.Tensor) -> None:
        dist.all_reduce(param.grad, group=group)
        param.grad.div_(world)

    for param in network.parameters():
        param.register_post_accumulate_grad_hook(average)


class DeepSpeedZeroStrategy(_Parallelize, DeepSpeedStrategy):
    """DeepSpeed ZeRO-2/3. On a CPU accelerator it runs over gloo (tests, laptops)."""

    def __init__(
        self,
        stage: Literal[2, 3] = 2,
        offload_optimizer: bool = False,
        allgather_bucket_size: int = 200_000_000,
        reduce_bucket_size: int = 200_000_000,
        process_group_backend: str | None = None,
        activation_checkpointing: bool | int = False,
    ) -> None:
        """
        Args:
            stage: 2 shards optimizer state and gradients; 3 also shards parameters.
            offload_optimizer: Keep optimizer state in host memory (needs DeepSpeed's CPU Adam).
            allgather_bucket_size: Elements per all-gather bucket.
            reduce_bucket_size: Elements per reduce bucket.
            process_group_backend: nccl on GPUs, gloo on CPU by default.
            activation_checkpointing: Recompute block activations in backward instead of keeping
                them (less memory, about one more forward of compute): true for every transformer
                block, false for none, an integer k for every k-th block of each block list.
        """
        super().__init__(
            stage=stage, offload_optimizer=offload_optimizer, allgather_bucket_size=allgather_bucket_size,
            reduce_bucket_size=reduce_bucket_size, process_group_backend=process_group_backend,
        )
        self.activation_checkpointing = activation_checkpointing

    @property
    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if self._on_cpu:
            # DeepSpeedStrategy refuses anything but CUDA; the parallel base does what is needed.
            _export_local_world_size(self)
            DDPStrategy.setup_environment(self)
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if self._on_cpu:
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()
            return
        super().setup_distributed()

    def check_module(self, module) -> None:
        """Refuse what DeepSpeed cannot train (also called by the CLI before anything is written)."""
        if not module.automatic_optimization:
            raise StrategyConfigError(
                f"trainer.strategy: DeepSpeed takes one optimizer, and {type(module).__name__} trains with "
                "manual optimization (the GAN tokenizer has a generator and a discriminator optimizer). "
                "Use configs/trainer/ddp.yaml or configs/trainer/fsdp.yaml for it."
            )

    def parallelize(self, module) -> None:
        # configure_model runs inside ZeRO-3's `zero.Init`, which patches every module built in
        # it (a checkpoint wrapper included) for partitioning: done in setup() instead.
        self._to_parallelize = module

    def setup(self, trainer) -> None:
        self.check_module(self.lightning_module)
        module = getattr(self, "_to_parallelize", None)
        if module is not None:
            _Parallelize.parallelize(self, module)
            self._to_parallelize = None
        # DeepSpeed clips inside its engine: hand it the module's own clip (its hook cannot act).
        # Assigned, not defaulted: configure_model's sharded context has already filled the config
        # with the trainer's gradient_clip_val (0 when unset), which left the engine unclipped.
        clip = trainer.gradient_clip_val or getattr(self.lightning_module, "hparams", {}).get("grad_clip", 0.0)
        self.config["gradient_clipping"] = float(clip or 0.0)
        super().setup(trainer)

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        """A checkpoint from another world size is converted to a universal one first (next to
        it, `<name>.universal`, once), then loaded as such."""
        from maskvid.checkpoint_files import checkpoint_kind, deepspeed_world_size, is_universal, to_universal, verify_checkpoint

        path = verify_checkpoint(self.broadcast(str(checkpoint_path)))
        if checkpoint_kind(path) == "deepspeed" and not is_universal(path) and deepspeed_world_size(path) != self.world_size:
            target = path.with_name(path.name + ".universal")
            if self.is_global_zero and not target.is_dir():
                print(f"maskvid: {path} was written by {deepspeed_world_size(path)} ranks, this run has "
                      f"{self.world_size}: converting it to a universal checkpoint at {target}", flush=True)
                to_universal(path, target)
            self.barrier("universal-conversion")
            path = target
        universal = checkpoint_kind(path) == "deepspeed" and is_universal(path)
        if universal:
            self.deepspeed_engine._config.load_universal_checkpoint = True
        checkpoint = super().load_checkpoint(path, weights_only)
        if universal:
            # DeepSpeed restores only what its optimizer owns, and ZeRO-3 mixes up the param
            # groups' step counts and hyperparameters (launch/deepspeed_universal.py).
            from lightning.pytorch.trainer.states import TrainerFn

            from maskvid.launch.deepspeed_universal import repair_zero3_optimizer, restore_module_state, tag_dir

            tag = tag_dir(path)
            if self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
                repair_zero3_optimizer(self.deepspeed_engine.optimizer, tag)
            restore_module_state(self.deepspeed_engine.module, tag, strict=self.lightning_module.strict_loading)
        return checkpoint

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        from maskvid.launch.checkpoint_io import save_directory_atomically

        save_directory_atomically(self, filepath, lambda staging: super(DeepSpeedZeroStrategy, self).save_checkpoint(
            checkpoint, staging, storage_options))

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        # Lightning passes the device index, which is None for CPU devices.
        deepspeed_engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.root_device.index if not self._on_cpu else self.local_rank),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return deepspeed_engine, deepspeed_optimizer
