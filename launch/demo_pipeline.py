"""The steps of `maskvid demo`, each a real `maskvid` command (or a small in-process check),
run once, recorded in OUT/steps/NAME.json, and skipped when the demo is rerun with the same --out.

Every model step goes through the public CLI (`maskvid data synthetic`, `fit`, `data tokenize`,
`generate`, `eval`) in a subprocess, so the demo exercises exactly what a user would run and its
report can print the commands that reproduce each step. The subprocesses run with OUT as their
working directory because the demo configs write to relative `runs/...` paths.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from maskvid.datamodules.errors import DataError
from maskvid.datamodules.synthetic import Variation
from maskvid.configs import CONFIG_DIR
from maskvid.launch import cpu_tuning


# How --minutes is shared between the two training stages (the one place to change it).
# Stage 2 gets what is left after the tokenizer (which may stop early at max_steps) and tokenizing.
# Rendering the data, generating and scoring are timed apart, outside the budget.
# The tokenizer's share is what its reconstructions need for the oracle to read them right
# (docs/demo.md), so the rest goes to stage 2, the stage that limits quality.
BUDGET_SPLIT = {"tokenizer": 0.2, "stage2": 0.8}
# The demo experiment configs' max_steps are sized to fit this budget on a 2-core CPU, and another
# --minutes scales them, so that the learning-rate schedules end when the budget does (docs/demo.md
# has the timings, with and without the opt-in CPU tuning of launch/cpu_tuning.py).
# Where the machine is slower, FitScheduleToTime shortens a fit's schedule to what the budget allows.
REFERENCE_MINUTES = 40.0


def config_max_steps(config: Path) -> int:
    """trainer.max_steps of an experiment config (its includes are not consulted: the demo
    configs set it themselves)."""
    import yaml

    steps = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("max_steps")
    if not isinstance(steps, int) or steps < 1:
        raise DataError(f"{config} sets no trainer.max_steps for the demo to scale")
    return steps


def scaled_steps(config: Path, minutes: float) -> int:
    """The config's max_steps scaled from REFERENCE_MINUTES to `minutes` of total budget."""
    return max(1, round(config_max_steps(config) * minutes / REFERENCE_MINUTES))


# The synthetic data the demo renders: large objects on black, both speeds. At the demo's 32x32 a
# small object is 8 pixels, and the tokenizer's reconstruction rounds the corners the oracle reads
# shape from, so small objects read far worse than large ones (docs/benchmarks.md, "Text-to-video
# quality"). Four backgrounds also multiply the edge tokens
# stage 2 has to learn within its budget. `maskvid demo --sizes small large --backgrounds black
# navy "dark gray" "dark brown"` renders the full dataset.
DEMO_VARIATION = Variation(sizes=("large",), backgrounds=("black",))


@dataclass(frozen=True)
class Recipe:
    """Sizes of one demo run. Step counts are caps: --minutes usually stops training first,
    unless `time_budget` is off (then the steps alone fix the run, as a reproducible test needs)."""

    num_train: int = 1024
    num_val: int = 128
    num_heldout: int = 128
    samples_per_shard: int = 128
    tokenizer_steps: Optional[int] = None  # None: the config's max_steps scaled to --minutes
    stage2_steps: Optional[int] = None
    val_every: Optional[int] = None  # tokenizer; None: the config's val_check_interval
    stage2_val_every: Optional[int] = None  # each stage-2 validation also samples videos: costly
    limit_val_batches: Optional[int] = None
    log_every: Optional[int] = None
    num_val_videos: Optional[int] = None  # stage-2 validation samples per check
    generate_steps: Optional[int] = None  # None: the checkpoint's sample_steps
    generate_refine_steps: Optional[int] = None  # None: the checkpoint's refine_steps
    max_prompts: Optional[int] = None  # per prompt set; None: all of them
    videos_per_prompt: int = 2
    recon_clips: int = 8  # real/reconstructed pairs shown in the report
    workers: int = 2
    variation: Variation = DEMO_VARIATION  # the synthetic data's free attributes
    frames: int = 17  # rendered frames per clip, and the clip length both fits train on
    # Experiment configs under configs/ ({backbone} is filled in); they write to runs/tokenizer_demo
    # and runs/{backbone}_demo, where the later steps look for the checkpoints.
    tokenizer_config: str = "experiment/tokenizer_demo.yaml"
    stage2_config: str = "experiment/{backbone}_demo.yaml"
    time_budget: bool = True  # False: no --trainer.max_time, and the configs' max_steps unscaled
    prompt_sets: tuple[str, ...] = ("seen", "heldout")  # synthetic prompts: seen, heldout, balanced


