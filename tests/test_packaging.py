"""The wheel installs one import namespace, `maskvid`, with the configs and launch scripts inside."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("maskvid-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_has_one_top_level_name(wheel):
    names = wheel.namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"maskvid"}, sorted(top)
    assert (next(n for n in names if n.endswith("top_level.txt")) and
            wheel.read(next(n for n in names if n.endswith("top_level.txt"))).decode().split() == ["maskvid"])
    for package in ["models", "lightning_modules", "datamodules", "metrics", "launch", "configs"]:
        assert f"maskvid/{package}/__init__.py" in names, package
    assert "maskvid/configs/experiment/mebt_demo.yaml" in names
    assert "maskvid/launch/slurm/stage2.sbatch" in names
    assert not any(n.startswith(("maskvid/tests", "maskvid/benchmarks", "tests/", "benchmarks/")) for n in names)


def test_wheel_entry_point_is_the_maskvid_cli(wheel):
    (entry,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    assert "maskvid = maskvid.launch.cli:main" in wheel.read(entry).decode()


def test_shipped_configs_name_maskvid_classes():
    """Every class_path in the shipped configs is importable under the maskvid namespace."""
    import importlib

    import yaml

    def class_paths(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "class_path" and isinstance(v, str):
                    yield v
                else:
                    yield from class_paths(v)
        elif isinstance(node, list):
            for v in node:
                yield from class_paths(v)

    seen = set()
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        for cp in class_paths(yaml.safe_load(path.read_text())):
            seen.add(cp)
            module, _, name = cp.rpartition(".")
            if module.split(".")[0] in ("lightning", "torch", "transformers"):
                continue
            assert module.startswith("maskvid."), (path.name, cp)
            assert hasattr(importlib.import_module(module), name), (path.name, cp)
    assert "maskvid.models.mebt.MeBT" in seen
