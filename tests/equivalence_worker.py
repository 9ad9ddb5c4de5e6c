"""Training runs for tests/test_equivalence.py and tests/test_resharding.py: one process, or every
rank of a `torchrun` launch, runs a list of small fp32 fits (a JSON plan) one after the other, each
under one strategy, and writes what the tests compare:

- per rank and step, the rank's own loss (rank 1's rows prove it trains);
- per rank, how much of every parameter and of the optimizer state it holds (sharding is real);
- on rank 0, full (gathered) parameters, buffers and AdamW moments: at chosen steps, at the end,
  and right after a checkpoint was restored.

Every run sees the same global batch at a step, whatever the world size: rank r of W takes
samples [s*B + r*B/W, s*B + (r+1)*B/W) of a fixed bank (built from the step, so a resumed run
sees what the uninterrupted one saw). Stage 2's masks are drawn per sample from (seed, sample,
step), with the same number of masked tokens in every clip, so that a rank's token-mean loss
averaged over ranks is the token mean over the global batch (see MaskedVideo below).

    torchrun --nproc_per_node 2 -m tests.equivalence_worker PLAN.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from maskvid.lightning_modules.masked_video_module import MaskedVideoModule
from maskvid.lightning_modules.step_seed import step_seed
from maskvid.lightning_modules.tokenizer_module import TokenizerModule
from maskvid.models.sampling import mask_ratio

GLOBAL_BATCH = 4
NUM_SAMPLES = 16
MOMENTS = ("exp_avg", "exp_avg_sq")
HYPERPARAMETERS = ("lr", "weight_decay", "betas", "eps")


def _bank() -> tuple[torch.Tensor, list[str]]:
    generator = torch.Generator().manual_seed(1234)
    videos = torch.rand(NUM_SAMPLES, 3, 9, 32, 32, generator=generator) * 2 - 1
    return videos, [f"clip {i} of a {('red', 'blue', 'green')[i % 3]} ball" for i in range(NUM_SAMPLES)]


VIDEOS, CAPTIONS = _bank()


def global_batch_ids(step: int, rank: int, world: int) -> list[int]:
    per = GLOBAL_BATCH // world
    return [(step * GLOBAL_BATCH + rank * per + j) % NUM_SAMPLES for j in range(per)]


class _StepBatch:
    """Replaces the loader's placeholder by this rank's part of the step's global batch."""

    def step_batch(self) -> tuple[list[int], dict]:
        ids = global_batch_ids(self.global_step, self.trainer.global_rank, self.trainer.world_size)
        return ids, {"video": VIDEOS[ids].to(self.device), "caption": [CAPTIONS[i] for i in ids]}