FULL = Recipe()
# A smoke run: a handful of steps per stage, a few prompts, to check the pipeline end to end.
QUICK = Recipe(num_train=32, num_val=8, num_heldout=8, samples_per_shard=8, tokenizer_steps=4,
               stage2_steps=4, val_every=2, stage2_val_every=4, limit_val_batches=1, log_every=1, num_val_videos=1,
               generate_steps=4, generate_refine_steps=0, max_prompts=3, videos_per_prompt=1, recon_clips=4, workers=1)
# The learning check (tests/test_learning.py): tiny fits whose generated videos the oracle reads
# far above chance for colour and direction. Steps, not minutes, fix it, so a rerun gives the
# same figures. Everything that makes learning quick is here or in configs/demo/: 9 frames (3
# latent frames), one size, speed and background, a small stage 2, and 32 prompts that ask for
# every colour and direction equally often.
LEARN = Recipe(num_train=512, num_val=64, num_heldout=0, samples_per_shard=128, recon_clips=4, workers=1,
               variation=Variation(sizes=("large",), speeds=("fast",), backgrounds=("black",)), frames=9,
               tokenizer_config="demo/learn_tokenizer.yaml", stage2_config="demo/learn_{backbone}.yaml",
               time_budget=False, prompt_sets=("balanced",))
RECIPES = {"full": FULL, "quick": QUICK, "learn": LEARN}
# Steps whose output depends on the stage-2 backbone: a rerun with another --backbone redoes them
# and reuses the data, tokenizer and tokens.
BACKBONE_STEPS = ("stage2", "generate", "score", "report")


def hms(minutes: float) -> str:
    """--trainer.max_time format; Lightning needs at least a minute to be meaningful here."""
    seconds = max(60, int(minutes * 60))
    return f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class StepRecord:
    """What a finished step leaves in OUT/steps/NAME.json (its presence means 'done')."""

    name: str
    seconds: float
    commands: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    backbone: Optional[str] = None  # the stage-2 backbone, for the steps that depend on it


