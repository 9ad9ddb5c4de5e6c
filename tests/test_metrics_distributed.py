"""The metrics across ranks: 2 processes over gloo, each with half of the videos, give the same FVD,
KVD, CLIPSIM, caption accuracy and codebook usage as 1 process with all of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.test_distributed import free_port

pytestmark = pytest.mark.slow

CAPTIONS = ["a red video", "a green video", "a blue video", "a yellow video"]
SYNTHETIC = [{"colour": "red", "shape": "circle", "direction": "left"},
             {"colour": "blue", "shape": "square", "direction": "up"},
             {"colour": "white", "shape": "triangle", "direction": "down"},
             {"colour": "green", "shape": "circle", "direction": "right"}]


def compute_all(rank: int, world: int, i3d: str, clip: str) -> dict[str, float]:
    """Every metric over this rank's share (videos rank, rank + world, ...) of fixed data."""
    from maskvid.datamodules.pixels import to_model
    from maskvid.datamodules.synthetic import render_video
    from maskvid.metrics.caption_accuracy import CaptionAccuracy
    from maskvid.metrics.clipsim import CLIPSimilarity
    from maskvid.metrics.codebook import CodebookUsage
    from maskvid.metrics.fvd import FrechetVideoDistance
    from maskvid.metrics.i3d import load_i3d
    from maskvid.metrics.kvd import KernelVideoDistance

    g = torch.Generator().manual_seed(0)
    real = torch.rand(20, 3, 16, 32, 32, generator=g) * 2 - 1
    fake = (torch.rand(20, 3, 16, 32, 32, generator=g) * 2 - 0.7).clamp(-1, 1)
    fvd = FrechetVideoDistance(load_i3d(i3d, resolution=32))
    # Subsets of 12 of the 20: the gathered rows must come back in the same order on every rank count.
    kvd = KernelVideoDistance(load_i3d(i3d, resolution=32), subsets=5, subset_size=12)
    # 20 videos for 16-d features: a full-rank covariance. Uneven batches on purpose: what is summed must not depend on how it was batched.
    mine = list(range(rank, 20, world))
    for chunk in (mine[:1], mine[1:]):
        fvd.update(real[chunk], real=True)
        fvd.update(fake[chunk], real=False)
        kvd.update(real[chunk], real=True)
        kvd.update(fake[chunk], real=False)
    out_fvd = fvd.compute()
    out_kvd = kvd.compute()

    clipsim = CLIPSimilarity(clip)
    videos = torch.rand(8, 3, 4, 32, 32, generator=g) * 2 - 1
    captions = [CAPTIONS[i % 4] for i in range(8)]
    share = list(range(rank, 8, world))
    clipsim.update(videos[share], [captions[i] for i in share])

    caption = CaptionAccuracy()
    rendered = torch.stack([to_model(torch.from_numpy(render_video(a, size=32, frames=9))) for a in SYNTHETIC])
    targets = [SYNTHETIC[0], SYNTHETIC[1], {**SYNTHETIC[2], "direction": "up"}, None]
    share = list(range(rank, 4, world))
    caption.update(rendered[share], [targets[i] for i in share])
    out_caption = caption.compute()

    codebook = CodebookUsage(64)
    codes = torch.randint(0, 40, (6, 50), generator=g)
    codebook.update(codes[rank::world])
    out_codes = codebook.compute()
    return {
        "fvd": float(out_fvd["fvd"]), "num_real": int(out_fvd["num_real"]), "num_fake": int(out_fvd["num_fake"]),
        "kvd": float(out_kvd["kvd"]), "kvd_num_real": int(out_kvd["num_real"]),
        "clipsim": float(clipsim.compute()),
        **{f"caption_{k}": float(v) for k, v in out_caption.items()},
        "usage": float(out_codes["usage"]), "perplexity": float(out_codes["perplexity"]),
    }


def _worker() -> None:
    rank, world, port, i3d, clip, out = sys.argv[1:7]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=int(rank),
                                         world_size=int(world))
    try:
        result = compute_all(int(rank), int(world), i3d, clip)
    finally:
        torch.distributed.destroy_process_group()
    Path(out).write_text(json.dumps(result))


def test_two_processes_with_half_the_videos_each_equal_one_process(tmp_path):
    from maskvid.metrics.clip_model import write_random_clip
    from maskvid.metrics.i3d import save_i3d
    from tests.test_metrics import TINY_CLIP, tiny_i3d

    i3d = save_i3d(tmp_path / "i3d.pt", tiny_i3d())
    clip = tmp_path / "clip"
    write_random_clip(clip, **TINY_CLIP)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", "from tests.test_metrics_distributed import _worker; _worker()",
                               str(rank), "2", str(port), str(i3d), str(clip), str(tmp_path / f"rank{rank}.json")],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    # The single-process reference runs meanwhile.
    single = compute_all(0, 1, str(i3d), str(clip))
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank computes the same, global values
    assert (single["num_real"], single["num_fake"]) == (20, 20)
    for key, value in single.items():
        assert ranks[0][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert single["kvd_num_real"] == 20 and single["kvd"] != ranks[0]["fvd"]
    assert single["fvd"] > 0 and single["caption_count"] == 3 and single["caption_unscored"] == 1