class MaskedVideo(_StepBatch, MaskedVideoModule):
    """Stage 2 with masks that depend on the sample, not on the rank.

    The library seeds a step's masks by (seed, rank, step) and lets every clip draw its own masking
    ratio, so 2 processes x B/2 clips would mask differently from 1 x B, and, with different counts
    of masked tokens per rank, the mean of the ranks' token-mean losses is not the global token
    mean. Here the ratio is drawn once per step and the positions per (sample, step)."""

    def training_step(self, batch, batch_idx):
        self._sample_ids, batch = self.step_batch()
        return super().training_step(batch, batch_idx)

    def random_mask(self, valid: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        seed = self.hparams.mask_seed
        # The step's ratio from a stream no sample index reaches (2**20), the positions per sample.
        shared = torch.Generator().manual_seed(step_seed(seed, 2**20, self.global_step))
        ratio = mask_ratio(torch.rand(1, generator=shared))
        rows = []
        for sample, row in zip(self._sample_ids, valid.cpu()):
            g = torch.Generator().manual_seed(step_seed(seed, sample, self.global_step))
            count = int(torch.ceil(ratio * row.sum()).clamp(min=1))
            scores = torch.rand(row.shape[0], generator=g).masked_fill(~row, 2.0)
            rows.append((scores.argsort().argsort() < count) & row)
        return torch.stack(rows).to(valid.device)


class Tokenizer(_StepBatch, TokenizerModule):
    """Stage 1 (the GAN tokenizer) on the step's global batch."""

    def training_step(self, batch, batch_idx):
        _, batch = self.step_batch()
        return super().training_step({"video": batch["video"]}, batch_idx)


def build_module(job: dict):
    from maskvid.models.config import instantiate

    torch.manual_seed(0)
    if job["stage"] == 2:
        return MaskedVideo(backbone=instantiate(job["backbone"]), tokenizer_path=job["tokenizer_path"],
                           text_encoder=job["text_encoder"], text_max_length=8, warmup_steps=1, text_drop_prob=0.0,
                           num_val_videos=0, lr=1e-3)
    from maskvid.models.cvivit import CViViT
    from maskvid.models.discriminator import VideoDiscriminator
    from maskvid.models.quantizer import VectorQuantizer

    # restart_every=0: a dead-code restart draws codes from rank 0's encodings, which is not a
    # function of the global batch. The adaptive GAN weight is each rank's own norm ratio (also
    # not one), so its cap is set where it always binds (the test checks that it did), and
    # gan_weight scales the adversarial term back up to a weight that shows in the updates.
    tokenizer = CViViT(image_size=32, patch_size=8, dim=32, spatial_depth=1, temporal_depth=1, heads=2,
                       quantizer=VectorQuantizer(64, 8, restart_every=0))
    return Tokenizer(tokenizer, VideoDiscriminator(base_channels=8, max_channels=16), lr=1e-3, warmup_steps=2,
                     gan_start_step=1, gp_every=2, gan_weight=100.0, adaptive_weight_max=job["adaptive_weight_max"],
                     num_log_videos=0)


def build_strategy(name: str):
    from maskvid.launch import strategies

    if name == "single":
        return strategies.MaskvidSingleDeviceStrategy()
    if name == "ddp":
        return strategies.MaskvidDDPStrategy()
    if name == "fsdp":
        return strategies.FSDP2Strategy(param_dtype="fp32")
    if name in ("zero2", "zero3"):
        strategy = strategies.DeepSpeedZeroStrategy(stage=int(name[-1]))
        # ZeRO-3 keeps parameters below this size gathered between steps. Scaled to these tiny
        # nets (every parameter would be below the default), so that, as in a real model, the
        # matrices are partitioned away and only norms, biases and small tables stay whole.
        strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 1000
        return strategy
    raise ValueError(name)


# -- gathering -------------------------------------------------------------------------------------


def _is_deepspeed(trainer) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(trainer.strategy, DeepSpeedStrategy)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (collective for sharded ones), as a CPU copy: what a forward
    computes with."""
    if hasattr(t, "full_tensor"):  # FSDP2 DTensor
        return t.full_tensor().detach().cpu().clone()
    if hasattr(t, "ds_id"):
        if t.data.numel() == t.ds_numel:  # a whole copy ZeRO-3 keeps gathered (small, "persistent")
            return t.data.detach().cpu().clone()
        return partitions_tensor(t)  # what the next forward gathers
    return t.detach().cpu().clone()


def partitions_tensor(t: torch.Tensor) -> torch.Tensor:
    """A ZeRO-3 parameter from every rank's partition (what its optimizer, an EMA update and
    checkpoints hold and write), as a CPU copy. Collective. Read directly, not through
    GatheredParameters, which would re-partition (free) a parameter ZeRO-3 keeps gathered."""
    import torch.distributed as dist

    parts = [torch.empty_like(t.ds_tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.ds_tensor.detach())
    return torch.cat(parts)[: t.ds_numel].view(t.ds_shape).cpu().clone()


def _link_zero2_moments(optimizer) -> None:
    """Point ZeRO-2's per-parameter views at the moments of every param group. DeepSpeed links
    them once, at the end of the first group's first step, when later groups have no state yet
    (so their parameters' moments cannot be read), and not at all after a restore."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    flat = getattr(optimizer, "single_partition_of_fp32_groups", None)
    if flat is None:  # ZeRO-3 reads its moments directly
        return
    for i, partition in enumerate(flat):
        if partition in optimizer.optimizer.state:
            lazy_init_hp_params_optimizer_state(optimizer.bit16_groups[i], partition, optimizer.optimizer.state)


def gather_state(trainer, module) -> dict:
    """Full parameters, buffers, AdamW moments and learning rates. Every rank must call it."""
    params = {name: full_tensor(p) for name, p in module.named_parameters()}
    buffers = {name: b.detach().cpu().clone() for name, b in module.named_buffers()}
    moments: dict[str, dict[str, torch.Tensor]] = {}
    masters: dict[str, torch.Tensor] = {}
    if _is_deepspeed(trainer):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        optimizer = trainer.optimizers[0]
        for name, p in module.named_parameters():
            if p.requires_grad:  # DeepSpeed's own fp32 copy, which its optimizer steps
                masters[name] = safe_get_full_fp32_param(p).detach().cpu().clone()
        if optimizer.optimizer.state:  # nothing before the first step or a restore
            _link_zero2_moments(optimizer)
            for name, p in module.named_parameters():
                if p.requires_grad:
                    moments[name] = {k: safe_get_full_optimizer_state(p, k).detach().cpu().clone() for k in MOMENTS}
            # AdamW's step count (its bias correction) lives with each flat partition.
            steps = {float(state["step"]) for state in optimizer.optimizer.state.values() if "step" in state}
            step = torch.tensor(steps.pop() if len(steps) == 1 else float("nan"))  # nan: partitions disagree
            for entry in moments.values():
                entry["step"] = step
    else:
        names = {id(p): name for name, p in module.named_parameters()}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    state = optimizer.state[p]
                    if state:  # nothing before the first step
                        moments[names[id(p)]] = {k: full_tensor(state[k]) for k in (*MOMENTS, "step")}
    lrs = [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers]
    groups = [[{k: g[k] for k in HYPERPARAMETERS} for g in opt.param_groups] for opt in trainer.optimizers]
    # ZeRO-3 parameters whose whole copy is present now (small "persistent" ones stay gathered
    # between steps): what a forward, an EMA validation pass, computes with; and every ZeRO-3
    # parameter's partitions, which those copies must equal.
    available = {name: p.data.detach().cpu().clone() for name, p in module.named_parameters()
                 if hasattr(p, "ds_id") and p.data.numel() == p.ds_numel}
    partitions = {name: partitions_tensor(p) for name, p in module.named_parameters() if hasattr(p, "ds_id")}
    return {"params": params, "buffers": buffers, "moments": moments, "masters": masters, "lrs": lrs,
            "groups": groups, "available": available, "partitions": partitions, "global_step": trainer.global_step}


def holdings(trainer, module) -> dict:
    """How many elements of each parameter, and of the optimizer state, this rank holds."""
    params = {}
    for name, p in module.named_parameters():
        if hasattr(p, "to_local"):
            params[name] = {"local": p.to_local().numel(), "full": p.numel(), "dim0": p.shape[0] if p.ndim else 1}
        elif hasattr(p, "ds_id"):
            params[name] = {"local": p.ds_tensor.numel(), "full": p.ds_numel, "visible": p.data.numel(),
                            "persistent": bool(getattr(p, "ds_persist", False)),
                            "dim0": p.ds_shape[0] if len(p.ds_shape) else 1}
        else:
            params[name] = {"local": p.numel(), "full": p.numel(), "dim0": p.shape[0] if p.ndim else 1}
    optimizer = trainer.optimizers[0]
    if _is_deepspeed(trainer):
        flat = getattr(optimizer, "single_partition_of_fp32_groups", None)  # ZeRO-2
        if flat is None:
            flat = optimizer.fp32_partitioned_groups_flat  # ZeRO-3
        local_state = sum(t.numel() for t in flat)
    else:
        local_state = sum((state["exp_avg"].to_local() if hasattr(state["exp_avg"], "to_local")
                           else state["exp_avg"]).numel() for state in optimizer.state.values())
    trainable = sum(params[name]["full"] for name, p in module.named_parameters() if p.requires_grad)
    return {"params": params, "optimizer_local_numel": local_state, "trainable_numel": trainable}


class Record(Callback):
    """Writes `rank{N}.pt` in `out`: losses, holdings, and (rank 0) gathered states."""

    def __init__(self, out: Path, state_at: list[int], ckpt_at: list[int]) -> None:
        self.out, self.state_at, self.ckpt_at = Path(out), set(state_at), set(ckpt_at)
        self.rows: dict[int, dict] = {}
        self.states: dict[str, dict] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.states["start"] = gather_state(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k in ("train/d_loss", "train/adaptive_weight", "train/r1")}
        self.rows[self._step] = {"loss": float(loss), **metrics}
        step = trainer.global_step
        if step in self.state_at:
            self.states[f"at{step}"] = gather_state(trainer, pl_module)
        if step in self.ckpt_at:
            trainer.save_checkpoint(self.out / "checkpoints" / f"step={step}.ckpt")

    def on_train_end(self, trainer, pl_module) -> None:
        self.states["final"] = gather_state(trainer, pl_module)
        rank = trainer.global_rank
        record = {"rank": rank, "world": trainer.world_size, "rows": self.rows, "holdings": holdings(trainer, pl_module)}
        if rank == 0:
            record["states"] = self.states
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(record, self.out / f"rank{rank}.pt")


def run_job(job: dict) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(job["out"])
    module = build_module(job)
    record = Record(out, job.get("state_at", []), job.get("ckpt_at", []))
    trainer = Trainer(
        accelerator="cpu", devices=world, strategy=build_strategy(job["strategy"]), precision="32-true",
        max_steps=job["steps"], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
        callbacks=[record], default_root_dir=str(out),
    )
    # Placeholders: the module builds the step's batch itself (_StepBatch).
    loader = DataLoader(list(range(64)), batch_size=1)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=job.get("resume"))


