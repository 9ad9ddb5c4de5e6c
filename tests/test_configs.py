"""Every YAML under configs/ parses and instantiates through the real CLI (GPU recipes at a tiny
width on a CPU), and the layering rules the recipes rely on hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from maskvid.launch.config_includes import merged_config
from maskvid.launch.lightning_cli import MaskvidCLI
from tests.stage2_fixtures import tiny_t5_dir, write_tokenizer_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
STAGE2 = "maskvid.lightning_modules.masked_video_module.MaskedVideoModule"
TOKENIZER = "maskvid.lightning_modules.tokenizer_module.TokenizerModule"
EXPERIMENTS = sorted((REPO / "configs/experiment").glob("*.yaml"))
# Paper-scale GPU recipes: the *_base ones and MeBT's unconditional ones (mebt_uncond_*).
LARGE_MARKS = ("_base", "_uncond")
BASE_RECIPES = [p for p in EXPERIMENTS if any(mark in p.stem for mark in LARGE_MARKS)]
TRAINER_FILES = sorted((REPO / "configs/trainer").glob("*.yaml"))
# Paper-scale widths would take minutes and gigabytes to build on a CPU: the GPU configs are
# instantiated at these (their structure, classes and every other option unchanged).
TINY_BACKBONE = {"dim": 32, "depth": 1, "heads": 2, "text_dim": 32}
TINY_MEBT = {"decoder_depth": 1, "num_latents": 8}
TINY_CVIVIT = {"dim": 32, "spatial_depth": 1, "temporal_depth": 1, "heads": 2}
TINY_DISCRIMINATOR = {"base_channels": 8, "max_channels": 16}


merged = merged_config


def is_large(path: Path) -> bool:
    """A paper-scale (GPU) config: instantiated at a tiny width here."""
    return any(mark in path.stem for mark in LARGE_MARKS)


def tiny_overrides(model: dict) -> list[str]:
    """--model options shrinking a paper-scale network to a few thousand parameters."""
    init = model["init_args"]
    if model["class_path"] == STAGE2:
        sizes = dict(TINY_BACKBONE, **(TINY_MEBT if init["backbone"]["class_path"] == "maskvid.models.mebt.MeBT" else {}))
        if init["backbone"]["init_args"].get("text_dim", 0) is None:  # unconditional: it stays without text
            del sizes["text_dim"]
        return [a for k, v in sizes.items() for a in (f"--model.init_args.backbone.init_args.{k}", str(v))]
    assert model["class_path"] == TOKENIZER, model["class_path"]
    args = [a for k, v in TINY_CVIVIT.items() for a in (f"--model.init_args.tokenizer.init_args.{k}", str(v))]
    return args + [a for k, v in TINY_DISCRIMINATOR.items() for a in (f"--model.init_args.discriminator.init_args.{k}", str(v))]


def stage2_overrides(model: dict, tmp_path: Path, text_dim: int | None = None) -> list[str]:
    """A stage-1 checkpoint matching the config's vocabulary (from the cvivit config with that many
    codes), and a tiny local T5 in place of a hub T5 that cannot be downloaded here."""
    from maskvid.models.config import instantiate

    init = model["init_args"]
    vocab = init["backbone"]["init_args"]["vocab_size"]
    for cfg in sorted((REPO / "configs/model").glob("cvivit_*.yaml")) + sorted(
            (REPO / "configs/experiment").glob("tokenizer_*.yaml")):
        # Built, not read: an FSQ quantizer's vocabulary is the product of its levels.
        tokenizer = instantiate(merged(cfg)["model"]["init_args"]["tokenizer"])
        if tokenizer.vocab_size == vocab:
            break
    else:
        raise AssertionError(f"no tokenizer config with {vocab} codes for {init['backbone']}")
    ckpt = write_tokenizer_checkpoint(tmp_path / "tok.ckpt", tokenizer)
    args = ["--model.init_args.tokenizer_path", str(ckpt)]
    if init.get("text_encoder", "packaged:minilm") is not None and not str(
            init.get("text_encoder", "packaged:minilm")).startswith("packaged:"):
        text_dim = text_dim or init["backbone"]["init_args"]["text_dim"]
        args += ["--model.init_args.text_encoder", str(tiny_t5_dir(tmp_path / "t5", d_model=text_dim))]
    return args


def test_there_are_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths (runs/, data/) land in a scratch dir
    monkeypatch.setattr("sys.argv", ["maskvid"])  # LightningCLI reads sys.argv too; keep pytest's out
    if path.relative_to(REPO / "configs").as_posix() == "logger/wandb.yaml":
        pytest.importorskip("wandb")  # the wandb extra; tests/test_logging.py checks the file without it
    doc = merged(path)
    assert isinstance(doc, dict) and doc, f"{path} is empty"
    args = ["--config", str(path)]
    if "model" not in doc:
        args += ["--model", "tests.tiny_model.TinyVideoModel"]
    else:
        if is_large(path):
            args += tiny_overrides(doc["model"])
        if doc["model"].get("class_path") == STAGE2:
            args += stage2_overrides(doc["model"], tmp_path, TINY_BACKBONE["text_dim"] if is_large(path) else None)
    if "data" not in doc:
        args += ["--data.train_shards", "unused"]
    if (doc.get("trainer") or {}).get("accelerator") == "gpu" and not torch.cuda.is_available():
        args += ["--trainer.accelerator", "cpu"]  # everything else as configured
    cli = MaskvidCLI(args=args, run=False)
    for callback in cli.trainer.callbacks:  # MatmulPrecision sets process-wide state when built
        callback.teardown(cli.trainer, cli.model, "fit")
    assert cli.trainer is not None and cli.model is not None and cli.datamodule is not None
    for key, value in (doc.get("data") or {}).items():
        assert cli.datamodule.hparams[key] == value, key
    for key, value in (doc.get("trainer") or {}).items():
        if key == "max_steps":
            assert cli.trainer.max_steps == value
    if "model" in doc and "class_path" in doc["model"]:
        assert type(cli.model).__module__ + "." + type(cli.model).__name__ == doc["model"]["class_path"]


def trainer_of(*paths: Path, tmp_path: Path) -> "object":
    """The Trainer the CLI builds from these configs, over the tiny test model, on a CPU."""
    args = [a for p in paths for a in ("--config", str(p))]
    cli = MaskvidCLI(args=[*args, "--model", "tests.tiny_model.TinyVideoModel", "--data.train_shards", "unused",
                           "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)], run=False)
    for callback in cli.trainer.callbacks:
        callback.teardown(cli.trainer, cli.model, "fit")
    return cli.trainer


def test_experiments_leave_the_hardware_to_a_trainer_file():
    """The trainer file is chosen on the command line (or by `maskvid demo`), so no experiment
    includes one, and the trainer files set nothing an experiment sets (layered after it, they
    would silently override its steps, validation or output directory)."""
    experiment_keys: set[str] = set()
    for path in EXPERIMENTS:
        doc = yaml.safe_load(path.read_text())
        includes = doc.get("include") or []
        assert not any("trainer/" in i for i in includes), (path.name, includes)
        experiment_keys |= set((doc.get("trainer") or {}))
    hardware = {"accelerator", "devices", "precision", "strategy", "num_nodes", "num_sanity_val_steps", "callbacks+"}
    for path in TRAINER_FILES:
        keys = set(yaml.safe_load(path.read_text())["trainer"])
        assert keys <= hardware, (path.name, keys - hardware)
        assert keys & experiment_keys <= {"accelerator", "precision", "num_sanity_val_steps"}, path.name


@pytest.mark.parametrize("trainer_file", TRAINER_FILES, ids=lambda p: p.name)
def test_a_trainer_file_layered_after_an_experiment_keeps_its_callbacks(trainer_file, tmp_path, monkeypatch):
    """A `callbacks:` list in a later config replaces the earlier one (jsonargparse); trainer files
    append with `callbacks+:` so the experiment's checkpointing and time budget survive."""
    from maskvid.launch.last_checkpoint import LastCheckpoint
    from maskvid.lightning_modules.time_budget import FitScheduleToTime

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["maskvid"])
    assert "\n  callbacks:" not in trainer_file.read_text(), f"{trainer_file.name}: use `callbacks+:`"
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump({"trainer": {"max_steps": 7, "callbacks": [
        {"class_path": "maskvid.lightning_modules.time_budget.FitScheduleToTime"},
        {"class_path": "maskvid.launch.last_checkpoint.LastCheckpoint", "init_args": {"dirpath": str(tmp_path / "ck")}}]}}))
    trainer = trainer_of(experiment, trainer_file, tmp_path=tmp_path)
    kinds = [type(c) for c in trainer.callbacks]
    assert FitScheduleToTime in kinds and LastCheckpoint in kinds and trainer.max_steps == 7
    added = (yaml.safe_load(trainer_file.read_text())["trainer"].get("callbacks+")) or []
    names = {type(c).__module__ + "." + type(c).__name__ for c in trainer.callbacks}
    assert {c["class_path"] for c in added} <= names


