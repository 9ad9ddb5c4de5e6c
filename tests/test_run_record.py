"""summary.json's `machine` (read from the host) and `fits` (steps run, steps planned, why it stopped,
from each fit's last checkpoint and command line)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import torch

from maskvid.launch.run_record import CPU_FLAGS, fit_record, machine, planned_max_steps


def test_machine_names_the_cpu_and_its_flags_as_the_host_reports_them():
    info = machine()
    text = Path("/proc/cpuinfo").read_text()
    model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    flags = set(next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")))
    assert info["cpu"] == model
    assert info["cpu_flags"] == [f for f in CPU_FLAGS if f in flags]
    assert info["cores"] == os.cpu_count() and info["torch"] == torch.__version__
    assert info["gpus"] == ([] if not torch.cuda.is_available() else info["gpus"])


def test_planned_steps_follow_the_cli_order(tmp_path):
    base, override = tmp_path / "base.yaml", tmp_path / "more.yaml"
    base.write_text("trainer:\n  max_steps: 300\n")
    override.write_text("model:\n  init_args: {}\n")
    command = shlex.join(["maskvid", "fit", "--config", str(base), "--config", str(override)])
    assert planned_max_steps(command) == 300
    assert planned_max_steps(command + " --trainer.max_steps 40") == 40
    assert planned_max_steps("maskvid fit --trainer.max_steps 5 --config " + str(base)) == 300  # the last wins


def checkpoint(path: Path, step: int, schedule: dict | None = None) -> Path:
    torch.save({"global_step": step, "callbacks": {"FitScheduleToTime": schedule} if schedule else {}}, path)
    return path


def test_why_a_fit_stopped(tmp_path):
    command = "maskvid fit --trainer.max_steps 100"
    assert fit_record(checkpoint(tmp_path / "a.ckpt", 100), command, budgeted=True) == {
        "steps": 100, "max_steps": 100, "stop": "reached max_steps"}
    cut = fit_record(checkpoint(tmp_path / "b.ckpt", 60, {"original_max_steps": 100, "max_steps": 60}), command, True)
    assert cut["steps"] == 60 and cut["max_steps"] == 100 and "shortened from 100 to 60" in cut["stop"]
    late = fit_record(checkpoint(tmp_path / "c.ckpt", 40), command, budgeted=True)
    assert late["steps"] == 40 and "max_time ran out" in late["stop"]
    assert "interrupted" in fit_record(checkpoint(tmp_path / "d.ckpt", 40), command, budgeted=False)["stop"]
    assert fit_record(tmp_path / "none.ckpt", command, True)["steps"] is None
