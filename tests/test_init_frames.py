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


def generate_cli(ckpt, out, *extra: str) -> list[dict]:
    """`maskvid generate` in-process (its parser and run), on the CPU in fp32."""
    import argparse
    import json

    from maskvid.launch import cmd_generate

    parser = argparse.ArgumentParser()
    cmd_generate.add_arguments(parser)
    args = parser.parse_args(["--ckpt", str(ckpt), "--out", str(out), "--steps", "2", "--device", "cpu",
                              "--precision", "32", "--quiet", *extra])
    assert cmd_generate.run(args) == 0
    return json.loads((out / "index.json").read_text())


def smooth(frames: int, seed: int) -> torch.Tensor:
    """A moving colour gradient."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, generator=g) * 200
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    video = torch.stack([(base + 2 * (x + t)[..., None] + y[..., None]) for t in range(frames)])
    return video.clamp(0, 255).to(torch.uint8)[None]


def test_cli_init_video_and_image_start_from_the_given_frames(ckpts, model, tmp_path, monkeypatch):  # noqa: F811
    from PIL import Image

    from maskvid.datamodules.video_io import decode_all, encode_mp4

    decoded = []
    decode = TextToVideo.decode
    monkeypatch.setattr(TextToVideo, "decode", lambda self, tokens: decoded.append(decode(self, tokens)) or decoded[-1])
    grid = model.grid_for(None)
    pt = model.tokenizer.network.temporal_patch_size
    clip = smooth(1 + 3 * pt, seed=0)
    data, _ = encode_mp4(list(clip[0].numpy()), fps=8, reproducible=True)
    (tmp_path / "clip.mp4").write_bytes(data)
    Image.fromarray(smooth(1, seed=1)[0, 0].numpy()).save(tmp_path / "img.png")
    given_clip = torch.from_numpy(decode_all(str(tmp_path / "clip.mp4")))[None]
    for flag, path, frames in (("--init-video", "clip.mp4", given_clip), ("--init-image", "img.png", smooth(1, 1))):
        decoded.clear()
        (item,) = generate_cli(ckpts["stage2"], tmp_path / flag, "--prompt", PROMPTS[0], flag, str(tmp_path / path))
        assert decode_all(item["path"]).shape[0] == 1 + (grid[0] - 1) * pt
        prime = model.init_prime(frames, grid, 1)
        assert prime.shape[1] == min(grid[0] - 1, 1 + (frames.shape[1] - 1) // pt)
        n = 1 + (prime.shape[1] - 1) * pt
        (video,) = decoded  # what went into the mp4
        assert torch.equal(video[:, :n], decode(model, prime))  # the given frames, through the tokenizer
    with pytest.raises(Exception, match="init-video not found"):
        generate_cli(ckpts["stage2"], tmp_path / "bad", "--prompt", "x", "--init-video", str(tmp_path / "none.mp4"))


def test_story_primes_each_scene_with_the_previous_scenes_frames_re_encoded(ckpts, model, tmp_path, monkeypatch):  # noqa: F811
    from maskvid.datamodules.video_io import decode_all

    calls = []
    original = TextToVideo.init_prime

    def spy(self, frames, grid, count, context=None):
        prime = original(self, frames, grid, count, context)
        calls.append((frames.clone(), context, prime))
        return prime

    monkeypatch.setattr(TextToVideo, "init_prime", spy)
    decoded = []
    decode = TextToVideo.decode
    monkeypatch.setattr(TextToVideo, "decode", lambda self, tokens: decoded.append(decode(self, tokens)) or decoded[-1])
    pt = model.tokenizer.network.temporal_patch_size
    story = tmp_path / "story.jsonl"
    story.write_text('{"prompt": "a red circle moving left", "num_frames": 5}\n'
                     '{"prompt": "a red circle moving up", "num_frames": 5}\n')
    (item,) = generate_cli(ckpts["stage2"], tmp_path / "story", "--story", str(story), "--story-context", "2")
    (frames, context, prime), = calls  # the second scene only: no --init-* given
    assert context == 2 and prime.shape[1] == 2
    assert torch.equal(frames, decoded[0])  # the first scene's pixels, not its tokens
    assert torch.equal(prime, model.tokenizer.encode(decoded[0][:, -(1 + pt):]))
    # The second scene starts with the reconstruction of those frames, which the story shows once.
    assert decode_all(item["path"]).shape[0] == 5 + 5 - (1 + pt)


def test_inpaint_keeps_the_given_tokens_outside_the_box(model):
    from maskvid.models.sampling import keep_box

    grid = model.grid_for(None)
    pt = model.tokenizer.network.temporal_patch_size
    video = given(2, 1 + (grid[0] - 1) * pt, 32, 32, seed=5)
    keep = keep_box(grid, (1, grid[0]), (1, 3), (1, 3))  # regenerate a box from the second latent frame on
    out = model.inpaint(video, keep, PROMPTS, seed=0, steps=2, precision="32")
    encoded = model.tokenizer.encode(video)
    expected = model.tokens(PROMPTS, grid, model.options(steps=2), [model.video_generator(0, i, 0) for i in range(2)],
                            given=encoded, keep=keep.expand(2, *grid))
    assert torch.equal(expected[:, keep], encoded[:, keep]) and torch.equal(out, model.decode(expected))
    # Nothing before the box changes: the first frame is the tokenizer's reconstruction of the given one.
    assert torch.equal(out[:, :1], model.decode(encoded[:, :1]))
    with pytest.raises(ValueError, match="1 prompt"):
        model.inpaint(video, keep, ["only one"], seed=0, steps=2)