def test_gpu_trainer_is_one_gpu_in_bf16_with_tf32(tmp_path, monkeypatch):
    from maskvid.launch.matmul_precision import MatmulPrecision

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["maskvid"])
    doc = yaml.safe_load((REPO / "configs/trainer/gpu.yaml").read_text())["trainer"]
    assert (doc["accelerator"], doc["devices"], doc["precision"]) == ("gpu", 1, "bf16-mixed")
    trainer = trainer_of(REPO / "configs/trainer/gpu.yaml", tmp_path=tmp_path)
    (tf32,) = [c for c in trainer.callbacks if isinstance(c, MatmulPrecision)]
    assert tf32.precision == "high"
    assert trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("path", BASE_RECIPES, ids=lambda p: p.name)
def test_base_recipes_are_gpu_references_with_their_launch_lines(path):
    """bf16, TF32, torch.compile, and a header that says how to launch on 8 GPUs and on SLURM."""
    doc = merged(path)
    trainer = doc["trainer"]
    assert trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-mixed"
    assert doc["model"]["init_args"]["compile"] is True
    assert any(c["class_path"] == "maskvid.launch.matmul_precision.MatmulPrecision" and c["init_args"]["precision"] == "high"
               for c in trainer["callbacks"])
    checkpoints = [c for c in trainer["callbacks"] if c["class_path"] == "maskvid.launch.last_checkpoint.LastCheckpoint"]
    assert checkpoints and checkpoints[0]["init_args"]["dirpath"].startswith(trainer["default_root_dir"])
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    rel = path.relative_to(REPO).as_posix()
    fit = [line for line in header.splitlines() if f"maskvid fit --config {rel}" in line]
    assert fit and "--trainer.devices 8" in fit[0], header
    strategy = fit[0].split("--config configs/trainer/")[1].split(".yaml")[0]
    assert (REPO / f"configs/trainer/{strategy}.yaml").is_file()
    sbatch = [line for line in header.splitlines() if "sbatch --nodes=" in line]
    assert sbatch and f"CONFIG={rel}" in sbatch[0], header
    script = sbatch[0].split()[-1]
    assert (REPO / script).is_file(), script
    # The stage-1 GAN cannot run under DeepSpeed; stage 1 launches through stage1.sbatch.
    assert ("stage1" in script) == (doc["model"]["class_path"] == TOKENIZER)


