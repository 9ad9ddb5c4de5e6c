"""Long videos: the length curriculum in training and the sliding window past the trained length."""

from __future__ import annotations

import pytest
import torch

from maskvid.lightning_modules.masked_video_module import MaskedVideoModule
from maskvid.models.maskgit import MaskGITBackbone
from maskvid.models.sampling import SamplingOptions
from maskvid.text_to_video import TextToVideo
from tests.stage2_fixtures import tiny_t5_dir, tiny_tokenizer, write_tokenizer_checkpoint


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    return {"t5": str(tiny_t5_dir(root / "t5")), "tok": str(write_tokenizer_checkpoint(root / "tok.ckpt", tiny_tokenizer()))}


def test_length_curriculum_trains_on_growing_prefixes(parts):
    torch.manual_seed(0)
    backbone = MaskGITBackbone(vocab_size=64, grid=(5, 4, 4), dim=32, depth=1, heads=2, text_dim=32)
    m = MaskedVideoModule(backbone, parts["tok"], text_encoder=parts["t5"], text_max_length=8,
                          length_curriculum=[[0, 2], [10, 3], [20, 5]])
    assert [m.curriculum_frames(s) for s in (0, 9, 10, 19, 20, 500)] == [2, 2, 3, 3, 5, 5]
    seen = []
    real_forward = backbone.forward
    backbone.forward = lambda tokens, *a, **k: seen.append(tokens.shape[1]) or real_forward(tokens, *a, **k)
    batch = {"tokens": torch.randint(0, 64, (2, 5, 4, 4)), "latent_mask": torch.ones(2, 5, dtype=torch.bool),
             "text_emb": torch.randn(2, 8, 32), "text_mask": torch.ones(2, 8, dtype=torch.bool), "caption": ["a", "b"]}
    for step in (0, 15, 25):
        m.masked_loss(backbone, batch, max_latent_frames=m.curriculum_frames(step))
    assert seen == [2, 3, 5]
    with pytest.raises(ValueError, match="ascending"):
        MaskedVideoModule(backbone, parts["tok"], text_encoder=parts["t5"], text_max_length=8,
                          length_curriculum=[[10, 3], [0, 2]])


def test_sliding_window_past_the_trained_length(parts):
    from maskvid.models.text_encoder import TextEncoder

    torch.manual_seed(0)
    backbone = MaskGITBackbone(vocab_size=64, grid=(3, 4, 4), dim=32, depth=1, heads=2, text_dim=32).eval()
    calls = []
    real_forward = backbone.forward
    backbone.forward = lambda tokens, *a, **k: calls.append(tuple(tokens.shape[1:])) or real_forward(tokens, *a, **k)
    model = TextToVideo(backbone, tiny_tokenizer().eval(), TextEncoder(parts["t5"], 8), grid=(3, 4, 4))
    grid = model.grid_for(15, 32)  # 8 latent frames from a model trained on 3
    assert grid == (8, 4, 4)
    tokens = model.tokens(["a red circle"], grid, SamplingOptions(steps=2, cfg_scale=1.0),
                          torch.Generator().manual_seed(0), context=2)
    assert tokens.shape == (1, 8, 4, 4) and int(tokens.max()) < 64
    assert max(c[0] for c in calls) == 3  # never beyond the trained length
    assert model.decode(tokens).shape == (1, 15, 32, 32, 3)  # uint8 frames
    with pytest.raises(ValueError, match="context"):
        model.tokens(["x"], grid, SamplingOptions(steps=1), torch.Generator(), context=3)


@pytest.mark.slow
def test_generate_writes_a_129_frame_video_from_a_mebt_checkpoint(parts, tmp_path):
    """`maskvid generate` is unchanged for MeBT: a checkpoint trained at 65 latent frames (129
    frames) gives a 129-frame mp4, and a longer one through the sliding window."""
    import json
    from pathlib import Path

    from maskvid.datamodules.video_io import decode_all
    from maskvid.models.mebt import MeBT
    from tests.conftest import run_cli

    torch.manual_seed(0)
    backbone = MeBT(vocab_size=64, grid=(65, 4, 4), dim=32, depth=1, heads=2, num_latents=8, text_dim=32)
    module = MaskedVideoModule(backbone, parts["tok"], text_encoder=parts["t5"], text_max_length=8)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)  # the hook Lightning calls when it writes a checkpoint
    ckpt = tmp_path / "mebt.ckpt"
    torch.save(checkpoint, ckpt)

    for frames in (129, 161):  # the trained length, and 16 latent frames past it
        out = tmp_path / f"gen{frames}"
        gen = run_cli("generate", "--ckpt", str(ckpt), "--prompt", "a red circle moving left",
                      "--num-frames", str(frames), "--steps", "2", "--out", str(out), "--quiet")
        assert gen.returncode == 0, gen.stderr[-3000:]
        (item,) = json.loads((out / "index.json").read_text())
        assert decode_all(Path(item["path"]).read_bytes()).shape == (frames, 32, 32, 3)