class DemoPipeline:
    """The demo's steps over one output directory. `steps()` lists them in order."""

    def __init__(self, out: Path, recipe: Recipe, minutes: float, backbone: str = "mebt", devices: int = 1,
                 train_shards: Optional[str] = None, val_shards: Optional[str] = None,
                 prompts: Optional[Path] = None, i3d_path: Optional[str] = None, clip_path: Optional[str] = None,
                 seed: int = 0, echo: Callable[[str], None] = print, stream_output: bool = True,
                 cpu_tuning_flag: Optional[bool] = None) -> None:
        self.out = out.resolve()
        self.recipe = recipe
        self.minutes = minutes
        self.backbone = backbone
        self.devices = devices
        self.seed = seed
        self.echo = echo
        self.stream_output = stream_output
        self.i3d_path = str(Path(i3d_path).resolve()) if i3d_path else None
        self.clip_path = str(Path(clip_path).resolve()) if clip_path else None
        self.synthetic = train_shards is None
        data = self.out / "data"
        self.train_shards = absolute_shards(train_shards) if train_shards else str(data / "train")
        self.val_shards = absolute_shards(val_shards) if val_shards else str(data / "val")
        self.prompts_file = prompts.resolve() if prompts else None
        self.log = self.out / "commands.log"
        # Host tuning is opt-in (--cpu-tuning or MASKVID_CPU_TUNING=1) and never used with CUDA:
        # then the commands run on a preloaded tcmalloc/jemalloc (a bad MASKVID_ALLOCATOR fails
        # here) and tune glibc's malloc in-process. Otherwise they inherit this environment as is.
        self.cpu_tuning = cpu_tuning.enabled(cpu_tuning_flag)
        if self.cpu_tuning:
            allocator_env, self.allocator = cpu_tuning.child_env(os.environ)
            self._preload = allocator_env.get("LD_PRELOAD")
        else:
            self.allocator, self._preload = cpu_tuning.preloaded(os.environ), None
        self.steps_dir = self.out / "steps"
        self.tokens = self.out / "tokens"
        self.stage2_name = f"{backbone}_demo"
        # Where the demo configs' checkpoint callbacks write (relative to the cwd, OUT).
        self.tokenizer_ckpt = self.out / "runs/tokenizer_demo/checkpoints/last.ckpt"
        self.stage2_ckpt = self.out / f"runs/{self.stage2_name}/checkpoints/last.ckpt"
        self.real_stats = self.out / "eval/real_stats.pt"
        self._commands: list[str] = []

    # -- checks before anything runs ---------------------------------------------------------------

    def preflight(self) -> None:
        """Bad input fails in a second with one line, not after the tokenizer has trained."""
        from maskvid.datamodules.streams import expand_shards
        from maskvid.launch.cmd_generate import read_prompts

        if not self.synthetic:
            for flag, spec in (("--train-shards", self.train_shards), ("--val-shards", self.val_shards)):
                try:
                    expand_shards(spec)
                except DataError as exc:
                    raise DataError(f"{flag} {spec}: {exc}") from None
        if self.prompts_file is not None:
            read_prompts(self.prompts_file)  # raises DataError naming the file (and line)
        rendered = self.rendered_variation()
        if self.synthetic and rendered is not None and rendered != self.recipe.variation.as_dict():
            # A rerun skips the finished data step: other --sizes/--speeds/--backgrounds would be ignored.
            raise DataError(f"{self.out / 'data'} was rendered with {rendered}, not {self.recipe.variation.as_dict()}; "
                            "use another --out for other --sizes/--speeds/--backgrounds")
        frames = self.rendered_frames()
        if self.synthetic and frames is not None and frames != self.recipe.frames:
            raise DataError(f"{self.out / 'data'} holds {frames}-frame clips, this recipe trains on {self.recipe.frames}; "
                            "use another --out for another --recipe")
        for flag, path in (("--i3d-path", self.i3d_path), ("--clip-path", self.clip_path)):
            if path and not Path(path).exists():
                raise DataError(f"{flag} {path}: no such file or directory")

    def rendered_variation(self) -> dict[str, list[str]] | None:
        """The variation of the synthetic data already rendered in OUT (None before the data step)."""
        attributes = self.out / "data/attributes.json"
        if not (self.steps_dir / "data.json").is_file() or not attributes.is_file():
            return None
        return json.loads(attributes.read_text()).get("variation", Variation().as_dict())

    def rendered_frames(self) -> int | None:
        """Frames per clip of the synthetic data already rendered in OUT (None before the data step)."""
        attributes = self.out / "data/attributes.json"
        if not (self.steps_dir / "data.json").is_file() or not attributes.is_file():
            return None
        return int(json.loads(attributes.read_text()).get("frames", FULL.frames))

    # -- running commands --------------------------------------------------------------------------

    def maskvid(self, *args: str) -> None:
        """Run a real `maskvid` command in OUT; its output goes to commands.log (and the terminal,
        Lightning's progress bar included). A failure names the log."""
        self._commands.append("maskvid " + " ".join(shlex.quote(a) for a in args))
        env = dict(os.environ)
        if self.cpu_tuning:
            env[cpu_tuning.ENV] = "1"  # the fits tune glibc's malloc in-process too
            if self._preload:
                env["LD_PRELOAD"] = self._preload
        with open(self.log, "ab") as log:
            log.write(f"\n$ cd {self.out} && maskvid {' '.join(args)}\n".encode())
            log.flush()
            proc = subprocess.Popen([sys.executable, "-m", "maskvid.launch.cli", *args], cwd=self.out, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert proc.stdout is not None
            # Raw chunks, not lines: Lightning's bar redraws with \r.
            while chunk := proc.stdout.read1(4096):
                log.write(chunk)
                if self.stream_output:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            code = proc.wait()
        if code != 0:
            name = " ".join(args[:2]) if args[0] in ("data", "eval") else args[0]
            raise DataError(f"`maskvid {name}` failed (exit {code}); its output is in {self.log}")

    def precision(self, stage: str = "stage2") -> str:
        """A fit's trainer.precision: stage 2 in bf16 autocast where the device has native bf16,
        else fp32. The tokenizer stays fp32 on a CPU: bf16 saved little of its time there, and its
        tokens came out harder for stage 2 (higher stage-2 val loss; docs/demo.md), which cost more
        than the saving."""
        from maskvid.precision import trainer_precision

        gpu = _cuda_available()
        if stage == "tokenizer" and not gpu:
            return "32-true"
        return trainer_precision("cuda" if gpu else "cpu")

    def trainer_config(self) -> Path:
        """The trainer file layered after the experiment config: one GPU where CUDA is
        available (bf16, TF32), else one CPU process."""
        return CONFIG_DIR / "trainer" / ("gpu.yaml" if _cuda_available() else "cpu.yaml")

    def _trainer_args(self, steps: Optional[int], minutes: float, val_every: Optional[int],
                      stage: str = "stage2") -> list[str]:
        r = self.recipe
        args = ["--config", str(self.trainer_config())]
        if self.devices > 1:
            # Data parallel over --devices (gloo on CPU); the GAN's unused parameters are handled.
            args += ["--config", str(CONFIG_DIR / "trainer/ddp.yaml")]
        # The precision `precision` picks for the stage (bf16 on CPUs with native bf16 too), over
        # the trainer files' own.
        args += ["--trainer.precision", self.precision(stage)]
        args += ["--trainer.devices", str(self.devices)]
        if r.time_budget:
            args += ["--trainer.max_time", hms(minutes)]
        if steps is not None:
            args += ["--trainer.max_steps", str(steps)]
        if val_every is not None:
            args += ["--trainer.val_check_interval", str(val_every)]
        if r.limit_val_batches is not None:
            args += ["--trainer.limit_val_batches", str(r.limit_val_batches)]
        if r.log_every is not None:
            args += ["--trainer.log_every_n_steps", str(r.log_every)]
        # An interrupted fit resumes from its newest complete checkpoint (fresh if none).
        return args + ["--ckpt_path", "auto"]

    # -- the steps ----------------------------------------------------------------------------------

    def steps(self) -> list[tuple[str, str, Callable[[], dict[str, Any]]]]:
        """(name, what it does, function) in order."""
        steps = []
        if self.synthetic:
            steps.append(("data", "render the synthetic captioned dataset", self.step_data))
        steps += [
            ("check", "stream the data as fit will and read it back with the oracle", self.step_check),
            ("tokenizer", "stage 1: fit the C-ViViT tokenizer", self.step_tokenizer),
            ("tokenize", "tokenize the train and val shards", self.step_tokenize),
            ("stage2", f"stage 2: fit the {self.backbone} transformer on the tokens", self.step_stage2),
            ("generate", "generate videos for the seen and held-out prompts", self.step_generate),
            ("score", "caption accuracy (oracle), FVD and CLIPSIM", self.step_score),
            ("report", "write summary.json and report.html", self.step_report),
        ]
        return steps

    def step_data(self) -> dict[str, Any]:
        r = self.recipe
        v = r.variation
        self.maskvid("data", "synthetic", "--out", "data", "--seed", str(self.seed), "--num-train", str(r.num_train),
                     "--num-val", str(r.num_val), "--num-heldout", str(r.num_heldout), "--frames", str(r.frames),
                     "--samples-per-shard", str(r.samples_per_shard), "--workers", str(r.workers),
                     "--sizes", *v.sizes, "--speeds", *v.speeds, "--backgrounds", *v.backgrounds, "--overwrite",
                     "--quiet")
        return {"data": str(self.out / "data"), "variation": v.as_dict()}

    def step_check(self) -> dict[str, Any]:
        from maskvid.launch.demo_checks import check_data

        return check_data(self.train_shards, self.val_shards, self.out, workers=self.recipe.workers,
                          seed=self.seed, synthetic=self.synthetic, num_frames=self.recipe.frames)

    def fit_steps(self, config: Path, steps: Optional[int]) -> Optional[int]:
        """A fit's --trainer.max_steps: the recipe's, else the config's scaled to --minutes, else
        (no time budget) None, the config's own."""
        if steps is not None or not self.recipe.time_budget:
            return steps
        return scaled_steps(config, self.minutes)

    def stage2_config(self) -> Path:
        return CONFIG_DIR / self.recipe.stage2_config.format(backbone=self.backbone)

    def step_tokenizer(self) -> dict[str, Any]:
        config = CONFIG_DIR / self.recipe.tokenizer_config
        steps = self.fit_steps(config, self.recipe.tokenizer_steps)
        frames = [] if self.recipe.frames == FULL.frames else ["--data.num_frames", str(self.recipe.frames)]
        self.maskvid("fit", "--config", str(config), *frames,
                     "--data.train_shards", self.train_shards, "--data.val_shards", self.val_shards,
                     *self._trainer_args(steps, BUDGET_SPLIT["tokenizer"] * self.minutes, self.recipe.val_every,
                                         "tokenizer"))
        if not self.tokenizer_ckpt.is_file():
            raise DataError(f"the tokenizer fit wrote no {self.tokenizer_ckpt}")
        return {"checkpoint": str(self.tokenizer_ckpt)}

    def step_tokenize(self) -> dict[str, Any]:
        for split, shards in (("train", self.train_shards), ("val", self.val_shards)):
            self.maskvid("data", "tokenize", "--tokenizer", str(self.tokenizer_ckpt), "--shards", shards,
                         "--out", f"tokens/{split}", "--num-frames", str(self.recipe.frames),
                         "--workers", str(self.recipe.workers), "--overwrite", "--quiet")
        from maskvid.launch.demo_checks import reconstruction_accuracy

        return {"tokens": str(self.tokens),
                "reconstruction_oracle_accuracy": reconstruction_accuracy(self.tokenizer_ckpt, str(self.tokens / "val"))}

    def step_stage2(self) -> dict[str, Any]:
        # Stage 2 gets what is left of the budget: its own share, whatever the tokenizer left
        # unused (it stops at max_steps when that comes first), minus tokenizing.
        used = _recorded_seconds(self.steps_dir, "tokenizer") + _recorded_seconds(self.steps_dir, "tokenize")
        minutes = max(1.0, self.minutes - used / 60)
        model = ["--model.init_args.tokenizer_path", str(self.tokenizer_ckpt)]
        if self.recipe.num_val_videos is not None:
            model += ["--model.init_args.num_val_videos", str(self.recipe.num_val_videos)]
        if self.i3d_path:
            # Token shards hold no pixels: FVD in validation compares with cached real statistics.
            if not self.real_stats.is_file():
                self.maskvid("eval", "real-stats", "--data", self.val_shards, "--i3d", self.i3d_path,
                             "--out", str(self.real_stats), "--quiet")
            model += ["--model.init_args.i3d_path", self.i3d_path, "--model.init_args.fvd_real_stats",
                      str(self.real_stats)]
        if self.clip_path:
            model += ["--model.init_args.clip_path", self.clip_path]
        config = self.stage2_config()
        steps = self.fit_steps(config, self.recipe.stage2_steps)
        # The token shards' grid is checked against the clip length the data config implies.
        frames = [] if self.recipe.frames == FULL.frames else ["--data.num_frames", str(self.recipe.frames)]
        self.maskvid("fit", "--config", str(config), *frames,
                     "--data.samples", "tokens", "--data.train_shards", "tokens/train", "--data.val_shards",
                     "tokens/val", *model, *self._trainer_args(steps, minutes, self.recipe.stage2_val_every))
        if not self.stage2_ckpt.is_file():
            raise DataError(f"the stage-2 fit wrote no {self.stage2_ckpt}")
        # The trained model as safetensors, for maskvid.TextToVideo.from_pretrained (docs/api.md).
        self.maskvid("ckpt", "export", str(self.stage2_ckpt), "--out", "export")
        return {"checkpoint": str(self.stage2_ckpt), "export": str(self.out / "export"),
                "budget_minutes": round(minutes, 2) if self.recipe.time_budget else None}

    def prompt_sets(self) -> dict[str, list[str]]:
        """The prompts to generate, per set: the synthetic ones the recipe names (the seen and
        held-out lists, or the balanced set), the val captions of the user's shards, or --prompts
        FILE; each cut to --max-prompts."""
        from maskvid.datamodules.synthetic import balanced_combos, caption_for
        from maskvid.launch.cmd_generate import read_prompts

        if self.prompts_file is not None:
            sets = {"prompts": read_prompts(self.prompts_file)}
        elif self.synthetic:
            sets = {}
            for s in self.recipe.prompt_sets:
                if s == "balanced":
                    sets[s] = [caption_for(dict(zip(("colour", "shape", "direction"), c))) for c in balanced_combos()]
                else:
                    sets[s] = read_prompts(self.out / f"data/prompts_{s}.txt")
        else:
            sets = {"val_captions": read_prompts(self.out / "prompts/val_captions.txt")}
        limit = self.recipe.max_prompts
        return {k: v[:limit] if limit else v for k, v in sets.items()}

    def step_generate(self) -> dict[str, Any]:
        result = {}
        for name, prompts in self.prompt_sets().items():
            path = self.out / f"prompts/{name}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(prompts) + "\n")
            # Absolute --out: index.json then lists paths that resolve from anywhere.
            args = ["generate", "--ckpt", str(self.stage2_ckpt), "--prompts", f"prompts/{name}.txt",
                    "--videos-per-prompt", str(self.recipe.videos_per_prompt), "--batch-size", "8",
                    "--seed", str(self.seed), "--out", str(self.out / f"generated/{name}"), "--quiet"]
            for flag, value in (("--steps", self.recipe.generate_steps), ("--refine-steps", self.recipe.generate_refine_steps)):
                if value is not None:  # None: the checkpoint's own sampler setting
                    args += [flag, str(value)]
            self.maskvid(*args)
            result[name] = {"prompts": len(prompts), "index": str(self.out / f"generated/{name}/index.json")}
        return result

    def step_score(self) -> dict[str, Any]:
        from maskvid.launch.demo_checks import oracle_accuracy, prompt_chance

        result: dict[str, Any] = {"caption_accuracy": {}, "caption_chance": {}, "fvd": {}, "clipsim": {}}
        for name, prompts in self.prompt_sets().items():
            folder = self.out / f"generated/{name}"
            result["caption_accuracy"][name] = oracle_accuracy(folder / "index.json")
            result["caption_chance"][name] = prompt_chance(prompts)
            if self.i3d_path:
                self.maskvid("eval", "fvd", "--real", str(self.real_stats), "--fake", str(folder), "--i3d",
                             self.i3d_path, "--json", f"eval/fvd_{name}.json", "--quiet")
                result["fvd"][name] = json.loads((self.out / f"eval/fvd_{name}.json").read_text())
            else:
                result["fvd"][name] = {"value": None, "reason": "no I3D weights: pass --i3d-path"}
            if self.clip_path:
                self.maskvid("eval", "clipsim", "--videos", str(folder), "--clip", self.clip_path, "--json",
                             f"eval/clipsim_{name}.json", "--quiet")
                result["clipsim"][name] = json.loads((self.out / f"eval/clipsim_{name}.json").read_text())
            else:
                result["clipsim"][name] = {"value": None, "reason": "no CLIP model: pass --clip-path"}
        return result

    def step_report(self) -> dict[str, Any]:
        from maskvid.launch.demo_report import write_report

        summary = self.write_summary()
        page = write_report(self.out, summary, self.tokenizer_ckpt, self.val_shards, self.recipe.recon_clips,
                            self.recipe.workers, num_frames=self.recipe.frames)
        return {"report": str(page), "tokenizer_psnr_recon_clips": summary["metrics"].get("tokenizer_psnr_recon_clips")}

    # -- bookkeeping -----------------------------------------------------------------------------------

    def run(self, progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
        """Run the steps not recorded as done; returns the summary."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.steps_dir.mkdir(exist_ok=True)
        steps = self.steps()
        for i, (name, title, fn) in enumerate(steps, 1):
            marker = self.steps_dir / f"{name}.json"
            if self.done(name):
                self.echo(f"[{i}/{len(steps)}] {name}: done earlier, skipped ({title})")
            else:
                self.echo(f"[{i}/{len(steps)}] {name}: {title}")
                # What comes after was made from this step's old output: it runs again too.
                for later, _, _ in steps[i:]:
                    (self.steps_dir / f"{later}.json").unlink(missing_ok=True)
                self._commands = []
                start = time.perf_counter()
                result = fn()
                record = StepRecord(name, round(time.perf_counter() - start, 1), self._commands, result,
                                    self.backbone if name in BACKBONE_STEPS else None)
                # Written last and atomically: a step killed halfway has no marker and runs again.
                tmp = marker.with_suffix(".tmp")
                tmp.write_text(json.dumps(asdict(record), indent=1))
                tmp.replace(marker)
                self.write_summary()
            if progress is not None:
                progress(1)
        return self.write_summary()

    def done(self, name: str) -> bool:
        """Whether step `name` finished for this run: its marker exists and, for a step that
        depends on the backbone, was made with this one."""
        marker = self.steps_dir / f"{name}.json"
        if not marker.is_file():
            return False
        made_with = json.loads(marker.read_text()).get("backbone")
        return made_with is None or made_with == self.backbone

    def records(self) -> dict[str, dict[str, Any]]:
        return {name: json.loads((self.steps_dir / f"{name}.json").read_text())
                for name, _, _ in self.steps() if self.done(name)}

    def _fit_command(self, record: Optional[dict]) -> Optional[str]:
        """The `maskvid fit` command a step ran, its relative paths resolved against OUT."""
        fit = next((c for c in (record or {}).get("commands", []) if c.startswith("maskvid fit")), None)
        if fit is None:
            return None
        args = shlex.split(fit)
        for i, arg in enumerate(args[:-1]):
            if arg == "--config" and not Path(args[i + 1]).is_absolute():
                args[i + 1] = str(self.out / args[i + 1])
        return shlex.join(args)

    def write_summary(self) -> dict[str, Any]:
        from maskvid.launch.demo_checks import tokenizer_psnr
        from maskvid.launch.run_record import fit_record, machine

        records = self.records()
        score = records.get("score", {}).get("result", {})
        report = records.get("report", {}).get("result", {})
        summary = {
            "out": str(self.out),
            "backbone": self.backbone,
            "data": {"synthetic": self.synthetic, "train_shards": self.train_shards, "val_shards": self.val_shards,
                     "variation": self.rendered_variation() if self.synthetic else None},
            "budget_minutes": self.minutes if self.recipe.time_budget else None,  # None: the steps fix the run
            "budget_split": BUDGET_SPLIT,
            "precision": {"tokenizer": self.precision("tokenizer"), "stage2": self.precision()},
            "trainer_config": "configs/" + str(self.trainer_config().relative_to(CONFIG_DIR)),
            "cpu_tuning": self.cpu_tuning,
            "allocator": self.allocator,
            "recipe": asdict(self.recipe),
            "steps_done": list(records),
            "machine": machine(),
            # Steps each fit actually ran, what it was set to run, and why it stopped.
            "fits": {stage: fit_record(ckpt, self._fit_command(records.get(stage)), self.recipe.time_budget)
                     for stage, ckpt in (("tokenizer", self.tokenizer_ckpt), ("stage2", self.stage2_ckpt))
                     if stage in records},
            "checkpoints": {
                "tokenizer": str(self.tokenizer_ckpt) if "tokenizer" in records else None,
                "stage2": str(self.stage2_ckpt) if "stage2" in records else None,
            },
            "metrics": {
                "tokenizer_psnr": tokenizer_psnr(self.out / "runs/tokenizer_demo") if "tokenizer" in records else None,
                "tokenizer_psnr_recon_clips": report.get("tokenizer_psnr_recon_clips"),
                "data_oracle_accuracy": records.get("check", {}).get("result", {}).get("oracle_accuracy_on_val"),
                # The ceiling for caption accuracy: the oracle on the tokenizer's decode of val tokens.
                "reconstruction_oracle_accuracy": records.get("tokenize", {}).get("result", {}).get(
                    "reconstruction_oracle_accuracy"),
                "caption_accuracy": score.get("caption_accuracy"),
                # Per prompt set, what a model that ignores the words scores at best (demo_checks.prompt_chance).
                "caption_chance": score.get("caption_chance"),
                "fvd": score.get("fvd"),
                "clipsim": score.get("clipsim"),
            },
            "seconds": {name: rec["seconds"] for name, rec in records.items()},
            "commands": {name: [f"cd {self.out} && {c}" for c in rec["commands"]] for name, rec in records.items()},
            "report": str(self.out / "report.html") if (self.out / "report.html").is_file() else None,
            "commands_log": str(self.log),
        }
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(self.out / "summary.json")
        return summary


def absolute_shards(spec: str) -> str:
    """Local shard paths made absolute: the commands run in OUT, not where the user typed them.
    URLs and pipe: commands pass through; '::'-joined lists are handled part by part."""
    parts = []
    for part in spec.split("::"):
        remote = "://" in part or part.startswith("pipe:")
        parts.append(part if remote else os.path.abspath(os.path.expanduser(part)))
    return "::".join(parts)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _recorded_seconds(steps_dir: Path, name: str) -> float:
    marker = steps_dir / f"{name}.json"
    return float(json.loads(marker.read_text())["seconds"]) if marker.is_file() else 0.0
