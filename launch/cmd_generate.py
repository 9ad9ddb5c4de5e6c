"""Generate videos from text with a stage-2 model: one mp4 per prompt, plus index.json.

--ckpt takes an exported model directory (`maskvid ckpt export`, or TextToVideo.save_pretrained)
or a stage-2 checkpoint (a file or a sharded directory); either alone is enough (it carries the
frozen tokenizer and names the text encoder). Loading and sampling go through maskvid.TextToVideo.
Past the length the model was trained on, a window of that length slides forward, keeping the last
--story-context latent frames as context (MeBT can also be trained long: see mebt_128f.yaml).
Prompts come from --prompt (repeatable), or --prompts FILE: plain text with one prompt per line,
or JSONL with a "prompt" field. --story FILE.jsonl chains scenes into one long video (Phenaki's
story mode): each line is {"prompt": ..., "num_frames": ...}; every scene after the first is
primed with the last --story-context latent frames' worth of the one before's decoded frames,
re-encoded with the tokenizer (a scene starts from frames, as training's given prefixes do:
MaskedVideoModule prefix_prob). --init-video CLIP or --init-image IMAGE starts every video (a
story: its first scene) from given frames: their last frames are resized and centre-cropped to the
model's size, encoded, kept, and the rest generated. An unconditional model (trained with
text_encoder: null) takes --num-videos N instead of prompts.

examples:
  maskvid generate --ckpt runs/stage2/last.ckpt --prompt "a red circle moving left" --out samples/
  maskvid generate --ckpt last.ckpt --prompts data/synthetic/prompts_heldout.txt --out heldout/ \\
      --steps 24 --cfg-scale 4 --seed 1 --batch-size 8
  maskvid generate --ckpt last.ckpt --story story.jsonl --out story/
  maskvid generate --ckpt last.ckpt --prompt "a red circle moving left" --init-video clip.mp4 --out continued/
  maskvid generate --ckpt last.ckpt --prompt "a red circle moving left" --init-image first.png --out animated/
  maskvid generate --ckpt last.ckpt --prompt "a red circle moving left" --out dnr/ \\
      --sampler draft_revise --steps 12 --revise-sweeps 2 --revise-partitions 4 --revise-temperature 0.7
  maskvid generate --ckpt exported_model/ --prompt "a blue square moving up" --out samples/
  maskvid generate --ckpt runs/mebt_uncond_16f/checkpoints/last.ckpt --num-videos 64 --out uncond/
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import fields
from pathlib import Path

from maskvid.datamodules.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True,
                        help="exported model directory (maskvid ckpt export) or stage-2 checkpoint (maskvid fit)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    source.add_argument("--prompts", type=Path, help="prompt file: one per line, or JSONL with a 'prompt' field")
    source.add_argument("--story", type=Path, help='JSONL of scenes {"prompt": ..., "num_frames": ...}, chained')
    source.add_argument("--num-videos", type=int, help="unconditional models: how many videos (no prompts)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--init-video", type=Path, default=None,
                       help="continue this clip: its last frames (up to the clip length - 1 latent frame) are kept")
    given.add_argument("--init-image", type=Path, default=None, help="image to video: this image is the first frame")
    parser.add_argument("--num-frames", type=int, default=None, help="frames per video (default: the training clip length)")
    parser.add_argument("--steps", type=int, default=None, help="MaskGIT steps, 12-48 typical (default: the checkpoint's)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (default: the checkpoint's)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the checkpoint's)")
    parser.add_argument("--cfg-schedule", choices=["constant", "linear"], default=None,
                        help="guidance over the steps: constant, or linear from 1 to --cfg-scale (default: the checkpoint's)")
    parser.add_argument("--noise", type=float, default=None,
                        help="initial Gumbel noise on the re-masking confidences, annealed to 0 (default: the checkpoint's)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: the checkpoint's)")
    parser.add_argument("--refine-steps", type=int, default=None,
                        help="refinement rounds after the MaskGIT steps: re-mask a random --refine-ratio of the "
                             "generated tokens and predict them again from the rest (default: the checkpoint's)")
    parser.add_argument("--refine-ratio", type=float, default=None,
                        help="fraction of the tokens re-masked per refinement round (default: the checkpoint's)")
    parser.add_argument("--sampler", choices=["maskgit", "draft_revise"], default=None,
                        help="maskgit: the steps then the random refinement rounds; draft_revise: MeBT's "
                             "draft-and-revise, the steps make a draft, then --revise-sweeps (default: the checkpoint's)")
    parser.add_argument("--schedule", default=None,
                        help="fraction still masked after each step: cosine, linear or power:E (default: the checkpoint's)")
    parser.add_argument("--bootstrap-steps", type=int, default=None,
                        help="draft_revise: steps before the draft that each commit one random token (default: the checkpoint's)")
    parser.add_argument("--revise-sweeps", type=int, default=None,
                        help="draft_revise: sweeps that each re-predict every generated token once (default: the checkpoint's)")
    parser.add_argument("--revise-partitions", type=int, default=None,
                        help="draft_revise: random parts per sweep, one forward each (default: the checkpoint's)")
    parser.add_argument("--revise-temperature", type=float, default=None,
                        help="draft_revise: temperature of the revise sweeps (default: the checkpoint's)")
    parser.add_argument("--revise-top-k", type=int, default=None,
                        help="draft_revise: revise among the k most likely tokens (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: same seed, same videos (default: 0)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts generated together (default: 4)")
    parser.add_argument("--videos-per-prompt", type=int, default=1, help="samples per prompt (default: 1)")
    parser.add_argument("--story-context", type=int, default=2,
                        help="latent frames carried between story scenes and between sliding windows past the trained length (default: 2)")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate of the mp4s (default: 8)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--precision", choices=["auto", "bf16", "32"], default="auto",
                        help="the transformer's sampling precision: bf16 autocast or fp32; auto: bf16 where the "
                             "device has native bf16 (GPUs, CPUs with AMX/AVX512-BF16), else fp32. The "
                             "tokenizer decodes in fp32 either way (default: auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f'{path}:{number}: expected JSON with a "prompt" field') from None
            prompts.append(str(prompt))
        else:
            prompts.append(line)
    if not prompts:
        raise DataError(f"{path} holds no prompts")
    return prompts


def read_story(path: Path) -> list[tuple[str, int | None]]:
    if not path.is_file():
        raise DataError(f"story file not found: {path}")
    scenes = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            scenes.append((str(item["prompt"]), int(item["num_frames"]) if item.get("num_frames") else None))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DataError(f'{path}:{number}: expected {{"prompt": ..., "num_frames": ...}}') from None
    if not scenes:
        raise DataError(f"{path} holds no scenes")
    return scenes


def read_init_frames(args: argparse.Namespace, keep: int):
    """--init-video's last `keep` frames or --init-image, as uint8 [1, F, H, W, 3]; None if neither."""
    import collections

    import numpy as np
    import torch

    if args.init_image is not None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(args.init_image) as image:
                frames = np.array(image.convert("RGB"))[None]
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"--init-image {args.init_image}: {exc}") from None
    elif args.init_video is not None:
        from maskvid.datamodules.video_io import VideoDecodeError, iter_frames

        if not args.init_video.is_file():
            raise DataError(f"--init-video not found: {args.init_video}")
        try:
            frames = np.stack(collections.deque(iter_frames(str(args.init_video)), maxlen=keep))
        except (VideoDecodeError, ValueError) as exc:  # ValueError: np.stack of zero frames
            raise DataError(f"--init-video {args.init_video}: cannot decode ({exc})") from None
    else:
        return None
    return torch.from_numpy(np.array(frames))[None]


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from maskvid.datamodules.video_io import encode_mp4
    from maskvid.models.sampling import SamplingOptions
    from maskvid.text_to_video import TextToVideo

    if args.batch_size < 1 or args.videos_per_prompt < 1 or (args.num_videos is not None and args.num_videos < 1):
        raise DataError("--batch-size, --videos-per-prompt and --num-videos must be >= 1")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        model = TextToVideo.load(args.ckpt, map_location=device)
        # Each sampler flag is named after its SamplingOptions field; a flag not given (None) keeps
        # the model's value. A given 0 is kept too, so that check() reports it rather than hiding it.
        options = model.options(**{f.name: getattr(args, f.name, None) for f in fields(SamplingOptions)})
    except ValueError as exc:  # not a stage-2 model, a damaged file, a bad sampler value
        raise DataError(str(exc)) from None
    if (args.num_videos is not None) != model.unconditional:
        raise DataError("this model is unconditional: use --num-videos N, not prompts" if model.unconditional
                        else "--num-videos is for unconditional models: this one takes --prompt/--prompts/--story")
    args.out.mkdir(parents=True, exist_ok=True)
    index = []
    pt = model.tokenizer.network.temporal_patch_size
    init = read_init_frames(args, 1 + (model.trained_frames - 1) * pt)

    def prime_for(grid, count: int):
        return None if init is None else model.init_prime(init, grid, count)

    def sample(prompts, grid, generators, **kw) -> torch.Tensor:
        return model.tokens(prompts, grid, options, generators, precision=args.precision, **kw)

    def save(video, name: str, prompt) -> None:
        data, n = encode_mp4(list(video.numpy()), fps=args.fps, reproducible=True)
        path = args.out / name
        path.write_bytes(data)
        index.append({"prompt": prompt, "path": str(path), "num_frames": n})

    try:
        if args.num_videos is not None:
            grid = model.grid_for(args.num_frames)
            for start in tqdm(range(0, args.num_videos, args.batch_size), desc="batches", disable=args.quiet):
                ids = range(start, min(start + args.batch_size, args.num_videos))
                # (seed, i, 0), as TextToVideo.generate(num_videos=...) draws them.
                generators = [model.video_generator(args.seed, i, 0) for i in ids]
                videos = model.decode(sample(len(ids), grid, generators, context=args.story_context,
                                             prime=prime_for(grid, len(ids))))
                for i, video in zip(ids, videos):
                    save(video, f"{i:04d}-unconditional.mp4", None)
        elif args.story:
            scenes = read_story(args.story)
            previous = None
            pieces = []
            for prompt, frames in tqdm(scenes, desc="scenes", disable=args.quiet):
                grid = model.grid_for(frames or args.num_frames)
                if previous is None:
                    prime, drop = prime_for(grid, 1), 0
                else:
                    # Re-encode the previous scene's last frames: the scene starts from frames, with
                    # its own first (image-like) latent frame, as training shows given prefixes.
                    prime = model.init_prime(previous, grid, 1, context=args.story_context)
                    drop = 1 + (prime.shape[1] - 1) * pt  # the reconstruction of frames already shown
                video = model.decode(sample([prompt], grid, [model.video_generator(args.seed, len(pieces))], prime=prime))
                pieces.append(video[:, drop:])
                previous = video
            save(torch.cat(pieces, dim=1)[0], "story.mp4", [p for p, _ in scenes])
        else:
            prompts = args.prompt or read_prompts(args.prompts)
            grid = model.grid_for(args.num_frames)
            jobs = [(i, p, k) for i, p in enumerate(prompts) for k in range(args.videos_per_prompt)]
            bar = tqdm(total=len(jobs), desc="videos", unit="video", disable=args.quiet)
            for start in range(0, len(jobs), args.batch_size):
                batch = jobs[start : start + args.batch_size]
                # (seed, prompt, sample), as TextToVideo.generate draws them: same seed, same video.
                generators = [model.video_generator(args.seed, i, k) for i, _, k in batch]
                videos = model.decode(sample([p for _, p, _ in batch], grid, generators, context=args.story_context,
                                             prime=prime_for(grid, len(batch))))
                for (i, prompt, k), video in zip(batch, videos):
                    suffix = f"-{k}" if args.videos_per_prompt > 1 else ""
                    save(video, f"{i:04d}-{slug(prompt)}{suffix}.mp4", prompt)
                bar.update(len(batch))
            bar.close()
    except ValueError as exc:  # a frame count the tokenizer or backbone cannot take
        raise DataError(str(exc)) from None
    (args.out / "index.json").write_text(json.dumps(index, indent=2))
    print(f"wrote {len(index)} video(s) and {args.out / 'index.json'}")
    return 0
