"""Activation checkpointing applied from outside the models (launch/strategies.py), per block:
the same loss and gradients as without it for both stages' networks, with the recomputation seen,
and every maskvid strategy offering the option. Multi-process runs (DDP, FSDP2, DeepSpeed) are in
test_distributed.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from maskvid.launch.strategies import (
    DeepSpeedZeroStrategy,
    FSDP2Strategy,
    MaskvidDDPStrategy,
    MaskvidSingleDeviceStrategy,
    StrategyConfigError,
    _Parallelize,
    _top_blocks,
    checkpoint_blocks,
    parallelize,
)
from maskvid.models.cvivit import CViViT
from maskvid.models.maskgit import MaskGITBackbone
from maskvid.models.mebt import MeBT
from maskvid.models.quantizer import VectorQuantizer


def _cvivit():
    torch.manual_seed(0)
    net = CViViT(image_size=32, patch_size=8, temporal_patch_size=2, dim=32, spatial_depth=2, temporal_depth=2,
                 heads=2, quantizer=VectorQuantizer(64, 8))
    video = torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def loss(n):
        recon, q = n(video)
        return (recon - video).pow(2).mean() + q.loss

    return net, loss


def _stage2(cls, **kw):
    def build():
        torch.manual_seed(0)
        net = cls(vocab_size=64, grid=(3, 4, 4), dim=32, depth=2, heads=2, text_dim=16, **kw).train()
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 64, (2, 3, 4, 4), generator=g)
        tokens[torch.rand(tokens.shape, generator=g) < 0.5] = 64  # [MASK]
        text, text_mask = torch.randn(2, 5, 16, generator=g), torch.ones(2, 5, dtype=torch.bool)

        def loss(n):
            logits = n(tokens, text, text_mask, masked_only=True)
            return logits.float().logsumexp(-1).mean() - logits[:, 0].mean()

        return net, loss

    return build


NETWORKS = {"cvivit": _cvivit, "maskgit": _stage2(MaskGITBackbone), "mebt": _stage2(MeBT, num_latents=8)}


class _Module(nn.Module):
    """What parallelize needs of a LightningModule: its trainable networks."""

    def __init__(self, *networks: nn.Module) -> None:
        super().__init__()
        self.networks = list(networks)

    def parallel_networks(self):
        return self.networks


def _count_forwards(net: nn.Module) -> list[int]:
    """A counter of forward calls into the blocks' own modules (inside any wrapper). A pre-hook:
    recomputation stops as soon as it has what backward needs, before a block's forward returns."""
    calls = [0]
    for blocks, index in _top_blocks(net):
        inner = getattr(blocks[index], "_checkpoint_wrapped_module", blocks[index])
        inner.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name", list(NETWORKS))
def test_same_loss_and_gradients_with_and_without(name):
    plain, loss = NETWORKS[name]()
    blocks = len(_top_blocks(plain))
    assert blocks >= 2
    checkpointed = copy.deepcopy(plain)
    parallelize(_Module(checkpointed), activation_checkpointing=True)
    wrapped = [blocks_[i] for blocks_, i in _top_blocks(checkpointed)]
    assert len(wrapped) == blocks and all(isinstance(b, CheckpointWrapper) for b in wrapped)
    # Checkpoints keep their keys: a run with and one without load each other's weights.
    assert list(checkpointed.state_dict()) == list(plain.state_dict())

    calls_plain, calls_ckpt = _count_forwards(plain), _count_forwards(checkpointed)
    reference, result = loss(plain), loss(checkpointed)
    reference.backward()
    result.backward()
    assert calls_plain[0] == blocks
    assert calls_ckpt[0] == 2 * blocks  # each block ran again in backward: recomputed, not stored
    assert torch.equal(result, reference)
    for (key, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert (p.grad is None) == (q.grad is None), key
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=key)


def test_every_kth_block_and_only_trainable_networks():
    net, _ = _stage2(MaskGITBackbone)()
    net.blocks.extend(copy.deepcopy(net.blocks))  # 4 blocks
    assert checkpoint_blocks(copy.deepcopy(net), 2) == 2
    picked = copy.deepcopy(net)
    checkpoint_blocks(picked, 2)
    assert [isinstance(b, CheckpointWrapper) for b in picked.blocks] == [True, False, True, False]
    assert checkpoint_blocks(copy.deepcopy(net), False) == 0
    # An EMA copy never runs backward: parallelize leaves it alone, and does everything once.
    trained, ema = copy.deepcopy(net), copy.deepcopy(net).requires_grad_(False)
    module = _Module(trained, ema)
    parallelize(module, activation_checkpointing=True)
    parallelize(module, activation_checkpointing=True)
    assert all(isinstance(b, CheckpointWrapper) for b in trained.blocks)
    assert not any(isinstance(b, CheckpointWrapper) for b in ema.blocks)
    assert not any(isinstance(b._checkpoint_wrapped_module, CheckpointWrapper) for b in trained.blocks)
    with pytest.raises(StrategyConfigError, match="activation_checkpointing"):
        checkpoint_blocks(net, -1)


def test_nested_blocks_are_checkpointed_once():
    inner = nn.ModuleList([nn.Linear(2, 2)])
    outer = nn.Module()
    outer.inner, outer.proj = inner, nn.Linear(2, 2)
    net = nn.Module()
    net.layers = nn.ModuleList([outer, nn.Linear(2, 2)])
    assert checkpoint_blocks(net, True) == 2
    assert isinstance(net.layers[0], CheckpointWrapper) and not isinstance(inner[0], CheckpointWrapper)


@pytest.mark.parametrize("make", [
    lambda k: MaskvidSingleDeviceStrategy(activation_checkpointing=k),
    lambda k: MaskvidDDPStrategy(activation_checkpointing=k),
    lambda k: FSDP2Strategy(activation_checkpointing=k),
    lambda k: DeepSpeedZeroStrategy(stage=3, activation_checkpointing=k),
], ids=["single", "ddp", "fsdp", "deepspeed"])
def test_every_strategy_applies_it(make):
    """The strategy's option reaches the blocks (sharding aside: FSDP2's needs a process group,
    tested in test_distributed.py)."""
    net, _ = _stage2(MaskGITBackbone)()
    strategy, module = make(2), _Module(net)
    if isinstance(strategy, FSDP2Strategy):
        strategy.shard_network = None
    strategy.parallelize(module)
    if isinstance(strategy, DeepSpeedZeroStrategy):
        # Deferred from configure_model (inside ZeRO-3's zero.Init) to the strategy's setup.
        assert not any(isinstance(b, CheckpointWrapper) for b in net.blocks)
        assert strategy._to_parallelize is module
        _Parallelize.parallelize(strategy, module)
    assert [isinstance(b, CheckpointWrapper) for b in net.blocks] == [True, False]
    with pytest.raises(StrategyConfigError):
        make(-1)
