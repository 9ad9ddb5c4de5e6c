"""Run every benchmark in benchmarks/, each as its own subprocess with --json-out into a results
folder, and write one combined JSON and PNG plots.

Each benchmark is a standalone script (see its --help); this only runs them in turn, with a
timeout each, and keeps going when one fails or times out (the error is recorded in the JSON).
The combined JSON holds every benchmark's own JSON plus `summary`: one row per target of the
performance suite (value, target, met), with the figure of a --baseline run (an earlier
all.json) beside it, so a speed change shows its before and after.

Slow benchmarks are skipped by default: text_to_video_quality (about 45 minutes: both stages
trained and scored) and the 20-minute quality part of tokenizer_quality (its throughput part
always runs). --include-slow runs them too; naming text_to_video_quality in --only also runs it.

Plots (in the results folder): roof.png (percent of the matmul roof per workload, against the
targets, before/after when --baseline is given) and data.png (clips/s the loader supplies
against clips/s the training step consumes; datamodule clips/s per worker count).

    python benchmarks/run_all.py                                  # everything but the slow ones
    python benchmarks/run_all.py --quick --only mfu loader_balance   # a smoke run
    python benchmarks/run_all.py --baseline benchmarks/results/before.json --out benchmarks/results/after.json
    python benchmarks/run_all.py --only mfu tokenizer_quality --device cuda --precision bf16-mixed
    python benchmarks/run_all.py --include-slow --timeout 4000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "benchmarks"

# name -> how to run it. quick: arguments for --quick (a script's own --quick where it has one);
# full: arguments always passed; slow_full: what --include-slow adds or removes; device: which of
# --device/--precision it takes; timeout: default seconds.
BENCHMARKS: dict[str, dict] = {
    "mfu": {"quick": ["--quick"], "device": ("--device", "--precision"), "timeout": 2400},
    "loader_balance": {"quick": ["--quick"], "timeout": 1200},
    "stage2_throughput": {"full": ["--backbone", "maskgit", "--backbone", "mebt"], "quick": ["--steps", "3"],
                          "timeout": 3600},
    "tokenizer_quality": {"full": ["--skip-quality"], "slow_drop": ["--skip-quality"],
                          "quick": ["--steps", "3", "--minutes", "2"],
                          "device": ("--device", "--precision"), "plot": "--plot", "timeout": 3600},
    "data_throughput": {"quick": ["--videos", "8", "--clips", "16", "--repeats", "1", "--source-size", "64",
                                  "--resolution", "32", "--batch-size", "4"], "timeout": 1800},
    "backbone_scaling": {"quick": ["--frames", "17", "--steps", "1"], "plot": "--plot", "timeout": 3600},
    "metrics_throughput": {"quick": ["--batch-size", "2", "--repeats", "1"], "device": ("--device",), "timeout": 1800},
    "allocator": {"quick": ["--steps", "4", "--window", "2"], "timeout": 3600},
    "text_to_video_quality": {"slow": True, "quick": ["--minutes", "10"], "timeout": 4 * 3600},
}


def discover() -> list[str]:
    """Every benchmark script in benchmarks/ (a new script runs too, with no extra arguments)."""
    names = [p.stem for p in sorted(HERE.glob("*.py")) if p.stem not in ("common", "run_all")]
    known = [n for n in BENCHMARKS if n in names]
    return known + [n for n in names if n not in BENCHMARKS]


def cpu_model() -> str:
    """The CPU's model name and its vector extensions: fractions of the roof from two machines do
    not compare (a 2-core VM here read a 176 GFLOP/s fp32 roof one day and ~330 on another)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    fields: dict[str, str] = {}
    for line in info.splitlines():  # the first CPU's entries
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name", "unknown")
    vector = sorted(f for f in fields.get("flags", "").split() if f.startswith(("avx512f", "amx", "avx2")))
    return f"{model} ({' '.join(vector)})" if vector else model


def command(name: str, args, json_out: Path) -> list[str]:
    spec = BENCHMARKS.get(name, {})
    extra = list(spec.get("full", []))
    if args.include_slow:
        extra = [a for a in extra if a not in spec.get("slow_drop", [])]
    if args.quick:
        extra += spec.get("quick", [])
    if "--device" in spec.get("device", ()) and args.device:
        extra += ["--device", args.device]
    if "--precision" in spec.get("device", ()) and args.precision:
        extra += ["--precision", args.precision]
    if "plot" in spec:
        extra += [spec["plot"], str(json_out.with_suffix(".png"))]
    extra += args.extra.get(name, [])
    return [sys.executable, str(HERE / f"{name}.py"), *extra, "--json-out", str(json_out)]


