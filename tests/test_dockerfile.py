"""No Docker engine runs here, so check the Dockerfile the way a build would use it: its base,
its install commands against the README's, and a real `pip install .` of its build context."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys

from tests.conftest import REPO


def readme_setup() -> list[str]:
    """The pip commands of the README's first command block."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S).group(1)
    return [c.strip() for c in re.split(r"&&|\n", block) if c.strip().startswith("pip install")]


def docker_runs() -> list[str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    runs = [line[4:] for line in text.splitlines() if line.startswith("RUN ")]
    return [c.strip() for run in runs for c in run.split("&&") if c.strip().startswith("pip install")]


def test_base_image_is_an_official_pytorch_cuda_runtime_with_the_pinned_torch():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    pinned = re.search(r'"torch==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert base.startswith(f"pytorch/pytorch:{pinned}-cuda") and base.endswith("-runtime"), base
    assert re.search(r'^ENTRYPOINT \["maskvid"\]', text, re.M)


def test_dockerfile_installs_like_the_readme():
    readme, docker = readme_setup(), docker_runs()
    assert readme and docker
    # Same steps in the same order; the image drops only the editable flag and the dev extra.
    normalise = lambda c: c.replace("-e ", "").replace('".[dev]"', ".").replace("'.[dev]'", ".")
    assert [normalise(c) for c in readme] == docker


def test_build_context_installs_the_package_and_entrypoint(tmp_path):
    ignore = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]

    def ignored(rel: str) -> bool:
        return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat.lstrip("*/")) or rel.split("/")[0] == pat
                   or any(part == pat.strip("*/") for part in rel.split("/")) for pat in ignore)

    ctx = tmp_path / "ctx"
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO).as_posix()
        if path.is_file() and not ignored(rel):
            (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, ctx / rel)
    assert (ctx / "configs").is_dir(), "configs must ship in the image (the CLI reads them)"
    target = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target", str(target), str(ctx)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for package in ["launch", "datamodules", "models", "lightning_modules", "metrics"]:
        assert (target / package / "__init__.py").exists(), package
    entry_points = next(target.glob("maskvid-*.dist-info")) / "entry_points.txt"
    assert "maskvid = launch.cli:main" in entry_points.read_text()
