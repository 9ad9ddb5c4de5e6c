"""torch.compile: every backbone's training step (forward, loss, backward) is one graph.

- C-ViViT: no graph break at all.
- MaskGIT and MeBT: their only breaks are the data-dependent sizes they exist for (`nonzero`):
  the masked positions the loss reads (MaskGIT's `masked_only`), MeBT's packed observed and
  masked sets (its linear cost). With `capture_dynamic_output_shape_ops` dynamo traces those too
  (unbacked sizes), and the step compiles as one graph, backward included, with the eager
  gradients.

Tiny widths of the configs/model/*_tiny.yaml networks, so the test stays fast on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from maskvid.models.config import instantiate
from maskvid.models.losses import token_cross_entropy

REPO = Path(__file__).resolve().parents[1]
TINY = {"maskgit": dict(dim=32, heads=2, depth=2, text_dim=16),
        "mebt": dict(dim=32, heads=2, depth=2, text_dim=16, num_latents=8)}


def tiny_config(name: str) -> dict:
    return yaml.safe_load((REPO / f"configs/model/{name}_tiny.yaml").read_text())["model"]["init_args"]


def training_step(name: str):
    """(network, step function -> loss, its inputs)."""
    torch.manual_seed(0)
    if name == "cvivit":
        net = instantiate(tiny_config("cvivit")["tokenizer"]).train()

        def step(video):
            recon, q = net(video)
            return (recon - video).square().mean() + q.loss

        return net, step, (torch.rand(2, 3, 5, 32, 32) * 2 - 1,)
    config = tiny_config(name)["backbone"]
    config["init_args"].update(TINY[name])
    net = instantiate(config).train()
    tokens = torch.randint(0, net.vocab_size, (2, 5, 8, 8))
    masked = torch.rand(tokens.shape) < 0.5
    text, text_mask = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)
    text_mask[1, 4:] = False  # a padded caption: the packed text read

    def step(inputs, text, text_mask, drop, target):
        return token_cross_entropy(net(inputs, text, text_mask, drop, masked_only=True), target)

    return net, step, (tokens.masked_fill(masked, net.mask_id), text, text_mask, torch.tensor([False, True]),
                       tokens[masked])


# Each remaining break's reason: (the op, the source line that calls it), and dynamo's
# graph_break_count, which counts a break in every frame it splits (the model's forward, the step
# calling it, pack_sets).
KNOWN_BREAKS = {
    "cvivit": ([], 0),
    "maskgit": ([("aten.nonzero", "x[rearrange(tokens")], 2),  # masked_only: logits of the masked positions
    "mebt": ([("aten.nonzero", "nonzero()")] * 2, 5),  # pack_sets: the observed, then the masked set
}


@pytest.mark.parametrize("name", ["cvivit", "maskgit", "mebt"])
def test_the_training_step_breaks_the_graph_only_at_data_dependent_sizes(name):
    torch._dynamo.reset()
    net, step, args = training_step(name)
    explained = torch._dynamo.explain(step)(*args)
    seen = [(reason.reason, reason.user_stack[-1].line) for reason in explained.break_reasons]
    known, count = KNOWN_BREAKS[name]
    assert len(seen) == len(known) and explained.graph_break_count == count, (explained.graph_break_count, seen)
    for (reason, line), (op, where) in zip(seen, known):
        assert "Dynamic shape operator" in reason and op in reason and where in line, (reason, line)


@pytest.mark.parametrize("name", ["cvivit", "maskgit", "mebt"])
def test_with_data_dependent_sizes_traced_the_step_is_one_graph_with_eager_gradients(name):
    torch._dynamo.reset()
    net, step, args = training_step(name)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        torch.manual_seed(1)
        # fullgraph: any graph break raises; aot_eager: AOTAutograd builds the backward graph too.
        loss = torch.compile(step, backend="aot_eager", fullgraph=True)(*args)
        loss.backward()
    compiled = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    torch.manual_seed(1)
    eager = step(*args)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    assert compiled.keys() == {k for k, p in net.named_parameters() if p.grad is not None}
    for k, p in net.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(compiled[k], p.grad, msg=k)