def test_base_recipes_follow_the_papers():
    """The figures the headers name: Phenaki's C-ViViT (128x128, 8x8 patches, 2-frame tubelets,
    8192 codes) and its T5-conditioned stage 2; MeBT's official grid, width and latents at 16 and
    128 frames."""
    tok = merged(REPO / "configs/experiment/tokenizer_base.yaml")
    cvivit = tok["model"]["init_args"]["tokenizer"]["init_args"]
    assert (cvivit["image_size"], cvivit["patch_size"], cvivit["temporal_patch_size"]) == (128, 8, 2)
    assert cvivit["quantizer"]["init_args"]["codebook_size"] == 8192 and tok["data"]["resolution"] >= 128
    maskgit = merged(REPO / "configs/experiment/maskgit_base.yaml")["model"]["init_args"]
    assert maskgit["text_encoder"].startswith("google/t5-v1_1") and maskgit["backbone"]["init_args"]["text_dim"] == 4096
    assert maskgit["backbone"]["init_args"]["depth"] == 24 and maskgit["backbone"]["init_args"]["dim"] >= 1536
    mebt_tok = merged(REPO / "configs/experiment/tokenizer_mebt_base.yaml")
    assert mebt_tok["model"]["init_args"]["tokenizer"]["init_args"]["temporal_patch_size"] == 4
    for name, frames, t in (("mebt_base", 17, 5), ("mebt_base_128f", 129, 33)):
        doc = merged(REPO / f"configs/experiment/{name}.yaml")
        mebt = doc["model"]["init_args"]["backbone"]["init_args"]
        assert doc["data"]["num_frames"] == frames and mebt["grid"] == [t, 16, 16], name
        assert (mebt["dim"], mebt["heads"], mebt["num_latents"]) == (1024, 16, 256)
        assert doc["model"]["init_args"]["text_encoder"] == maskgit["text_encoder"]
        assert doc["model"]["init_args"]["tokenizer_path"].startswith("runs/tokenizer_mebt_base/")


