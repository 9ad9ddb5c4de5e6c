"""maskvid.launch.last_checkpoint.LastCheckpoint: `last` holds the final step of a run stopped between saves."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from maskvid.launch.last_checkpoint import LastCheckpoint


class _StopAt(Callback):
    """Stops training the way max_time does: should_stop after a train batch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _fit(tmp_path, checkpoint, stop_at: int) -> None:
    trainer = Trainer(default_root_dir=tmp_path, max_steps=100, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoint, _StopAt(stop_at)])
    trainer.fit(BoringModel())


def test_last_is_written_when_stopped_between_saves(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    plain = ModelCheckpoint(dirpath=tmp_path / "plain", every_n_train_steps=4, save_last=True, save_top_k=-1)
    _fit(tmp_path, plain, stop_at=7)
    # Lightning's own callback leaves `last` at the periodic save (the behaviour being fixed).
    assert torch.load(tmp_path / "plain/last.ckpt", weights_only=True)["global_step"] == 4

    ours = LastCheckpoint(dirpath=tmp_path / "ours", every_n_train_steps=4, save_last=True, save_top_k=-1)
    _fit(tmp_path, ours, stop_at=7)
    assert torch.load(tmp_path / "ours/last.ckpt", weights_only=True)["global_step"] == 7
    # The periodic checkpoints are untouched.
    assert sorted(p.name for p in (tmp_path / "ours").glob("*.ckpt")) == ["epoch=0-step=4.ckpt", "last.ckpt"]


def test_no_extra_write_when_the_final_step_was_saved(tmp_path):
    ours = LastCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_last=True, save_top_k=-1)
    _fit(tmp_path, ours, stop_at=8)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 8
