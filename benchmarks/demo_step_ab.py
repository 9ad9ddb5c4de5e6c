"""A/B of the CPU demo's training steps: this tree against another commit's, in one run.

Workloads, as the demo trains them (configs/experiment/*_demo.yaml), through real Lightning steps
(`common.fit_steps`: forward, loss, backward, gradient clipping, fused AdamW, EMA):
  - mebt_bf16 / mebt_fp32: stage 2 with the configs/model/mebt_tiny.yaml MaskedVideoModule, batch
    8 of 5x8x8 token-shard samples (tokens + cached text embeddings of varying caption lengths),
    under bf16-mixed (what the demo uses on a CPU with native bf16) and under 32-true;
  - maskgit_bf16 / maskgit_fp32: the same with configs/model/maskgit_tiny.yaml;
  - tokenizer_fp32: the configs/model/cvivit_tiny.yaml TokenizerModule at the tokenizer demo's
    settings (batch 4 of 17 frames at 32x32, no GAN term before its gan_start_step), fp32 as the
    demo runs it on a CPU.

One worker process per tree (PYTHONPATH and imports from that tree, the harness from this one), each
building every workload once; the parent then alternates the trees chunk by chunk (A B, B A, ...),
so that the drift of a machine shared with other jobs hits both alike. Each chunk is one short
`fit` whose first step (optimizer state set-up) is dropped. Reported per workload: median step
time of each tree, new/old ratio, and the spread (the per-round ratios' min and max).

    git worktree add /tmp/base_b5b2dfd b5b2dfd   # (or let the script make it)
    python benchmarks/demo_step_ab.py --base /tmp/base_b5b2dfd --json-out docs/benchmarks/demo_step_ab_DATE.json
    python benchmarks/demo_step_ab.py --rounds 1 --steps 1 --workloads mebt_fp32   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = ("mebt_bf16", "maskgit_bf16", "tokenizer_fp32", "mebt_fp32", "maskgit_fp32")
GRID, BATCH, TEXT_LEN, TEXT_DIM = (5, 8, 8), 8, 16, 384
FOLDERS = ("models", "lightning_modules", "launch", "datamodules", "metrics")
PKG = "maskvid."  # the import prefix of the tree in use (see _use_tree)


# -- worker (runs with one tree's code) ---------------------------------------------------------


def _use_tree(tree: Path) -> None:
    """Import the harness (benchmarks/common.py) from this tree, then everything else from `tree`."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import common  # noqa: F401  (also tunes the host the same way for both trees)

    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    for name in [m for m in sys.modules if m.split(".")[0] in ("maskvid", *FOLDERS)]:
        del sys.modules[name]
    sys.path.insert(0, str(tree))
    global PKG
    if (tree / "maskvid").is_dir():  # folders installed as maskvid.<folder>: resolve them in `tree`
        import maskvid

        maskvid.__path__.append(str(tree))
    else:  # a tree from before the maskvid namespace: top-level folders, class_paths without it
        PKG = ""


def _imp(module: str):
    """`module` ("models.config") from the tree in use, whichever layout it has."""
    import importlib

    return importlib.import_module(PKG + module)


def _yaml(path: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / path).read_text().replace("maskvid.", PKG))


def _model_yaml(name: str) -> dict:
    return _yaml(f"configs/model/{name}.yaml")["model"]["init_args"]


def _stage2(kind: str, tmp: Path):
    import torch

    MaskedVideoModule = _imp("lightning_modules.masked_video_module").MaskedVideoModule
    instantiate = _imp("models.config").instantiate
    record = _imp("models.tokenizer_checkpoint")

    torch.manual_seed(0)
    tokenizer = instantiate(_model_yaml("cvivit_tiny")["tokenizer"])
    ckpt = tmp / "tokenizer.ckpt"  # a stage-1 checkpoint, which both trees' stage 2 reads
    torch.save({record.CHECKPOINT_KEY: {"format": record.FORMAT_VERSION, "config": tokenizer.config,
                                        "prefix": "tokenizer."},
                "state_dict": {f"tokenizer.{k}": v for k, v in tokenizer.state_dict().items()}}, ckpt)
    args = _model_yaml(f"{kind}_tiny")
    backbone = instantiate(args.pop("backbone"))
    args.update(tokenizer_path=str(ckpt), num_val_videos=0)
    module = MaskedVideoModule(backbone, **args)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(6, TEXT_LEN + 1, (BATCH,), generator=g)  # captions of varying length
    batch = {"tokens": torch.randint(0, backbone.vocab_size, (BATCH, *GRID), generator=g),
             "latent_mask": torch.ones(BATCH, GRID[0], dtype=torch.bool),
             "text_emb": torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=g).half(),
             "text_mask": torch.arange(TEXT_LEN)[None] < lengths[:, None],
             "caption": [f"a red circle moving left {i}" for i in range(BATCH)]}
    return module, batch


