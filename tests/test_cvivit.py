"""C-ViViT: shapes, causality, the public API stage 2 relies on, and rebuilding from config."""

from __future__ import annotations

import pytest
import torch

from maskvid.models.config import instantiate
from maskvid.models.cvivit import CViViT
from maskvid.models.quantizer import FSQ, VectorQuantizer


def tiny(quantizer=None, **kw) -> CViViT:
    torch.manual_seed(0)
    args = dict(image_size=32, patch_size=8, temporal_patch_size=2, dim=32, spatial_depth=1,
                temporal_depth=2, heads=2, quantizer=quantizer or VectorQuantizer(64, 8))
    return CViViT(**(args | kw)).eval()


@pytest.mark.parametrize("frames", [1, 3, 5, 9, 17])
def test_encode_decode_round_trip_shapes(frames):
    model = tiny()
    video = torch.rand(2, 3, frames, 32, 24) * 2 - 1
    indices = model.encode(video)
    assert indices.shape == (2, *model.token_grid(frames, (32, 24)))
    assert indices.shape == (2, 1 + (frames - 1) // 2, 4, 3)
    assert indices.dtype == torch.long and 0 <= int(indices.min()) and int(indices.max()) < model.vocab_size
    assert model.decode(indices).shape == video.shape
    recon, q = model(video)
    assert recon.shape == video.shape and torch.equal(q.indices, indices)


def test_single_image_is_a_one_frame_video():
    model = tiny()
    image = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    assert model.encode(image).shape == (1, 1, 4, 4)
    assert model.decode(model.encode(image)).shape == (1, 3, 1, 32, 32)


def test_tokens_are_causal_in_time():
    """Changing frame f leaves the tokens (and features) of every earlier latent frame unchanged."""
    model = tiny()
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    base_feat = model.encode_features(video)
    base_idx = model.encode(video)
    for frame in (1, 4, 8):
        changed = video.clone()
        changed[:, :, frame] = torch.rand_like(changed[:, :, frame]) * 2 - 1
        latent = 0 if frame == 0 else 1 + (frame - 1) // 2  # the tubelet holding `frame`
        feat, idx = model.encode_features(changed), model.encode(changed)
        assert torch.equal(idx[:, :latent], base_idx[:, :latent]), frame
        torch.testing.assert_close(feat[:, :latent], base_feat[:, :latent], rtol=0, atol=1e-6)
        # ...and the change does reach the latent frame that holds it and the later ones.
        for later in range(latent, feat.shape[1]):
            assert not torch.allclose(feat[:, later], base_feat[:, later]), (frame, later)


def test_token_grid_and_clear_errors():
    model = tiny()
    assert model.token_grid(17, 32) == (9, 4, 4)
    assert model.vocab_size == 64
    with pytest.raises(ValueError, match=r"1 \+ k\*2 frames"):
        model.token_grid(16, 32)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model.token_grid(17, 30)
    with pytest.raises(ValueError, match="exceeds"):
        model.token_grid(17, 64)
    with pytest.raises(ValueError, match=r"expected video \[B, 3"):
        model.encode(torch.zeros(1, 1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\)"):
        model.decode(torch.full((1, 2, 4, 4), 64))


def test_fsq_tokenizer_round_trip():
    model = tiny(quantizer=FSQ([4, 4, 3]))
    assert model.vocab_size == 48
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    recon, q = model(video)
    # decode(indices) is exactly the reconstruction: the codes are recoverable from the ids.
    torch.testing.assert_close(model.decode(q.indices), recon)


def test_config_rebuilds_the_same_network():
    model = tiny()
    again = instantiate(model.config)
    assert again.config == model.config
    again.load_state_dict(model.state_dict())
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    assert torch.equal(again.eval().encode(video), model.encode(video))
    with pytest.raises(ValueError, match="trusted"):
        instantiate({"class_path": "os.system", "init_args": {}})
