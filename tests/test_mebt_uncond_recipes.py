"""`maskvid plan` sizes MeBT's unconditional recipes at the official scale (fake tensors, no GPU):
no text encoder is built, the token grids are the official ones, and each fits the GPUs its
header launches it on."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from tests.conftest import REPO


def plan(*configs: str) -> dict:
    from maskvid.launch.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        args = [a for c in configs for a in ("--config", str(REPO / c))]
        assert main(["plan", *args, "--gpus", "8", "--gpu", "h100", "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.mark.parametrize("name, strategy, tokens, batch", [
    ("mebt_uncond_16f", "ddp", 4 * 16 * 16, 32),
    ("mebt_uncond_128f", "fsdp", 32 * 16 * 16, 6),
])
def test_the_planner_sizes_the_unconditional_recipes(name, strategy, tokens, batch):
    from maskvid.launch.plan_build import _tokenizer_from_config

    result = plan(f"configs/experiment/{name}.yaml", f"configs/trainer/{strategy}.yaml")
    assert result["tokens_per_clip"] == tokens and result["batch_per_gpu"] == batch
    assert result["fits"], result
    # The official 24-layer, d=1024 MeBT with a 16384-code head: some 290M parameters.
    assert 2.5e8 < result["parameters"]["trainable"] < 3.5e8
    # Frozen: the stage-1 tokenizer alone (no text encoder), rebuilt from its recipe's config.
    tokenizer = _tokenizer_from_config("runs/tokenizer_mebt_uncond/checkpoints/last.ckpt", 16384)
    assert result["parameters"]["frozen"] == sum(p.numel() for p in tokenizer.parameters())
