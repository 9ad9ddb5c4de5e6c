"""No Docker engine runs here, so check the Dockerfile the way a build would use it: its base,
its layers (dependencies before the source), its install commands against the README's and
pyproject.toml, no preloaded allocator, and a real `pip install .` of its build context."""

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


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def docker_runs() -> list[str]:
    """The pip commands of the RUN instructions, in order."""
    runs = [rest for word, rest in instructions() if word == "RUN"]
    return [c.strip() for run in runs for c in run.split("&&") if c.strip().startswith("pip install")]


def test_base_image_is_an_official_pytorch_cuda_devel_image_with_the_pinned_torch():
    """A devel image (nvcc, CUDA headers): DeepSpeed builds its CUDA ops in it."""
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    pinned = re.search(r"^torch==([\d.]+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert base.startswith(f"pytorch/pytorch:{pinned}-cuda") and base.endswith("-devel"), base
    assert re.search(r'^ENTRYPOINT \["maskvid"\]', text, re.M)


def test_no_allocator_is_preloaded_in_the_image():
    """GPU runs use the system's malloc; host CPU tuning is opt-in (launch/cpu_tuning.py)."""
    for word, rest in instructions():
        assert "LD_PRELOAD" not in rest and "tcmalloc" not in rest and "jemalloc" not in rest, (word, rest)
        assert "MASKVID_CPU_TUNING" not in rest and "MASKVID_ALLOCATOR" not in rest, (word, rest)


def test_dependencies_are_installed_before_the_source_is_copied():
    """Layer caching: the dependency layer depends on pyproject.toml and the lock only, so editing the source
    rebuilds just the last layers."""
    steps = instructions()
    copies = [i for i, (word, _) in enumerate(steps) if word == "COPY"]
    whole = [i for i in copies if steps[i][1].split()[0] == "."]
    assert len(whole) == 1, steps
    before = [steps[i][1].split()[:-1] for i in copies if i < whole[0]]
    assert before and all(sources == ["pyproject.toml", "constraints.txt"] for sources in before), before
    dependency_runs = [rest for word, rest in steps[:whole[0]] if word == "RUN"]
    assert any("pip install -c constraints.txt -r" in r and "pyproject.toml" in r and "dependencies" in r for r in dependency_runs)
    package_runs = [rest for word, rest in steps[whole[0]:] if word == "RUN"]
    assert package_runs == ["pip install --no-deps ."], package_runs


def test_dockerfile_installs_like_the_readme(tmp_path):
    """The README's torch pin first; then pyproject.toml's dependencies with the DeepSpeed and demo
    extras, under the README's lock (the command the image runs, executed here on the real file);
    then the package itself."""
    readme, docker = readme_setup(), docker_runs()
    assert readme and docker
    assert docker[0] == readme[0] == "pip install torch==2.13.0"
    assert readme[1:] == ['pip install -c constraints.txt -e ".[demo]"']
    assert docker[1:] == ["pip install -c constraints.txt -r /tmp/requirements.txt", "pip install --no-deps ."]
    (run,) = [rest for word, rest in instructions() if word == "RUN" and "requirements.txt" in rest]
    (generate,) = [c.strip() for c in run.split("&&") if c.strip().startswith("python -c")]
    command = generate.replace("/tmp/requirements.txt", str(tmp_path / "req.txt"))
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    subprocess.run(command.replace("python -c", f"{sys.executable} -c", 1), shell=True, cwd=tmp_path, check=True)
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    expected = project["dependencies"] + project["optional-dependencies"]["deepspeed"] + project["optional-dependencies"]["demo"]
    assert (tmp_path / "req.txt").read_text().split("\n")[:-1] == expected


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
    for package in ["launch", "datamodules", "models", "lightning_modules", "metrics", "configs"]:
        assert (target / "maskvid" / package / "__init__.py").exists(), package
    assert (target / "maskvid/configs/experiment/mebt_demo.yaml").is_file()
    entry_points = next(target.glob("maskvid-*.dist-info")) / "entry_points.txt"
    assert "maskvid = maskvid.launch.cli:main" in entry_points.read_text()
