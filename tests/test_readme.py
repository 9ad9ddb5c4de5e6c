"""The README cannot drift: its length, every path it names, and every cheap command it shows
(`--help` of each command, `--print_config` of each `maskvid fit` line) are checked here."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def code_lines() -> list[str]:
    """Shell lines of the README's bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def maskvid_commands() -> list[list[str]]:
    return [line.split()[1:] for line in code_lines() if line.startswith("maskvid ")]


def test_readme_is_a_newcomers_page():
    assert len(README.splitlines()) <= 250
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert blocks[0].strip().endswith("&& maskvid demo")
    assert blocks[1].strip().endswith("&& python -m pytest")
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1].strip() == blocks[1].strip()


def test_every_path_the_readme_names_exists():
    links = re.findall(r"\]\(([^)#\s]+)\)", README)
    backticked = re.findall(r"`((?:configs|docs|launch|models|lightning_modules|datamodules|metrics|benchmarks|tests)/[\w./-]+)`",
                            README)
    in_commands = [w for line in code_lines() for w in line.split()
                   if re.match(r"^(configs|launch|benchmarks)/[\w./-]+\.(yaml|sh|sbatch|py)$", w)]
    paths = {p for p in [*links, *backticked, *in_commands] if not p.startswith("http")}
    assert paths, "the README names no paths?"
    missing = sorted(p for p in paths if "<" not in p and not (REPO / p).exists())
    assert not missing, missing


def test_every_readme_command_explains_itself():
    """`--help` for every `maskvid` command the README shows, and `--print_config` for every
    `maskvid fit` line (the layered configs must parse), in one interpreter."""
    commands = maskvid_commands()
    helps = sorted({tuple(c[: 2 if c[0] in ("data", "ckpt", "eval") else 1]) for c in commands})
    fits = [c for c in commands if c[0] == "fit"]
    assert ("generate",) in helps and ("plan",) in helps and fits
    script = r"""
import contextlib, io, json, sys
from maskvid.launch.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(argv)
    except SystemExit as e:
        code = e.code or 0
    results.append([argv, code, out.getvalue()])
print(json.dumps(results))
"""
    runs = [[*h, "--help"] for h in helps]
    runs += [[*(f[: f.index("--print_config")] if "--print_config" in f else f), "--print_config"] for f in fits]
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(runs)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for argv, code, out in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert code == 0, (argv, out[-2000:])
        if argv[-1] == "--print_config":
            assert "model:" in out and "trainer:" in out, argv
        else:
            assert "usage:" in out.lower(), argv


@pytest.mark.parametrize("doc", sorted(p.name for p in (REPO / "docs").glob("*.md")))
def test_docs_links_resolve(doc):
    text = (REPO / "docs" / doc).read_text()
    missing = [p for p in re.findall(r"\]\(([^)#\s]+)\)", text)
               if not p.startswith("http") and not ((REPO / "docs" / p).exists() or (REPO / p).exists())]
    assert not missing, missing


def test_checkpoint_paths_in_readme_and_docs_are_where_the_configs_write():
    """`runs/<recipe>/.../*.ckpt` in the README or docs/ must sit in the directory that recipe's
    ModelCheckpoint writes to (an example once pointed at lightning_logs/version_0/)."""
    from maskvid.launch.config_includes import merged_config

    dirpaths = {}
    for config in sorted((REPO / "configs/experiment").glob("*.yaml")):
        trainer = merged_config(config).get("trainer", {})
        root = trainer.get("default_root_dir")
        for callback in trainer.get("callbacks") or []:
            path = (callback.get("init_args") or {}).get("dirpath") if isinstance(callback, dict) else None
            if root and path:
                dirpaths.setdefault(root, set()).add(path)
    assert dirpaths.get("runs/tokenizer_demo") == {"runs/tokenizer_demo/checkpoints"}, dirpaths
    texts = {"README.md": README, **{f"docs/{p.name}": p.read_text() for p in (REPO / "docs").glob("*.md")}}
    wrong = []
    for name, text in texts.items():
        for path in re.findall(r"(runs/[\w-]+/[\w./=-]*\.ckpt)\b", text):
            root = "/".join(path.split("/")[:2])
            if root in dirpaths and path.rsplit("/", 1)[0] not in dirpaths[root]:
                wrong.append((name, path))
    assert not wrong, wrong
