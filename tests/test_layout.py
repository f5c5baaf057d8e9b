"""The package's imports run one way: the engine below, the applications above (function-level imports too)."""

from __future__ import annotations

import ast
from pathlib import Path

import dynalora

ROOT = Path(dynalora.__file__).parent
# a part may import from the parts on its own level or below, never above
LEVELS = {
    "errors": 0, "config": 0, "distributed": 0, "schedules": 0,  # the engine: plain parts
    "adapters": 1, "optim": 1, "data": 1,
    "cost": 2, "importance": 2, "checkpointing": 2, "models": 2, "metering": 2,
    "allocators": 3, "methods": 3,
    "controller": 4, "analysis": 4,  # the engine's face; reading what runs wrote
    "integrations": 5,  # dynalora inside Trainer: attach()
    "training": 6,  # dynalora train, on Trainer through attach()
    "cli": 7, "__init__": 7, "__main__": 8,
}  # fmt: skip


def _part(module: str) -> str:
    """``dynalora.training.engine`` -> ``training``."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> set[str]:
    """Every dynalora module ``path`` imports, at any depth of its code (not for type checkers only)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "dynalora":  # from dynalora import distributed
            found |= {f"dynalora.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dynalora"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dynalora")}
    return found


def test_no_import_runs_up_a_level():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        module = "dynalora." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        here = _part(module.removesuffix(".__init__") if path.name == "__init__.py" and path.parent != ROOT else module)
        assert here in LEVELS, f"{path}: a new part of the package; give it a level in LEVELS"
        for imported in _imports(path):
            there = _part(imported)
            if there != here and LEVELS[there] >= LEVELS[here]:
                upward.append(f"{module} -> {imported}")
    assert not upward, "imports that run up (or sideways across parts of one level):\n" + "\n".join(upward)
