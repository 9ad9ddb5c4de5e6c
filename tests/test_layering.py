"""Import layering, read from the source (AST), so it holds for imports inside functions too:
`maskvid.models` imports neither `maskvid.launch` nor `maskvid.lightning_modules`, and
`maskvid.lightning_modules` imports nothing from `maskvid.launch`. Checkpointing, compile and
sharding reach the modules through the trainer's strategy; the networks know no training code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO


def imported_modules(source: str, package: str) -> list[str]:
    """Every module an `import` or `from ... import` in `source` names, relative imports resolved
    against `package` (the dotted package of the file)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
                # `from .. import launch` names the module in the imported names.
                if not node.module:
                    found.extend(f"{base}.{alias.name}" for alias in node.names)
                    continue
            found.append(base)
    return found


def forbidden_imports(folder: str, forbidden: tuple[str, ...]) -> list[tuple[str, str]]:
    bad = []
    for path in sorted((REPO / folder).glob("*.py")):
        for name in imported_modules(path.read_text(), f"maskvid.{folder}"):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append((path.name, name))
    return bad


def test_lightning_modules_import_nothing_from_launch():
    assert forbidden_imports("lightning_modules", ("maskvid.launch",)) == []


def test_models_import_neither_launch_nor_lightning_modules():
    assert forbidden_imports("models", ("maskvid.launch", "maskvid.lightning_modules")) == []


@pytest.mark.parametrize("line", [
    "import maskvid.launch.strategies",
    "from maskvid.lightning_modules.ema import EMA",
    "from ..launch import strategies",
    "from .. import lightning_modules",
    "def f():\n    from maskvid.launch.checkpoints import verify_checkpoint",
])
def test_the_check_sees_every_form_of_a_forbidden_import(line, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "bad.py").write_text(line + "\n")
    (tmp_path / "models" / "good.py").write_text("import torch\nfrom maskvid.models.config import instantiate\n")
    monkeypatch.setattr("tests.test_layering.REPO", Path(tmp_path))
    assert [path for path, _ in forbidden_imports("models", ("maskvid.launch", "maskvid.lightning_modules"))] == ["bad.py"]
