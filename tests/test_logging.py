"""Logging: TensorBoard + CSV by default in one version directory, videos to the loggers, W&B by
config, and one curve reader for either log."""

from __future__ import annotations

import inspect
import io
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image, ImageSequence

from maskvid.launch.demo_checks import read_metrics, tokenizer_psnr
from maskvid.launch.run_curves import read_curves
from maskvid.launch.run_loggers import RunCSVLogger, RunTensorBoardLogger, resolve_loggers
from maskvid.lightning_modules.media import gif_scale, log_reconstructions, log_samples
from tests.conftest import REPO, run_cli
from tests.test_tokenizer_module import MODEL, six_step_fit, synthetic32  # noqa: F401 - fixture


def gif_images(event_dir: Path, tag: str) -> dict[int, Image.Image]:
    """The image summaries of `tag` in event_dir's event files, by step, decoded."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(event_dir), size_guidance={IMAGES: 0})
    events.Reload()
    return {e.step: Image.open(io.BytesIO(e.encoded_image_string)) for e in events.Images(tag)}


def frames_of(gif: Image.Image) -> list[np.ndarray]:
    return [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]


def coloured_clips(b: int, t: int, h: int, w: int) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1], a few exact colours (a GIF palette holds them losslessly), each
    frame different from the one before (Pillow folds repeated frames into one)."""
    video = torch.full((b, 3, t, h, w), -1.0)
    for i in range(b):
        for j in range(t):
            video[i, i % 3, j, : (j + 1) * h // (t + 1), :] = 1.0
            video[i, (i + 1) % 3, j, :, : w // 2] = 0.0
    return video


def test_media_send_videos_tensorboard_plays(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    trainer = SimpleNamespace(logger=logger, loggers=[logger], global_step=7, default_root_dir=str(tmp_path))
    real = coloured_clips(2, 5, 16, 24)
    recon = real.flip(2)  # something else on the right half
    paths = log_reconstructions(trainer, real, recon, ["a", "b"], fps=4.0)
    samples = coloured_clips(3, 6, 16, 24)
    log_samples(trainer, samples, ["x", "y", "z"], fps=4.0)
    logger.experiment.flush()

    scale = gif_scale(16)
    assert scale == 8 and paths["mp4"].is_file() and paths["png"].is_file()
    (gif,) = gif_images(tmp_path / "version_0", "val/reconstructions_video").values()
    frames = frames_of(gif)
    assert len(frames) == 5 and gif.size == (2 * 24 * scale, 2 * 16 * scale)
    assert gif.info["duration"] == 250 and gif.info["loop"] == 0
    # Frame 2, clip 1 (second row): real on the left, the reversed-in-time reconstruction on the right.
    expected_real = ((real[1, :, 2].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    expected_recon = ((recon[1, :, 2].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    row = frames[2][16 * scale: 32 * scale: scale, ::scale]
    np.testing.assert_array_equal(row[:, :24], expected_real)
    np.testing.assert_array_equal(row[:, 24:], expected_recon)

    images = gif_images(tmp_path / "version_0", "val/samples_video")
    assert list(images) == [7]
    sample = images[7]
    assert len(frames_of(sample)) == 6 and sample.size == (3 * 24 * scale, 16 * scale)
    # The PNG grids still go to TensorBoard as images.
    assert list(gif_images(tmp_path / "version_0", "val/reconstructions")) == [7]


class RecordingLogger:
    """A logger with W&B's media methods, recording what it is given."""

    def __init__(self):
        self.videos, self.images = [], []

    def log_video(self, key, videos, step=None, **kwargs):
        self.videos.append((key, videos, step))

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, len(images), step))


def test_media_give_wandb_style_loggers_the_mp4(tmp_path):
    logger = RecordingLogger()
    trainer = SimpleNamespace(logger=logger, loggers=[logger], global_step=3, default_root_dir=str(tmp_path))
    paths = log_samples(trainer, coloured_clips(2, 4, 8, 8), ["x", "y"])
    assert logger.videos == [("val/samples_video", [str(paths["mp4"])], 3)]
    assert logger.images == [("val/samples", 1, 3)]


def test_loggers_sharing_a_directory_get_one_version_after_the_last(tmp_path):
    (tmp_path / "lightning_logs/version_0").mkdir(parents=True)
    (tmp_path / "lightning_logs/version_3").mkdir()
    (tmp_path / "lightning_logs/version_x").mkdir()
    entries = [Namespace(class_path=f"maskvid.launch.run_loggers.{c}", init_args=Namespace(save_dir=None))
               for c in ("RunTensorBoardLogger", "RunCSVLogger")]
    entries.append(Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                             init_args=Namespace(save_dir=str(tmp_path / "elsewhere"), name="x", version=None)))
    resolved = resolve_loggers(entries, str(tmp_path))
    assert [(e.init_args.save_dir, e.init_args.version) for e in resolved] == [
        (str(tmp_path), 4), (str(tmp_path), 4), (str(tmp_path / "elsewhere"), 0)]
    # `trainer.logger: true` means the default pair.
    pair = resolve_loggers(True, str(tmp_path))
    assert [e.class_path.rsplit(".", 1)[1] for e in pair] == ["RunTensorBoardLogger", "RunCSVLogger"]


def build_trainer(tmp_path: Path, *extra: str):
    """MaskvidCLI's trainer for the tiny tokenizer (nothing run)."""
    from unittest import mock

    from maskvid.launch.lightning_cli import MaskvidCLI

    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump(MODEL))
    args = ["--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run"),
            "--data.train_shards", "unused", *extra]
    with mock.patch("sys.argv", ["maskvid"]):  # LightningCLI warns when given args and pytest's argv
        cli = MaskvidCLI(args=args, run=False)
    return cli.trainer


def test_cli_default_and_config_overrides(tmp_path):
    loggers = build_trainer(tmp_path).loggers
    assert [type(x) for x in loggers] == [RunTensorBoardLogger, RunCSVLogger]
    assert {x.log_dir for x in loggers} == {str(tmp_path / "run/lightning_logs/version_0")}
    csv_only = build_trainer(tmp_path, "--config", str(REPO / "configs/logger/csv.yaml")).loggers
    assert [type(x) for x in csv_only] == [RunCSVLogger]
    tb_only = build_trainer(tmp_path, "--config", str(REPO / "configs/logger/tensorboard.yaml")).loggers
    assert [type(x) for x in tb_only] == [RunTensorBoardLogger]
    assert build_trainer(tmp_path, "--trainer.logger", "false").loggers == []
    assert [type(x) for x in build_trainer(tmp_path, "--trainer.logger", "true").loggers] == [
        RunTensorBoardLogger, RunCSVLogger]
    (explicit,) = build_trainer(tmp_path, "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir",
                                str(tmp_path / "mine")).loggers
    assert type(explicit) is CSVLogger and explicit.save_dir == str(tmp_path / "mine")


def test_wandb_config_adds_wandb_to_the_default_loggers(tmp_path):
    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump(MODEL))
    out = run_cli("fit", "--config", str(config), "--config", str(REPO / "configs/logger/wandb.yaml"),
                  "--print_config", timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    loggers = yaml.safe_load(out.stdout)["trainer"]["logger"]
    assert [x["class_path"] for x in loggers] == ["maskvid.launch.run_loggers.RunTensorBoardLogger",
                                                  "maskvid.launch.run_loggers.RunCSVLogger",
                                                  "lightning.pytorch.loggers.WandbLogger"]
    written = yaml.safe_load((REPO / "configs/logger/wandb.yaml").read_text())["trainer"]["logger+"]
    (entry,) = written
    assert set(entry["init_args"]) <= set(inspect.signature(WandbLogger.__init__).parameters)
    assert loggers[2]["init_args"]["project"] == entry["init_args"]["project"]


def test_wandb_config_builds_a_wandb_logger(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the `wandb` extra: built only where it is installed
    monkeypatch.setenv("WANDB_MODE", "offline")
    trainer = build_trainer(tmp_path, "--config", str(REPO / "configs/logger/wandb.yaml"))
    assert [type(x) for x in trainer.loggers] == [RunTensorBoardLogger, RunCSVLogger, WandbLogger]


@pytest.fixture(scope="module")
def default_run(synthetic32, tmp_path_factory) -> Path:  # noqa: F811 - the imported fixture
    """A 6-step tiny tokenizer fit with the default loggers (validation and media at 3 and 6)."""
    return six_step_fit(synthetic32, tmp_path_factory.mktemp("logging_run"))


@pytest.mark.slow
def test_default_fit_writes_tensorboard_csv_and_videos_in_one_version(default_run):
    (version,) = (default_run / "lightning_logs").iterdir()
    assert version.name == "version_0"
    assert (version / "metrics.csv").is_file() and list(version.glob("events.out.tfevents.*"))
    # config.yaml is the config as written: rerunning it starts a new version.
    logged = yaml.safe_load((version / "config.yaml").read_text())["trainer"]["logger"]
    assert [x["init_args"]["version"] for x in logged] == [None, None]
    videos = gif_images(version, "val/reconstructions_video")
    assert sorted(videos) == [3, 6]
    clips, frames, size = 2, 9, 32  # num_log_videos, --data.num_frames, --data.resolution
    scale = gif_scale(size)
    for gif in videos.values():
        assert len(frames_of(gif)) == frames and gif.size == (2 * size * scale, clips * size * scale)


@pytest.mark.slow
def test_curves_are_the_same_from_csv_and_tensorboard(default_run, tmp_path):
    from_csv = read_curves(default_run, source="csv")
    from_tb = read_curves(default_run, source="tensorboard")
    assert {"train/recon_loss", "val/psnr", "epoch"} <= set(from_csv)
    assert set(from_csv) == set(from_tb)
    for key, points in from_csv.items():
        # TensorBoard keeps float32 scalars.
        assert [(s, np.float32(v)) for s, v in points] == [(s, np.float32(v)) for s, v in from_tb[key]], key
    assert [s for s, _ in from_csv["val/psnr"]] == [2, 5]  # logged at the last step's index

    # Without the CSV the report's reader falls back to the event files and finds the same PSNR.
    tb_only = tmp_path / "run"
    shutil.copytree(default_run, tb_only)
    for path in tb_only.rglob("metrics.csv"):
        path.unlink()
    assert read_curves(tb_only) == from_tb and read_curves(default_run) == from_csv
    assert tokenizer_psnr(tb_only)["value"] == pytest.approx(tokenizer_psnr(default_run)["value"], abs=1e-3)
    rows = read_metrics(tb_only)
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows) and len(rows) == sum(map(len, from_tb.values()))


def test_wandb_config_without_wandb_is_one_clear_line(tmp_path):
    from importlib.util import find_spec

    from maskvid.launch.cli_errors import explain
    from maskvid.launch.run_loggers import LoggerConfigError

    if find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    with pytest.raises(LoggerConfigError) as raised:
        build_trainer(tmp_path, "--config", str(REPO / "configs/logger/wandb.yaml"))
    assert explain(raised.value) == ("trainer.logger: lightning.pytorch.loggers.WandbLogger needs the wandb package: "
                                     "pip install 'maskvid[wandb]' (or leave out configs/logger/wandb.yaml)")


def test_a_shortened_schedule_is_logged_to_every_logger():
    from maskvid.lightning_modules.time_budget import FitScheduleToTime

    class Metrics:
        def __init__(self):
            self.logged = []

        def log_metrics(self, metrics, step=None):
            self.logged.append((metrics, step))

    loggers = [Metrics(), Metrics()]  # TensorBoard and the CSV beside it
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(max_steps=100)),
                              lr_scheduler_configs=[], is_global_zero=True, loggers=loggers, global_step=12)
    FitScheduleToTime._apply(trainer, 40)
    assert [x.logged for x in loggers] == [[({"train/max_steps": 40.0}, 12)]] * 2
