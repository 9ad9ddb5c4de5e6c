"""Every YAML under configs/ parses and instantiates through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launch.config_includes import expand_config_includes
from launch.lightning_cli import MaskvidCLI
from tests.stage2_fixtures import tiny_t5_dir, write_tokenizer_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
STAGE2 = "lightning_modules.masked_video_module.MaskedVideoModule"


def merged(path: Path) -> dict:
    """The config as the CLI sees it: includes first, later files override (dicts merge)."""
    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for key, value in b.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    doc: dict = {}
    parts = expand_config_includes(["--config", str(path)])[1::2]
    for part in parts:
        loaded = yaml.safe_load(Path(part).read_text() if Path(part).is_file() else part)
        doc = merge(doc, loaded or {})
    return doc


def stage2_overrides(model: dict, tmp_path: Path) -> list[str]:
    """A stage-1 checkpoint matching the config's vocabulary (from the cvivit config with that many
    codes), and a tiny local T5 in place of a hub T5 that cannot be downloaded here."""
    from models.config import instantiate

    init = model["init_args"]
    vocab = init["backbone"]["init_args"]["vocab_size"]
    for cfg in sorted((REPO / "configs/model").glob("cvivit_*.yaml")):
        # Built, not read: an FSQ quantizer's vocabulary is the product of its levels.
        tokenizer = instantiate(yaml.safe_load(cfg.read_text())["model"]["init_args"]["tokenizer"])
        if tokenizer.vocab_size == vocab:
            break
    else:
        raise AssertionError(f"no tokenizer config with {vocab} codes for {init['backbone']}")
    ckpt = write_tokenizer_checkpoint(tmp_path / "tok.ckpt", tokenizer)
    args = ["--model.init_args.tokenizer_path", str(ckpt)]
    if not str(init.get("text_encoder", "packaged:minilm")).startswith("packaged:"):
        text_dim = init["backbone"]["init_args"]["text_dim"]
        args += ["--model.init_args.text_encoder", str(tiny_t5_dir(tmp_path / "t5", d_model=text_dim))]
    return args


def test_there_are_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths (runs/, data/) land in a scratch dir
    monkeypatch.setattr("sys.argv", ["maskvid"])  # LightningCLI reads sys.argv too; keep pytest's out
    doc = merged(path)
    assert isinstance(doc, dict) and doc, f"{path} is empty"
    args = ["--config", str(path)]
    if "model" not in doc:
        args += ["--model", "tests.tiny_model.TinyVideoModel"]
    elif doc["model"].get("class_path") == STAGE2:
        args += stage2_overrides(doc["model"], tmp_path)
    if "data" not in doc:
        args += ["--data.train_shards", "unused"]
    cli = MaskvidCLI(args=args, run=False)
    assert cli.trainer is not None and cli.model is not None and cli.datamodule is not None
    for key, value in (doc.get("data") or {}).items():
        assert cli.datamodule.hparams[key] == value, key
    for key, value in (doc.get("trainer") or {}).items():
        if key == "max_steps":
            assert cli.trainer.max_steps == value
    if "model" in doc and "class_path" in doc["model"]:
        assert type(cli.model).__module__ + "." + type(cli.model).__name__ == doc["model"]["class_path"]
