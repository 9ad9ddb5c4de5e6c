"""Quantizers: lookup, straight-through gradients, dead-code restarts, FSQ indexing, usage metric."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maskvid.metrics.codebook import CodebookUsage
from maskvid.models.quantizer import FSQ, VectorQuantizer


def test_vq_picks_the_nearest_code_on_the_sphere_and_passes_gradients():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=32, dim=8, restart_every=0)
    z = torch.randn(4, 5, 8, requires_grad=True)
    out = vq(z)
    codebook = F.normalize(vq.codebook.detach(), dim=-1)
    expected = (F.normalize(z.detach(), dim=-1) @ codebook.t()).argmax(-1)
    assert torch.equal(out.indices, expected)
    torch.testing.assert_close(out.quantized.detach(), codebook[expected])
    torch.testing.assert_close(vq.codes(out.indices), codebook[expected])
    # Codebook term + beta * commitment term: (1 + beta) times the mean squared distance to the code.
    zn = F.normalize(z.detach(), dim=-1)
    torch.testing.assert_close(out.loss, (1 + vq.beta) * (codebook[expected] - zn).square().mean())
    # exp(entropy) of the codes' histogram.
    probs = torch.bincount(expected.flatten(), minlength=32).float() / expected.numel()
    used = probs[probs > 0]
    torch.testing.assert_close(out.perplexity, torch.exp(-(used * used.log()).sum()))
    (out.quantized.sum() + out.loss).backward()
    # Straight-through: the output's gradient reaches z as if quantizing were the identity (on the
    # normalised encodings); the commitment term pulls z towards its code and the codebook term
    # the code towards z.
    ref_z = z.detach().clone().requires_grad_(True)
    ref_codebook = vq.codebook.detach().clone().requires_grad_(True)
    z_unit, code = F.normalize(ref_z, dim=-1), F.normalize(ref_codebook, dim=-1)[expected]
    (z_unit.sum() + vq.beta * (z_unit - code.detach()).square().mean()
     + (code - z_unit.detach()).square().mean()).backward()
    torch.testing.assert_close(z.grad, ref_z.grad)
    torch.testing.assert_close(vq.codebook.grad, ref_codebook.grad)
    assert ref_codebook.grad.abs().sum() > 0 and z.grad.abs().sum() > 0


def test_dead_codes_restart_from_the_batch():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=16, dim=4, restart_every=3).train()
    # Every encoding sits next to code 0: the other 15 codes are dead.
    target = F.normalize(vq.codebook.detach()[0], dim=-1)
    z = target + 0.001 * torch.randn(64, 4)
    before = vq.codebook.detach().clone()
    for step in range(3):
        out = vq(z.clone().requires_grad_(True))
        assert set(out.indices.tolist()) == {0}
        assert vq.restart_dead_codes() == (15 if step == 2 else 0)  # as the training loop calls it
        if step < 2:
            assert torch.equal(vq.codebook.detach(), before)
            assert vq.window_usage() == pytest.approx(1 / 16)
    assert int(vq.restarted_total) == 15
    moved = (vq.codebook.detach() - before).norm(dim=-1)
    assert moved[0] == 0 and bool((moved[1:] > 0).all())
    # The restarted codes now sit among the encodings, so they are usable.
    assert float((F.normalize(vq.codebook.detach()[1:], dim=-1) @ target).min()) > 0.99
    assert int(vq.window_steps) == 0 and vq.window_usage() == 0.0


def test_no_restart_outside_training():
    vq = VectorQuantizer(codebook_size=16, dim=4, restart_every=1).eval()
    before = vq.codebook.detach().clone()
    with torch.no_grad():
        vq(torch.randn(8, 4))
    assert vq.restart_dead_codes() == 0
    assert torch.equal(vq.codebook.detach(), before) and int(vq.window_steps) == 0


def test_fsq_indices_are_a_bijection_with_codes():
    fsq = FSQ([8, 5, 3])
    assert fsq.codebook_size == 120 and fsq.dim == 3
    z = torch.randn(20000, 3) * 3
    out = fsq(z)
    assert out.indices.min() >= 0 and out.indices.max() < 120
    assert len(out.indices.unique()) == 120  # every code reachable
    torch.testing.assert_close(fsq.codes(out.indices), out.quantized)
    all_codes = fsq.codes(torch.arange(120))
    assert len(torch.unique(all_codes, dim=0)) == 120
    with pytest.raises(ValueError):
        FSQ([1, 4])


def test_codebook_usage_metric():
    metric = CodebookUsage(8)
    metric.update(torch.tensor([0, 1, 2, 3]))
    metric.update(torch.tensor([[0, 1], [2, 3]]))
    out = metric.compute()
    assert out["usage"].item() == pytest.approx(0.5)
    assert out["perplexity"].item() == pytest.approx(4.0)
    metric.update(torch.tensor([7] * 8))
    out = metric.compute()
    probs = torch.tensor([2, 2, 2, 2, 8]) / 16
    assert out["perplexity"].item() == pytest.approx(math.exp(-(probs * probs.log()).sum().item()))
    with pytest.raises(ValueError, match="out of range"):
        metric.update(torch.tensor([8]))


def test_lfq_index_is_the_binary_number_of_the_signs_and_codes_invert_it():
    from maskvid.models.quantizer import LFQ

    q = LFQ(dim=5).train()
    z = torch.randn(3, 4, 6, 5, requires_grad=True)
    out = q(z)
    bits = (z.detach() > 0).long()
    # The first channel is the most significant bit.
    assert torch.equal(out.indices, (bits * 2 ** torch.arange(4, -1, -1)).sum(-1))
    assert torch.equal(out.quantized.detach(), torch.where(z.detach() > 0, 1.0, -1.0))
    assert torch.equal(q.codes(out.indices), out.quantized.detach())
    every = q.codes(torch.arange(32))
    assert every.unique(dim=0).shape == (32, 5) and set(every.unique().tolist()) == {-1.0, 1.0}
    # Straight-through: the gradient reaches the encoder output as it left the decoder.
    upstream = torch.randn_like(z)
    (out.quantized * upstream).sum().backward()
    assert torch.allclose(z.grad, upstream)
    assert out.perplexity > 1 and 0 < q.window_usage() <= 1


def test_lfq_entropy_penalty_prefers_confident_and_varied_codes():
    from maskvid.models.quantizer import LFQ

    q = LFQ(dim=4, commitment_weight=0.0).train()
    g = torch.Generator().manual_seed(0)
    varied = torch.randn(512, 4, generator=g).sign()  # every code, each token exactly on one
    collapsed = torch.ones(512, 4)  # one code for every token
    unsure = torch.randn(512, 4, generator=g).sign() * 0.001  # right spread, but near every boundary
    losses = {name: float(q(z).loss) for name, z in (("varied", varied), ("collapsed", collapsed), ("unsure", unsure))}
    assert losses["varied"] < losses["collapsed"] and losses["varied"] < losses["unsure"], losses
    # Outside training there is nothing to penalise.
    assert float(q.eval()(varied).loss) == 0.0
    with pytest.raises(ValueError, match="dim"):
        LFQ(dim=0)


def test_a_cvivit_with_lfq_learns_to_reconstruct_and_exports(tmp_path):
    from maskvid.models.config import instantiate
    from maskvid.models.quantizer import LFQ
    import yaml

    from tests.conftest import REPO

    config = yaml.safe_load((REPO / "configs/model/cvivit_tiny_lfq.yaml").read_text())
    torch.manual_seed(0)
    network = config["model"]["init_args"]["tokenizer"]
    network["init_args"].update(dim=32, spatial_depth=1, temporal_depth=1, heads=2)  # the recipe's quantizer, a smaller net
    tokenizer = instantiate(network)
    assert isinstance(tokenizer.quantizer, LFQ) and tokenizer.vocab_size == 256
    video = torch.zeros(2, 3, 5, 32, 32)
    video[0, 0, :, 8:20, 8:20] = 1.0  # a red square and a blue one, on black
    video[1, 2, :, 14:30, 4:20] = 1.0
    video = video * 2 - 1
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        recon, q = tokenizer(video)
        loss = F.mse_loss(recon, video) + q.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(F.mse_loss(recon, video).item())
    assert tokenizer.to_code.weight.grad.abs().sum() > 0  # straight through to the encoder
    assert losses[-1] < 0.3 * losses[0], losses[::10]

    # The exported directory (plain JSON config + safetensors) rebuilds the same tokenizer.
    from maskvid.video_tokenizer import VideoTokenizer

    saved = VideoTokenizer(tokenizer).save_pretrained(tmp_path / "lfq")
    again = VideoTokenizer.from_pretrained(saved)
    assert isinstance(again.network.quantizer, LFQ)
    clip = torch.randint(0, 256, (2, 5, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(VideoTokenizer(tokenizer).encode(clip), again.encode(clip))