# -- the launches the tests share -------------------------------------------------------------------

STEPS = 4  # every run ends at this global step
SAVE_AT = 2  # the 2-process runs checkpoint here; resumed runs continue from it
STAGE2_PARALLEL = ("ddp", "fsdp", "zero2", "zero3")
STAGE1_PARALLEL = ("ddp", "fsdp")  # DeepSpeed refuses the GAN tokenizer's two optimizers
# Far below the norm ratio ||grad nll|| / ||grad gan|| of these tiny nets: the cap always binds,
# and with gan_weight 100 the adversarial term weighs 0.1.
ADAPTIVE_WEIGHT_CAP = 1e-3


def launch(plan: list[dict], world: int, root: Path, name: str) -> None:
    """Run `plan` on `world` processes (torchrun), raising with the output's tail on failure."""
    import subprocess

    from tests.conftest import REPO

    path = root / f"{name}.json"
    path.write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           "-m", "tests.equivalence_worker", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    (root / f"{name}.log").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-6000:]}")


def read_run(out: Path) -> dict:
    """rank{N}.pt of one run: {"ranks": [record, ...], "states": rank 0's gathered states}."""
    ranks = [torch.load(p, weights_only=False) for p in sorted(Path(out).glob("rank*.pt"))]
    return {"ranks": ranks, "states": ranks[0]["states"], "dir": Path(out)}


