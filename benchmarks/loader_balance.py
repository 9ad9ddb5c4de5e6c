"""Is the data loader ever the bottleneck? Clips/s the VideoDataModule supplies against clips/s the
tokenizer training step consumes, for configs/experiment/tokenizer_demo.yaml (its data section:
num_workers, batch size, resolution, clip length; its model: the tiny C-ViViT + discriminator).

Three figures, all from one run on the same synthetic shards (`maskvid data synthetic`; built in
a temporary folder unless --data points at a built dataset):
  - supply: the datamodule's train loader alone, batches drawn as fast as it gives them
    (after the first batch: worker start-up is a one-off per epoch);
  - consume: the training step alone (real Lightning steps on a fixed batch, no loader), for the
    demo's two phases: reconstruction only (before gan_start_step) and with the GAN on;
    clips/s = batch / mean step time;
  - coupled: real `fit` steps fed by the real loader, so workers and the step share the cores as
    in training; the time between one batch's end and the next one's start is the wait for data
    (plus Lightning's own per-batch work), reported as a fraction of the wall time.
supply_over_consume >= 1 for the faster (reconstruction) phase means the loader keeps up; the
coupled data_wait_fraction shows what is left when both run at once.

    python benchmarks/loader_balance.py
    python benchmarks/loader_balance.py --data data/synthetic --batches 60 --json-out benchmarks/results/loader.json
    python benchmarks/loader_balance.py --quick
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import yaml  # noqa: E402

from common import emit, fit_steps  # noqa: E402

EXPERIMENT = REPO / "configs/experiment/tokenizer_demo.yaml"


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_experiment(path: Path) -> dict:
    """The experiment config with its `include:` files layered in, as `maskvid fit --config` reads it."""
    from maskvid.launch.config_includes import expand_config_includes

    parts = expand_config_includes(["--config", str(path)])[1::2]
    config: dict = {}
    for part in parts:
        doc = yaml.safe_load(Path(part).read_text()) if Path(part).is_file() else yaml.safe_load(part)
        config = _merge(config, doc or {})
    return config


def build_module(model_cfg: dict, gan: bool):
    from maskvid.lightning_modules.tokenizer_module import TokenizerModule
    from maskvid.models.config import instantiate

    init = copy.deepcopy(model_cfg["init_args"])
    tokenizer = instantiate(init.pop("tokenizer"))
    disc_cfg = init.pop("discriminator", None)
    disc = instantiate(disc_cfg) if (gan and disc_cfg) else None
    init.update(gan_start_step=0, num_log_videos=0)
    return TokenizerModule(tokenizer, disc, **init)


def make_datamodule(data_cfg: dict, train_shards: str):
    from maskvid.datamodules.video_datamodule import VideoDataModule

    cfg = {k: v for k, v in data_cfg.items() if k not in ("train_shards", "val_shards", "test_shards")}
    return VideoDataModule(train_shards=train_shards, **cfg)


def supply_rate(data_cfg: dict, shards: str, batches: int) -> float:
    loader = make_datamodule(data_cfg, shards).train_dataloader()
    it = iter(loader)
    next(it)  # worker start-up
    start = time.perf_counter()
    clips = 0
    for _ in range(batches):
        clips += len(next(it)["video"])
    rate = clips / (time.perf_counter() - start)
    del it
    return rate


def consume_rate(model_cfg: dict, data_cfg: dict, gan: bool, steps: int) -> dict:
    torch.manual_seed(0)
    module = build_module(model_cfg, gan)
    b, f, s = data_cfg["batch_size"], data_cfg["num_frames"], data_cfg["resolution"]
    batch = {"video": torch.rand(b, 3, f, s, s) * 2 - 1, "frame_mask": torch.ones(b, f, dtype=torch.bool),
             "caption": [""] * b}
    timer = fit_steps(module, batch, steps + 2, roof_n=256)
    step_s = timer.mean()
    return {"step_s": round(step_s, 4), "clips_per_s": round(b / step_s, 3), "timed_steps": len(timer.times) - 1}


def coupled(model_cfg: dict, data_cfg: dict, shards: str, steps: int, gan: bool) -> dict:
    """Real fit steps on the real loader; the gap between batches is the data wait."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import Callback

    torch.manual_seed(0)
    module = build_module(model_cfg, gan)
    dm = make_datamodule(data_cfg, shards)
    marks: dict = {"waits": [], "steps": [], "end": None}

    class Gaps(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = time.perf_counter()
            if marks["end"] is not None:
                marks["waits"].append(now - marks["end"])
            marks["start"] = now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            marks["end"] = time.perf_counter()
            marks["steps"].append(marks["end"] - marks["start"])

    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps + 2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[Gaps()])
    trainer.fit(module, datamodule=dm)
    waits, step_times = marks["waits"][2:] or marks["waits"], marks["steps"][3:] or marks["steps"]
    wall = sum(waits) + sum(step_times)
    b = data_cfg["batch_size"]
    return {"batches": len(step_times), "step_s": round(statistics.fmean(step_times), 4),
            "data_wait_s_mean": round(statistics.fmean(waits), 4), "data_wait_s_max": round(max(waits), 4),
            "data_wait_fraction": round(sum(waits) / wall, 4),
            "clips_per_s": round(b * len(step_times) / wall, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=EXPERIMENT, help="experiment YAML (default: the tokenizer demo)")
    parser.add_argument("--data", type=Path, default=None, help="built synthetic dataset root (default: build a temporary one)")
    parser.add_argument("--num-train", type=int, default=None, help="clips in the temporary dataset (default 128; quick 16)")
    parser.add_argument("--batches", type=int, default=None, help="loader batches timed for supply (default 40; quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per phase (default 10; quick 2)")
    parser.add_argument("--skip-coupled", action="store_true", help="leave out the loader+step run")
    parser.add_argument("--quick", action="store_true", help="few clips and steps: a smoke test")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.num_train = args.num_train or (16 if args.quick else 128)
    args.batches = args.batches or (4 if args.quick else 40)
    args.steps = args.steps or (2 if args.quick else 10)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    config = load_experiment(args.config)
    data_cfg, model_cfg = config["data"], config["model"]
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            from maskvid.datamodules.synthetic import build_synthetic

            root = Path(tmp) / "synthetic"
            build_synthetic(root, num_train=args.num_train, num_val=0, num_heldout=0, workers=1, progress=False,
                            samples_per_shard=max(1, args.num_train // 8))
        else:
            root = args.data
        shards = str(root / "train")
        supply = supply_rate(data_cfg, shards, args.batches)
        consume = {"recon": consume_rate(model_cfg, data_cfg, False, args.steps),
                   "gan": consume_rate(model_cfg, data_cfg, True, args.steps)}
        both = None if args.skip_coupled else coupled(model_cfg, data_cfg, shards, args.steps, gan=False)
    fastest = max(c["clips_per_s"] for c in consume.values())
    result = {
        "benchmark": "loader_balance", "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
        "quick": args.quick,
        "data": {k: data_cfg[k] for k in ("batch_size", "num_workers", "num_frames", "resolution") if k in data_cfg},
        "threads": torch.get_num_threads(),
        "supply_clips_per_s": round(supply, 3),
        "consume": consume,
        "supply_over_consume": {phase: round(supply / c["clips_per_s"], 3) for phase, c in consume.items()},
        "supply_over_fastest_consume": round(supply / fastest, 3),
        "loader_keeps_up": supply >= fastest,
    }
    if both is not None:
        result["coupled_recon"] = both
    result["target"] = "supply_over_fastest_consume >= 1 (the loader is never the bottleneck)"
    emit(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