def run_one(name: str, args, results_dir: Path) -> dict:
    json_out = results_dir / f"{name}.json"
    json_out.unlink(missing_ok=True)
    cmd = command(name, args, json_out)
    timeout = args.timeout or BENCHMARKS.get(name, {}).get("timeout", 3600)
    log = results_dir / f"{name}.log"
    entry: dict = {"command": " ".join(cmd[1:]), "timeout_s": timeout, "log": str(log)}
    print(f"[run_all] {name}: {entry['command']}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        # Its own process group: a timeout ends the benchmark's worker processes too.
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            proc.wait(timeout=timeout)
            entry["returncode"] = proc.returncode
            entry["status"] = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            entry["status"] = "timed out"
            entry["error"] = f"timed out after {timeout:.0f} s; log tail:\n" + log.read_text()[-2000:]
        except BaseException:  # Ctrl-C: take the benchmark down with us
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    entry["seconds"] = round(time.perf_counter() - start, 1)
    if json_out.is_file():
        try:
            entry["result"] = json.loads(json_out.read_text())
        except json.JSONDecodeError as exc:
            entry["status"], entry["error"] = "failed", f"unreadable JSON: {exc}"
    elif entry["status"] == "ok":
        entry["status"], entry["error"] = "failed", "wrote no JSON"
    if entry["status"] != "ok":
        entry.setdefault("error", log.read_text()[-3000:] if log.is_file() else "")
    print(f"[run_all] {name}: {entry['status']} in {entry['seconds']} s", file=sys.stderr, flush=True)
    return entry


# -- summary -----------------------------------------------------------------------------------


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def summary_rows(benchmarks: dict) -> list[dict]:
    """One row per performance target: (benchmark, metric, value, target, 'min'|'max')."""
    r = {name: e.get("result") or {} for name, e in benchmarks.items()}
    rows = []

    def add(bench, metric, value, target=None, kind="min", unit="", group=None):
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return
        row = {"benchmark": bench, "metric": metric, "value": value, "unit": unit}
        if target is not None:
            row.update(target=target, kind=kind, met=bool(value >= target if kind == "min" else value <= target))
        if group:
            row["group"] = group
        rows.append(row)

    mfu = r.get("mfu", {})
    targets = {"tokenizer_recon": 0.75, "stage2_maskgit": 0.75, "stage2_mebt": 0.65, "sample_maskgit": 0.6}
    for name, value in (mfu.get("summary") or {}).items():
        if name == "tokenizer_gan_over_recon":
            add("mfu", name, value, 2.5, "max", "x")
        else:
            add("mfu", f"{name}_fraction_of_roof", value, targets.get(name), unit="of roof", group="roof")
    s2 = r.get("stage2_throughput", {})
    for run in s2.get("runs", []):
        target = {"maskgit": 0.75, "mebt": 0.65}.get(run.get("backbone")) if run.get("mode") == "train_tokens" else (
            0.6 if run.get("mode") == "sample" and run.get("backbone") == "maskgit" else None)
        add("stage2_throughput", f"{run.get('backbone')}_{run.get('mode')}_fraction_of_roof", run.get("fraction_of_roof"),
            target, unit="of roof", group="roof")
    for kind in ("maskgit", "mebt"):
        add("stage2_throughput", f"{kind}_token_shard_speedup", s2.get(f"{kind}_token_shard_speedup"), 5.0, unit="x")
    speed = r.get("tokenizer_quality", {}).get("speed", {})
    add("tokenizer_quality", "t1_recon_fraction_of_roof", speed.get("t1_recon_fraction_of_roof"), 0.75,
        unit="of roof", group="roof")
    add("tokenizer_quality", "t1_full_over_recon", speed.get("t1_full_over_recon"), 2.5, "max", "x")
    quality = r.get("tokenizer_quality", {}).get("quality", {})
    add("tokenizer_quality", "final_psnr_db", quality.get("final_psnr_db"), 28.0, unit="dB")
    lb = r.get("loader_balance", {})
    add("loader_balance", "supply_over_fastest_consume", lb.get("supply_over_fastest_consume"), 1.0, unit="x")
    add("loader_balance", "coupled_data_wait_fraction", _get(lb, "coupled_recon", "data_wait_fraction"), unit="of wall")
    dtp = r.get("data_throughput", {})
    for w, target in (("workers_1", 0.9), ("workers_2", 1.6)):
        add("data_throughput", f"float32_{w}_vs_raw_1thread", _get(dtp, "ratio_vs_raw_1thread", "float32", w), target, unit="x")
    bs = r.get("backbone_scaling", {})
    add("backbone_scaling", "mebt_per_token_time_growth", bs.get("mebt_per_token_time_growth"), 1.3, "max", "x")
    add("backbone_scaling", "mebt_per_token_memory_growth", bs.get("mebt_per_token_memory_growth"), 1.3, "max", "x")
    for key, value in bs.items():
        if key.startswith("at_") and isinstance(value, dict):
            add("backbone_scaling", f"{key}.memory_ratio_mebt_over_maskgit", value.get("memory_ratio_mebt_over_maskgit"), 0.25, "max", "x")
            add("backbone_scaling", f"{key}.step_time_ratio_mebt_over_maskgit", value.get("step_time_ratio_mebt_over_maskgit"), 1 / 3, "max", "x")
            add("backbone_scaling", f"{key}.sampling_speedup_mebt", value.get("sampling_speedup_mebt"), 3.0, unit="x")
    t2v = r.get("text_to_video_quality", {})
    add("text_to_video_quality", "seen_joint_accuracy", _get(t2v, "caption_accuracy", "seen", "joint"), 0.7)
    return rows


def with_baseline(rows: list[dict], baseline: dict | None) -> list[dict]:
    if not baseline:
        return rows
    before = {(row["benchmark"], row["metric"]): row["value"] for row in baseline.get("summary", [])}
    for row in rows:
        old = before.get((row["benchmark"], row["metric"]))
        if isinstance(old, (int, float)) and isinstance(row["value"], (int, float)):
            row["before"] = old
            row["change"] = round(row["value"] / old, 3) if old else None
    return rows


# -- plots -------------------------------------------------------------------------------------


def plot_roof(rows: list[dict], path: Path, title: str) -> bool:
    roof = [row for row in rows if row.get("group") == "roof"]
    if not roof:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row['benchmark']}\n{row['metric'].removesuffix('_fraction_of_roof')}" for row in roof]
    x = range(len(roof))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(roof) + 2), 4.2))
    has_before = any("before" in row for row in roof)
    width = 0.4 if has_before else 0.7
    if has_before:
        ax.bar([i - width / 2 for i in x], [100 * row.get("before", 0) for row in roof], width, color="0.7", label="before")
    bars = ax.bar([i + (width / 2 if has_before else 0) for i in x], [100 * row["value"] for row in roof], width,
                  color=["C2" if row.get("met") else "C0" for row in roof], label="now" if has_before else None)
    for bar, row in zip(bars, roof):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{100 * row['value']:.0f}%", ha="center",
                va="bottom", fontsize=8)
    for i, row in zip(x, roof):
        if "target" in row:
            ax.hlines(100 * row["target"], i - 0.45, i + 0.45, colors="C3", linestyles="--", lw=1.5,
                      label="target" if i == next(j for j, r in enumerate(roof) if "target" in r) else None)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set(ylabel="% of matmul roof", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_data(benchmarks: dict, path: Path) -> bool:
    lb = (benchmarks.get("loader_balance") or {}).get("result") or {}
    dtp = (benchmarks.get("data_throughput") or {}).get("result") or {}
    panels = []
    if lb.get("supply_clips_per_s") is not None:
        bars = {"loader supply": lb["supply_clips_per_s"]}
        for phase, c in (lb.get("consume") or {}).items():
            bars[f"step consumes\n({phase})"] = c["clips_per_s"]
        if "coupled_recon" in lb:
            bars["loader + step\ntogether"] = lb["coupled_recon"]["clips_per_s"]
        panels.append(("tokenizer demo: clips/s", bars))
    if dtp.get("datamodule_clips_per_s"):
        bars = {"raw decode\n1 thread": dtp.get("raw_decode_1thread_clips_per_s", 0)}
        for mode, per in dtp["datamodule_clips_per_s"].items():
            for w, v in per.items():
                bars[f"{mode}\n{w.replace('workers_', '')} workers"] = v
        panels.append(("VideoDataModule: clips/s", bars))
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    for ax, (title, bars) in zip(axes[0], panels):
        ax.bar(range(len(bars)), list(bars.values()), color=[f"C{i % 10}" for i in range(len(bars))])
        ax.set_xticks(range(len(bars)), list(bars), fontsize=7)
        ax.set(title=title, ylabel="clips/s", yscale="log")
        for i, v in enumerate(bars.values()):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- main --------------------------------------------------------------------------------------


def parse_extra(items: list[str]) -> dict[str, list[str]]:
    import shlex

    out: dict[str, list[str]] = {}
    for item in items:
        name, _, rest = item.partition("=")
        out.setdefault(name, []).extend(shlex.split(rest))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    available = discover()
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these (of: {', '.join(available)})")
    parser.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="leave these out")
    parser.add_argument("--quick", action="store_true", help="smoke sizes: each script's --quick, or few steps")
    parser.add_argument("--include-slow", action="store_true",
                        help="also run text_to_video_quality (~45 min) and tokenizer_quality's quality part (~20 min)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default: per benchmark)")
    parser.add_argument("--device", default=None, help="passed to the benchmarks that take --device (e.g. cuda)")
    parser.add_argument("--precision", default=None, help="passed to those that take --precision (e.g. bf16-mixed)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=ARGS",
                        help="more arguments for one benchmark, e.g. --extra 'mfu=--top-ops 20'")
    parser.add_argument("--baseline", type=Path, default=None, help="an earlier combined JSON: before/after figures")
    parser.add_argument("--results-dir", type=Path, default=None, help="per-benchmark JSON, logs, plots (default: beside --out)")
    parser.add_argument("--out", type=Path, default=HERE / "results/all.json", help="combined JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    args.extra = parse_extra(args.extra)
    unknown = [n for n in (args.only or []) + args.skip if n not in available]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available}")
    results_dir = args.results_dir or args.out.parent
    results_dir.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    chosen = args.only or available
    benchmarks: dict[str, dict] = {}
    for name in chosen:
        if name in args.skip:
            benchmarks[name] = {"status": "skipped", "reason": "--skip"}
        elif BENCHMARKS.get(name, {}).get("slow") and not args.include_slow and not args.only:
            benchmarks[name] = {"status": "skipped", "reason": "slow (tens of minutes); run with --include-slow"}
        else:
            benchmarks[name] = run_one(name, args, results_dir)
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    rows = with_baseline(summary_rows(benchmarks), baseline)
    title = f"{platform.node()}: {os.cpu_count()} CPUs{', ' + args.device if args.device else ''}{' (quick)' if args.quick else ''}"
    plots = []
    if plot_roof(rows, results_dir / "roof.png", title):
        plots.append(str(results_dir / "roof.png"))
    if plot_data(benchmarks, results_dir / "data.png"):
        plots.append(str(results_dir / "data.png"))
    for name, entry in benchmarks.items():
        png = results_dir / f"{name}.png"
        if entry.get("status") == "ok" and png.is_file():
            plots.append(str(png))
    combined = {
        "benchmark": "run_all",
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "cpu_model": cpu_model(),
                 "python": platform.python_version(), "platform": platform.platform()},
        "quick": args.quick, "include_slow": args.include_slow, "device": args.device, "precision": args.precision,
        "baseline": str(args.baseline) if args.baseline else None,
        "status": {name: e["status"] for name, e in benchmarks.items()},
        "summary": rows, "plots": plots, "benchmarks": benchmarks,
    }
    text = json.dumps(combined, indent=1)
    args.out.write_text(text)
    for row in rows:
        before = f" (before {row['before']})" if "before" in row else ""
        target = f"  target {'>=' if row['kind'] == 'min' else '<='} {row['target']:.3g}: {'met' if row['met'] else 'NOT met'}" if "target" in row else ""
        print(f"{row['benchmark']:>22} {row['metric']:<48} {row['value']}{before}{target}")
    print(f"wrote {args.out} and {len(plots)} plot(s) in {results_dir}")
    failed = [n for n, e in benchmarks.items() if e["status"] in ("failed", "timed out")]
    return 1 if failed and len(failed) == len([e for e in benchmarks.values() if e["status"] != "skipped"]) else 0


if __name__ == "__main__":
    sys.exit(main())
