"""FitScheduleToTime: a fit whose max_steps does not fit in max_time ends its schedule in time."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, TensorDataset

from maskvid.lightning_modules.schedules import warmup_cosine
from maskvid.lightning_modules.time_budget import FitScheduleToTime

MIN_RATIO = 0.1


class SlowModel(LightningModule):
    """A linear model whose step takes `step_s` of wall time; records the LR multiplier per step."""

    def __init__(self, step_s: float):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.step_s = step_s
        self.multipliers: list[float] = []

    def training_step(self, batch, batch_idx):
        time.sleep(self.step_s)
        self.multipliers.append(self.trainer.optimizers[0].param_groups[0]["lr"] / 0.1)
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = LambdaLR(optimizer, warmup_cosine(5, self.trainer.max_steps, MIN_RATIO))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)


def trainer(tmp_path, callback, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                   callbacks=[callback], **kwargs)


def test_warmup_cosine_length_can_be_shortened():
    schedule = warmup_cosine(10, 100, MIN_RATIO)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(55) == pytest.approx(MIN_RATIO + (1 - MIN_RATIO) * 0.5)
    schedule.total_steps = 54
    assert schedule(54) == pytest.approx(MIN_RATIO)
    assert schedule(32) == pytest.approx(MIN_RATIO + (1 - MIN_RATIO) * 0.5)


def test_a_budget_too_short_for_max_steps_ends_the_schedule_within_it(tmp_path):
    # 1000 steps of >= 20 ms would need 20 s; the budget is 3 s.
    model = SlowModel(step_s=0.02)
    callback = FitScheduleToTime(first_check=10, check_every=10, margin=0.8)
    t = trainer(tmp_path, callback, max_steps=1000, max_time=timedelta(seconds=3))
    start = time.monotonic()
    t.fit(model)
    assert time.monotonic() - start < 20
    assert callback.original_max_steps == 1000
    assert callback.max_steps is not None and 10 < callback.max_steps < 150
    # It stopped at the shortened max_steps, not at the time limit part-way through the schedule...
    assert t.global_step == t.max_steps == callback.max_steps
    # ...so the learning rate decayed to its floor by the last step.
    assert model.multipliers[-1] == pytest.approx(MIN_RATIO, abs=0.05)
    decay = model.multipliers[5:]
    assert all(a >= b - 1e-9 for a, b in zip(decay, decay[1:])), "the shortened schedule only decays"


def test_without_max_time_or_with_enough_time_nothing_changes(tmp_path):
    for kwargs in ({}, {"max_time": timedelta(minutes=5)}):
        model = SlowModel(step_s=0.0)
        callback = FitScheduleToTime(first_check=5, check_every=5)
        t = trainer(tmp_path, callback, max_steps=40, **kwargs)
        t.fit(model)
        assert t.global_step == 40 and callback.max_steps is None
        assert model.multipliers[-1] > MIN_RATIO  # step 39 of 40 is not yet at the floor


def test_a_resumed_fit_keeps_the_shortened_schedule_unless_max_steps_changed(tmp_path):
    callback = FitScheduleToTime()
    callback.load_state_dict({"original_max_steps": 100, "max_steps": 30})
    model = SlowModel(step_s=0.0)
    t = trainer(tmp_path, callback, max_steps=100)
    t.fit(model)
    assert t.global_step == 30
    assert model.multipliers[-1] == pytest.approx(MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 24 / 25)).item()))
    assert callback.state_dict() == {"original_max_steps": 100, "max_steps": 30}

    # Restarted with another max_steps: the user's new length wins.
    callback = FitScheduleToTime()
    callback.load_state_dict({"original_max_steps": 100, "max_steps": 30})
    t = trainer(tmp_path, callback, max_steps=50)
    t.fit(SlowModel(step_s=0.0))
    assert t.global_step == 50
    assert callback.state_dict() == {"original_max_steps": 50, "max_steps": None}


@pytest.mark.parametrize("kwargs", [{"first_check": 0}, {"check_every": 0}, {"margin": 0.0}, {"margin": 1.5}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        FitScheduleToTime(**kwargs)


def test_the_modules_schedule_spans_max_steps_or_lightnings_estimate():
    from types import SimpleNamespace

    from maskvid.lightning_modules.schedules import fit_warmup_cosine

    assert fit_warmup_cosine(SimpleNamespace(max_steps=100), 10, MIN_RATIO).total_steps == 100
    by_epochs = fit_warmup_cosine(SimpleNamespace(max_steps=-1, estimated_stepping_batches=40.0), 10, MIN_RATIO)
    assert by_epochs.total_steps == 40 and by_epochs(40) == pytest.approx(MIN_RATIO) and by_epochs(39) > MIN_RATIO