def run_all(root: Path) -> dict[str, dict]:
    """Every run the equivalence and resharding tests compare, in three launches:

    1. two processes: stage 2 under DDP, FSDP2, ZeRO-2, ZeRO-3 and the GAN tokenizer under DDP and
       FSDP2, each for STEPS steps from the same init, checkpointing at SAVE_AT;
    2. one process: the single-device references of both stages, and the FSDP2, ZeRO-2 and ZeRO-3
       runs resumed from their SAVE_AT checkpoints (2 -> 1);
    3. two processes: FSDP2 resumed from the one-process FSDP2 run's checkpoint at SAVE_AT + 1
       (1 -> 2).
    """
    from tests.stage2_fixtures import BACKBONES, tiny_t5_dir, tiny_tokenizer, write_tokenizer_checkpoint

    t5 = tiny_t5_dir(root / "t5")
    tok = write_tokenizer_checkpoint(root / "tok.ckpt", tiny_tokenizer())
    stage2 = {"stage": 2, "backbone": BACKBONES["maskgit"], "tokenizer_path": str(tok), "text_encoder": str(t5)}
    stage1 = {"stage": 1, "adaptive_weight_max": ADAPTIVE_WEIGHT_CAP}
    every = list(range(1, STEPS + 1))

    def job(name: str, common: dict, strategy: str, **kw) -> dict:
        return {**common, "strategy": strategy, "steps": STEPS, "out": str(root / name), "state_at": every, **kw}

    two = [job(f"s2-{s}", stage2, s, ckpt_at=[SAVE_AT]) for s in STAGE2_PARALLEL]
    two += [job(f"s1-{s}", stage1, s, ckpt_at=[SAVE_AT] if s == "fsdp" else []) for s in STAGE1_PARALLEL]
    launch(two, 2, root, "launch-two")
    ckpt = lambda name, step=SAVE_AT: str(root / name / "checkpoints" / f"step={step}.ckpt")  # noqa: E731
    one = [job("s2-single", stage2, "single"), job("s1-single", stage1, "single")]
    one += [job(f"s2-{s}-to1", stage2, s, resume=ckpt(f"s2-{s}"), ckpt_at=[SAVE_AT + 1] if s == "fsdp" else [])
            for s in ("fsdp", "zero2", "zero3")]
    launch(one, 1, root, "launch-one")
    launch([job("s2-fsdp-to1-to2", stage2, "fsdp", resume=ckpt("s2-fsdp-to1", SAVE_AT + 1))], 2, root, "launch-back")
    return {p.name: read_run(p) for p in sorted(root.iterdir()) if p.is_dir() and any(p.glob("rank*.pt"))}


_RESULTS: dict[str, dict[str, dict]] = {}


def shared_runs(tmp_path_factory) -> dict[str, dict]:
    """run_all once per pytest process (both test modules use it)."""
    if "runs" not in _RESULTS:
        _RESULTS["runs"] = run_all(tmp_path_factory.mktemp("equivalence"))
    return _RESULTS["runs"]


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    for job in plan:
        run_job(job)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
