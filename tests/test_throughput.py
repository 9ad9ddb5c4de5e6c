"""TrainingThroughput (lightning_modules/throughput.py): on a tiny fit with a known clock and a
model whose FLOPs are known, the logged rates are exactly flops, clips and tokens per batch over
the step time."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import maskvid.lightning_modules.throughput as throughput
from maskvid.lightning_modules.throughput import TrainingThroughput, tokens_per_clip

B, GRID, D = 3, (2, 2, 2), 16  # clips per batch, token grid (t, h, w), width
N = GRID[0] * GRID[1] * GRID[2]  # tokens per clip
# Forward x @ W^T, then in backward the gradients of W and of x: three [B*N, D] x [D, D] matmuls.
FLOPS_PER_BATCH = 3 * 2 * B * N * D * D
STEP = 0.25  # seconds per step on the substituted clock


class _Batches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        return {"tokens": torch.randint(0, 10, GRID), "caption": f"clip {i}"}


class _TokenModel(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, D)
        self.proj = nn.Linear(D, D, bias=False)

    def training_step(self, batch, batch_idx):
        x = self.emb(batch["tokens"].flatten(1))
        return self.proj(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Batches(), batch_size=B)


class _VideoBatches(_Batches):
    def __getitem__(self, i: int) -> dict:
        return {"video": torch.rand(3, 1, 2, 2), "caption": f"clip {i}"}


class _VideoModel(_TokenModel):
    """Video batches and no tokenizer: clips are known, tokens are not."""

    def training_step(self, batch, batch_idx):
        return self.proj(batch["video"].flatten(1)[:, :4].repeat(1, D // 4)).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_VideoBatches(), batch_size=B)


def _fit(tmp_path: Path, monkeypatch, callback, steps: int = 6,
         durations: list[float] | None = None, model: type = _TokenModel) -> list[dict]:
    """Fit on a substituted clock: read twice at the end of the counted first step, then once per
    step, `durations` apart (else STEP)."""
    ticks = itertools.accumulate(durations or [STEP] * steps, initial=1.0)
    clock = itertools.chain([0.0], ticks)
    monkeypatch.setattr(throughput, "_clock", lambda: next(clock))
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=CSVLogger(tmp_path), log_every_n_steps=1,
                      callbacks=callback, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(model())
    (metrics,) = Path(tmp_path).rglob("metrics.csv")
    with open(metrics) as f:
        return [r for r in csv.DictReader(f) if r.get("throughput/flops_per_sec")]


def test_logged_rates_are_the_known_answers(tmp_path, monkeypatch):
    callback = TrainingThroughput(window=3, peak_flops=1e6)
    durations = [0.2, 0.4, 0.1, 0.3, 0.5]  # steps 1..5
    rows = _fit(tmp_path, monkeypatch, callback, durations=durations)
    assert callback.flops_per_batch == FLOPS_PER_BATCH  # counted on the first batch
    # Step 0 is counted, not timed; each later step is timed from the end of the one before.
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    for i, row in enumerate(rows):
        window = durations[max(0, i - 2): i + 1]  # the last three steps
        step_time = sum(window) / len(window)
        assert float(row["throughput/flops_per_sec"]) == pytest.approx(FLOPS_PER_BATCH / step_time)
        assert float(row["throughput/clips_per_sec"]) == pytest.approx(B / step_time)
        assert float(row["throughput/tokens_per_sec"]) == pytest.approx(B * N / step_time)
        assert float(row["throughput/mfu"]) == pytest.approx(FLOPS_PER_BATCH / step_time / 1e6)
        assert float(row["throughput/peak_flops"]) == 1e6


def test_no_peak_on_a_cpu_means_no_mfu_and_a_second_copy_stays_idle(tmp_path, monkeypatch):
    """Two trainer files layered each append the callback: one does the work (a second would read
    the clock too, and the known step times would not come out)."""
    rows = _fit(tmp_path, monkeypatch, [TrainingThroughput(), TrainingThroughput(window=1)], steps=4)
    assert len(rows) == 3
    assert rows and all(not r.get("throughput/mfu") for r in rows)
    assert float(rows[-1]["throughput/flops_per_sec"]) == pytest.approx(FLOPS_PER_BATCH / STEP)


def test_video_batches_without_a_tokenizer_log_clips_not_tokens(tmp_path, monkeypatch):
    rows = _fit(tmp_path, monkeypatch, TrainingThroughput(), steps=3, model=_VideoModel)
    assert len(rows) == 2 and all(float(r["throughput/clips_per_sec"]) == pytest.approx(B / STEP) for r in rows)
    assert not any(r.get("throughput/tokens_per_sec") for r in rows)


def test_tokens_per_clip_of_video_batches():
    from tests.stage2_fixtures import tiny_tokenizer

    class Module:
        tokenizer = tiny_tokenizer()  # 8x8 patches, tubelets of 2 frames

    grid = Module.tokenizer.token_grid(9, (32, 32))
    assert tokens_per_clip(Module, {"video": torch.zeros(2, 3, 9, 32, 32)}) == grid[0] * grid[1] * grid[2] == 5 * 4 * 4
    assert tokens_per_clip(Module, {"video": torch.zeros(2, 9, 32, 32, 3, dtype=torch.uint8)}) == 80
    assert tokens_per_clip(Module, {"tokens": torch.zeros(2, 3, 4, 4)}) == 48
    assert tokens_per_clip(object(), {"video": torch.zeros(2, 3, 9, 32, 32)}) is None  # no tokenizer: no tokens


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="window"):
        TrainingThroughput(window=0)


def test_the_count_is_torchs_and_a_gan_step_with_r1_first_runs_under_it():
    """The FLOP count is torch's FlopCounterMode total; its module tracker is left out because its
    backward hooks make R1's `autograd.grad` on a leaf fail when the first counted step is a GAN
    step (a run resumed past gan_start_step)."""
    import lightning as L
    from torch.utils.data import DataLoader
    from torch.utils.flop_counter import FlopCounterMode

    from maskvid.lightning_modules.throughput import TrainingThroughput, total_flop_counter
    from tests.test_tokenizer_module import small_module

    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    x = torch.randn(8, 16)
    with FlopCounterMode(display=False) as reference:
        net(x).sum().backward()
    with total_flop_counter() as ours:
        net(x).sum().backward()
    assert ours.get_total_flops() == reference.get_total_flops() == 3 * 2 * 8 * (16 * 32 + 32 * 4) - 2 * 8 * 16 * 32

    module = small_module(gan_start_step=0, gp_every=1, warmup_steps=1)
    batch = {"video": torch.rand(2, 3, 5, 32, 32) * 2 - 1, "caption": ["a", "b"],
             "frame_mask": torch.ones(2, 5, dtype=torch.bool)}
    callback = TrainingThroughput()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[callback])
    trainer.fit(module, DataLoader([batch] * 3, batch_size=None))
    assert trainer.global_step == 2 and callback.flops_per_batch > 0