def _tokenizer():
    import torch

    TokenizerModule = _imp("lightning_modules.tokenizer_module").TokenizerModule
    instantiate = _imp("models.config").instantiate

    torch.manual_seed(0)
    args = _model_yaml("cvivit_tiny")
    demo = _yaml("configs/experiment/tokenizer_demo.yaml")
    args.update(demo["model"]["init_args"], num_log_videos=0)
    tokenizer, disc = instantiate(args.pop("tokenizer")), instantiate(args.pop("discriminator"))
    module = TokenizerModule(tokenizer, disc, **args)
    frames, size, b = 17, tokenizer.config["init_args"]["image_size"], 4
    batch = {"video": torch.rand(b, 3, frames, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1,
             "frame_mask": torch.ones(b, frames, dtype=torch.bool), "caption": [""] * b}
    return module, batch


def worker(tree: Path) -> None:
    """Serve `{"workload": W, "steps": S}` lines on stdin with `{"times": [...]}` lines on stdout."""
    _use_tree(tree)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from common import fit_steps

    tmp = Path(tempfile.mkdtemp())
    built: dict = {}
    out = sys.stdout
    sys.stdout = sys.stderr  # Lightning's prints must not mix with the replies
    for line in sys.stdin:
        ask = json.loads(line)
        name = ask["workload"]
        if name not in built:
            kind, precision = name.rsplit("_", 1)
            built[name] = (*(_tokenizer() if kind == "tokenizer" else _stage2(kind, tmp)),
                           "bf16-mixed" if precision == "bf16" else "32-true")
        module, batch, precision = built[name]
        # flop_step=-1: no step is counted (and so none slowed); the first timed one is dropped.
        timer = fit_steps(module, batch, ask["steps"] + 1, precision=precision, flop_step=-1, roof_n=64)
        out.write(json.dumps({"times": timer.times[1:]}) + "\n")
        out.flush()


# -- parent -------------------------------------------------------------------------------------


class Worker:
    def __init__(self, tree: Path, threads: int | None) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.log = tempfile.NamedTemporaryFile("w+", prefix="demo_step_ab_", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, __file__, "--_worker", str(tree),
                                      *(["--threads", str(threads)] if threads else [])], cwd=tree, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def run(self, workload: str, steps: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"workload": workload, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker for {workload} died (exit {self.proc.wait()}); its log: {self.log.name}")
        return json.loads(line)["times"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def git_commit(tree: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True,
                          text=True).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("/tmp/base_b5b2dfd"),
                        help="the old tree (a worktree; made from --base-commit if it does not exist)")
    parser.add_argument("--base-commit", default="b5b2dfd", help="commit of the old tree (default: %(default)s)")
    parser.add_argument("--new", type=Path, default=REPO,
                        help="the new tree (default: this one; a worktree of the base with only the change "
                             "applied isolates it from other work)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=4, help="alternations per workload")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per chunk")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of both workers (default: torch's, as the demo runs)")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--_worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        worker(args._worker)
        return 0
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import emit

    import torch

    if not args.base.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(args.base), args.base_commit], cwd=REPO, check=True)
    trees = {"new": args.new.resolve(), "old": args.base.resolve()}
    workers = {name: Worker(tree, args.threads) for name, tree in trees.items()}
    result: dict = {"benchmark": "demo_step_ab", "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
                    "trees": {name: {"path": str(tree), "commit": git_commit(tree)} for name, tree in trees.items()},
                    "rounds": args.rounds, "steps_per_chunk": args.steps,
                    "note": "each tree: its commit plus its uncommitted changes, if any",
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "workloads": {}}
    try:
        for name in args.workloads:
            for worker_ in workers.values():  # build and warm up (kernel set-up) outside the timings
                worker_.run(name, 2)
            times: dict[str, list[float]] = {"new": [], "old": []}
            ratios = []
            for r in range(args.rounds):
                order = ("new", "old") if r % 2 == 0 else ("old", "new")
                chunk = {}
                for tree in order:
                    steps = workers[tree].run(name, args.steps)
                    times[tree].extend(steps)
                    chunk[tree] = statistics.median(steps)
                ratios.append(chunk["new"] / chunk["old"])
                print(f"[ab] {name} round {r}: new {chunk['new']:.4f} s, old {chunk['old']:.4f} s",
                      file=sys.stderr, flush=True)
            new, old = statistics.median(times["new"]), statistics.median(times["old"])
            result["workloads"][name] = {
                "new_step_s": round(new, 4), "old_step_s": round(old, 4), "new_over_old": round(new / old, 3),
                "round_ratio_min": round(min(ratios), 3), "round_ratio_max": round(max(ratios), 3),
                "steps_each": len(times["new"]),
                "new_min_max_s": [round(min(times["new"]), 4), round(max(times["new"]), 4)],
                "old_min_max_s": [round(min(times["old"]), 4), round(max(times["old"]), 4)]}
    finally:
        for worker_ in workers.values():
            worker_.close()
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    emit(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
