"""Import layering, read from the source (AST), so it holds for imports inside functions too:
`maskvid.models` imports nothing of maskvid but itself, and neither `maskvid.lightning_modules` nor
the Python API (`maskvid/*.py`) reaches `maskvid.launch`, directly or through any chain of imports.
Checkpointing, compile and sharding reach the modules through the trainer's strategy; the networks
know no training code."""

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


def package_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file for every module of the installed package (folders map as pyproject says)."""
    modules = {}
    folders = ("maskvid", "models", "lightning_modules", "datamodules", "metrics", "launch", "configs")
    for path in sorted(p for folder in folders for p in (root / folder).rglob("*.py")):
        rel = path.relative_to(root)
        parts = list(rel.with_suffix("").parts)
        if parts[0] != "maskvid":
            parts.insert(0, "maskvid")
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_chain(start: str, forbidden: str, root: Path = REPO) -> list[str] | None:
    """A chain of maskvid modules from `start` to one under `forbidden` (following every import,
    at module level or inside functions), or None."""
    modules = package_modules(root)

    def edges(name: str) -> list[str]:
        path = modules[name]
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out = []
        for imported in imported_modules(path.read_text(), package):
            # `from maskvid.x import y` names maskvid.x.y when y is a module, else maskvid.x.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported.startswith("maskvid.") and imported != name:
                out.append(imported)
        return out

    seen, stack = {start: [start]}, [start]
    while stack:
        name = stack.pop()
        for nxt in edges(name):
            if nxt in seen:
                continue
            seen[nxt] = seen[name] + [nxt]
            if nxt == forbidden or nxt.startswith(forbidden + "."):
                return seen[nxt]
            stack.append(nxt)
    return None


def test_lightning_modules_import_nothing_from_launch():
    assert forbidden_imports("lightning_modules", ("maskvid.launch",)) == []


def test_models_import_neither_launch_nor_lightning_modules():
    assert forbidden_imports("models", ("maskvid.launch", "maskvid.lightning_modules")) == []


def test_models_import_nothing_of_maskvid_but_models():
    bad = []
    for path in sorted((REPO / "models").glob("*.py")):
        bad += [(path.name, n) for n in imported_modules(path.read_text(), "maskvid.models")
                if n.startswith("maskvid.") and not n.startswith("maskvid.models")]
    assert bad == []


@pytest.mark.parametrize("layer", ["models", "lightning_modules", "datamodules", "metrics", "api"])
def test_no_chain_of_imports_reaches_the_launcher(layer):
    modules = package_modules(REPO)
    if layer == "api":
        starts = [n for n, p in modules.items() if p.parent == REPO / "maskvid"]
    else:
        starts = [n for n in modules if n.startswith(f"maskvid.{layer}.")]
    assert starts
    chains = [chain for s in starts if (chain := import_chain(s, "maskvid.launch")) is not None]
    assert chains == []


def test_the_chain_check_follows_imports_inside_functions_through_other_layers(tmp_path):
    # The shape of a real past defect: a model loader -> the API -> the launcher, all lazy imports.
    (tmp_path / "models").mkdir()
    (tmp_path / "maskvid").mkdir()
    (tmp_path / "launch").mkdir()
    (tmp_path / "models" / "loader.py").write_text("def load():\n    from maskvid.video_tokenizer import VideoTokenizer\n")
    (tmp_path / "maskvid" / "video_tokenizer.py").write_text(
        "class VideoTokenizer:\n    def read(self):\n        from maskvid.launch.files import read\n")
    (tmp_path / "launch" / "files.py").write_text("def read(): ...\n")
    assert import_chain("maskvid.models.loader", "maskvid.launch", tmp_path) == [
        "maskvid.models.loader", "maskvid.video_tokenizer", "maskvid.launch.files"]


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
