"""`maskvid` explains itself: top-level help, every command's help, and clean errors."""

from __future__ import annotations

import pytest

from maskvid.launch.cli import LIGHTNING_COMMANDS, TOOL_COMMANDS, main
from tests.conftest import REPO, run_cli


def tool_paths() -> list[list[str]]:
    paths = []
    for name, entry in TOOL_COMMANDS.items():
        if isinstance(entry, dict):
            paths += [[name, sub] for sub in entry]
        else:
            paths.append([name])
    return paths


def test_top_level_help_lists_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in [*LIGHTNING_COMMANDS, *TOOL_COMMANDS]:
        assert f"    {name}" in out.stdout, name
    assert "examples:" in out.stdout


@pytest.mark.parametrize("path", tool_paths(), ids=lambda p: " ".join(p))
def test_each_tool_help_explains_itself(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text.lower(), text
    assert len(text.splitlines()) > 8


def test_group_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    text = capsys.readouterr().out
    for sub in TOOL_COMMANDS["data"]:
        assert sub in text


def test_fit_help_shows_documented_data_options():
    out = run_cli("fit", "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--data.train_shards" in out.stdout
    assert "brace pattern" in out.stdout  # the argument docstring reaches --help
    assert "--trainer.max_steps" in out.stdout


def test_unknown_command_and_missing_input_fail_cleanly():
    assert run_cli("frobnicate").returncode == 2
    out = run_cli("data", "preview")
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no train shards" in lines[0], out.stderr


def test_tool_commands_start_without_lightning():
    """`maskvid data ...` must not pay Lightning's import time; only the LightningCLI commands do."""
    import subprocess
    import sys

    code = "import sys; from maskvid.launch.cli import build_parser; build_parser(); print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO))
    assert out.stdout.strip() == "False", out.stderr
