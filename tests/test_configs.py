"""Every YAML under configs/ parses and instantiates through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launch.lightning_cli import MaskvidCLI

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths (runs/, data/) land in a scratch dir
    monkeypatch.setattr("sys.argv", ["maskvid"])  # LightningCLI reads sys.argv too; keep pytest's out
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict) and doc, f"{path} is empty"
    args = ["--config", str(path)]
    if "model" not in doc:
        args += ["--model", "tests.tiny_model.TinyVideoModel"]
    if "data" not in doc:
        args += ["--data.train_shards", "unused"]
    cli = MaskvidCLI(args=args, run=False)
    assert cli.trainer is not None and cli.model is not None and cli.datamodule is not None
    for key, value in (doc.get("data") or {}).items():
        assert cli.datamodule.hparams[key] == value, key
    for key, value in (doc.get("trainer") or {}).items():
        if key == "max_steps":
            assert cli.trainer.max_steps == value
