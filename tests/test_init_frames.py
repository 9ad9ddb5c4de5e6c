"""Generation from given frames (issue 35 item 3): TextToVideo.generate(init_frames=...) and
`maskvid generate --init-video/--init-image` keep the tokenizer's tokens of the given frames as the
first latent frames, and the output starts with the tokenizer's reconstruction of those frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskvid import TextToVideo
from maskvid.text_to_video import fit_frames
from tests.test_api import PROMPTS, ckpts  # noqa: F401  (the module fixture)


@pytest.fixture(scope="module")
def model(ckpts):  # noqa: F811
    return TextToVideo.load(ckpts["stage2"])


def given(count: int, frames: int, height: int = 40, width: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, frames, height, width, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_given_frames_tokens_are_kept_and_come_back_decoded(model):
    grid = model.grid_for(None)
    pt = model.tokenizer.network.temporal_patch_size
    frames = given(2, 1 + 2 * pt)  # 3 latent frames' worth, in a frame size the model must crop to
    k = min(3, grid[0] - 1)
    n = 1 + (k - 1) * pt
    prime = model.encode_frames(frames, k, model.frame_size())
    assert prime.shape == (2, k, *grid[1:])
    expected_prime = model.tokenizer.encode(fit_frames(frames[:, -n:], model.frame_size()))
    assert torch.equal(prime, expected_prime)

    options = model.options(steps=2)
    tokens = model.tokens(PROMPTS, grid, options, [model.video_generator(0, i, 0) for i in range(2)],
                          prime=model.init_prime(frames, grid, 2))
    assert torch.equal(tokens[:, :k], expected_prime)  # the kept latent frames are exactly the encoded ones
    assert (tokens[:, k:] < model.tokenizer.vocab_size).all()  # and the rest is generated

    video = model.generate(PROMPTS, seed=0, steps=2, init_frames=frames, precision="32")
    assert video.shape[1] == 1 + (grid[0] - 1) * pt
    assert torch.equal(video, model.decode(tokens))  # generate is tokens() primed with the given frames
    # The C-ViViT is causal: the first frames are the tokenizer's reconstruction of the given ones.
    assert torch.equal(video[:, :n], model.decode(expected_prime))


def test_one_given_clip_primes_every_prompt_and_an_image_primes_one_latent_frame(model):
    grid = model.grid_for(None)
    image = given(1, 1, 32, 32, seed=1)
    prime = model.init_prime(image, grid, 2)
    assert prime.shape == (2, 1, *grid[1:]) and torch.equal(prime[0], prime[1])
    video = model.generate(PROMPTS, seed=3, steps=2, init_frames=image)
    assert torch.equal(video[:, :1], model.decode(prime[:1]).expand(2, -1, -1, -1, -1))
    with pytest.raises(ValueError, match="init_frames holds 3 videos"):
        model.generate(PROMPTS, seed=0, steps=2, init_frames=given(3, 1))
    with pytest.raises(ValueError, match="uint8"):
        model.generate(PROMPTS, seed=0, steps=2, init_frames=given(1, 1).float())


def test_fit_frames_scales_to_cover_and_centre_crops():
    frames = torch.zeros(1, 1, 20, 40, 3, dtype=torch.uint8)
    frames[:, :, :, 10:30] = 255  # a centred bright band, half the width
    out = fit_frames(frames, (16, 16))
    assert out.shape == (1, 1, 16, 16, 3) and out.dtype == torch.uint8
    assert int(out[0, 0, 8, 8, 0]) == 255  # the centre survives the crop
    assert torch.equal(fit_frames(out, (16, 16)), out)  # the right size is left untouched