def test_unconditional_mebt_recipes_follow_the_official_configs():
    """Ugness/MeBT's mebt_16f.yaml / mebt_128f.yaml: unconditional, 16384 codes, n_embd 1024, 16
    heads, 24 layers (7 + 6 here), 256 latents, grids 4x16x16 / 32x16x16, exact_lr 3e-5, weight
    decay 1e-4, batch 32 / 6, linear schedule; the 128f t_prior's window grows a latent frame per
    100k steps at width 2. The C-ViViT frame counts give those grids."""
    from maskvid.models.config import instantiate

    tok = merged(REPO / "configs/experiment/tokenizer_mebt_uncond.yaml")["model"]["init_args"]["tokenizer"]
    assert tok["init_args"]["quantizer"]["init_args"]["codebook_size"] == 16384
    assert (tok["init_args"]["temporal_patch_size"], tok["init_args"]["patch_size"]) == (4, 8)
    tokenizer = instantiate(dict(tok, init_args=dict(tok["init_args"], **TINY_CVIVIT)))
    for name, grid, batch in (("mebt_uncond_16f", [4, 16, 16], 32), ("mebt_uncond_128f", [32, 16, 16], 6)):
        doc = merged(REPO / f"configs/experiment/{name}.yaml")
        init = doc["model"]["init_args"]
        mebt = init["backbone"]["init_args"]
        assert init["text_encoder"] is None and mebt["text_dim"] is None, name
        assert (mebt["vocab_size"], mebt["dim"], mebt["heads"], mebt["num_latents"]) == (16384, 1024, 16, 256)
        # 7 latent<-context (+ self-attention) layers, 6 query<-latent (+ 5 latent<-[latent, query]).
        assert (mebt["depth"], mebt["decoder_depth"]) == (7, 6) and mebt["grid"] == grid
        assert list(tokenizer.token_grid(doc["data"]["num_frames"], 128)) == grid, name
        assert (init["lr"], init["weight_decay"], init["warmup_steps"], init["min_lr_ratio"]) == (3e-5, 1e-4, 0, 1.0)
        assert init["mask_schedule"] == "linear" and doc["data"]["batch_size"] == batch
        assert init["tokenizer_path"].startswith("runs/tokenizer_mebt_uncond/")
    long = merged(REPO / "configs/experiment/mebt_uncond_128f.yaml")["model"]["init_args"]
    assert long["curriculum_window"] == "random" and long["curriculum_spread"] == 2.0
    assert long["length_curriculum"] == [[k * 100000, k + 1] for k in range(32)]
    assert "length_curriculum" not in merged(REPO / "configs/experiment/mebt_uncond_16f.yaml")["model"]["init_args"]
