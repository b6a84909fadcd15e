"""The package layout's import rules (README "Architecture"), read from the source with ``ast``:

- ``steering_vectors`` imports nothing of the project (it is the reusable core);
- ``basemodel`` (model provisioning and loading) imports only ``steering_vectors``;
- ``server`` and ``training`` never import each other (nor the console script);
- only ``steerserve`` (the console script) composes them.

Imports inside functions count as much as those at the top: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"basemodel", "server", "steering_vectors", "steerserve", "training", "bench", "tests"}
ALLOWED = {
    "steering_vectors": set(),
    "basemodel": {"steering_vectors"},
    "server": {"steering_vectors", "basemodel"},
    "training": {"steering_vectors", "basemodel"},
    "steerserve": {"steering_vectors", "basemodel", "server", "training"},
}


def project_imports(path: Path, package: str) -> set[str]:
    """Top-level project packages that ``path`` (a module of ``package``) imports, lazily or not."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(package if node.level else (node.module or "").split(".")[0])
    return (found & PROJECT) - {package}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_follow_the_layout(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    wrong = {
        str(f.relative_to(ROOT)): sorted(bad)
        for f in files
        if (bad := project_imports(f, package) - ALLOWED[package])
    }
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}; found {wrong}"


def test_the_rule_reader_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from . import x\ndef f():\n    import training.cli\n    from server.app import y\n")
    assert project_imports(module, "server") == {"training"}


def test_importing_the_packages_has_no_side_effects() -> None:
    """Importing the library packages configures no logging and loads neither server nor training."""
    code = (
        "import logging, sys\n"
        "before = {n: list(l.filters) for n, l in logging.root.manager.loggerDict.items()"
        " if isinstance(l, logging.Logger)}\n"
        "import steering_vectors, basemodel\n"
        "after = {n: list(l.filters) for n, l in logging.root.manager.loggerDict.items()"
        " if isinstance(l, logging.Logger)}\n"
        "changed = [n for n, f in after.items() if f and f != before.get(n, [])]\n"
        "assert not changed, changed\n"
        "assert not logging.root.handlers, logging.root.handlers\n"
        "assert 'server' not in sys.modules and 'training' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
