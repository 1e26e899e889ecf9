"""The house's layers, checked from the imports: arrows only run downward, and no module imports
one of a room above it (README, Layout).

Layers, bottom first; a module may import only its own room and the rooms below it:

    common, transforms            file and CLI helpers; the preprocessing/training contract
    trainer.core                  the objective, kernels, plans, fold-in, top-k, metrics
    trainer.serving               the trained model, its files, prediction formats, export
    trainer.local, trainer.beam   the two execution modes (neither imports the other)
    trainer.evaluation            new visitors, the quality gate
    trainer (entry points)        trainer.task, trainer.batch_predict, trainer.show
    pipeline                      preprocessing and the scheduled run (the composition root)
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("common", "transforms", "trainer", "pipeline")

# room -> the rooms it may import (besides itself).
ALLOWED = {
    "common": set(),
    "transforms": {"common"},
    "trainer.core": {"common", "transforms"},
    "trainer.serving": {"common", "transforms", "trainer.core"},
    "trainer.local": {"common", "transforms", "trainer.core", "trainer.serving"},
    "trainer.beam": {"common", "transforms", "trainer.core", "trainer.serving"},
    "trainer.evaluation": {
        "common",
        "transforms",
        "trainer.core",
        "trainer.serving",
        "trainer.local",
        "trainer.beam",
    },
    "trainer": {
        "common",
        "transforms",
        "trainer.core",
        "trainer.serving",
        "trainer.local",
        "trainer.beam",
        "trainer.evaluation",
    },
    "pipeline": {
        "common",
        "transforms",
        "trainer",
        "trainer.core",
        "trainer.serving",
        "trainer.local",
        "trainer.beam",
        "trainer.evaluation",
    },
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str | None:
    if module.split(".")[0] not in PACKAGES:
        return None
    parts = module.split(".")
    if parts[0] == "trainer" and len(parts) >= 2 and f"trainer.{parts[1]}" in ALLOWED:
        return f"trainer.{parts[1]}"  # a room; trainer.task and the like are entry points
    return parts[0]


def _imports(path: pathlib.Path) -> list[str]:
    """Every module a file imports, at any depth (lazy imports in functions included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _product_files() -> list[pathlib.Path]:
    files = []
    for package in PACKAGES:
        files += [p for p in (ROOT / package).rglob("*.py") if "dags" not in p.parts]
    return files


def test_rooms_import_only_downward():
    wrong = []
    for path in _product_files():
        here = _room(_module_name(path))
        for name in _imports(path):
            there = _room(name)
            # "from trainer import task" names trainer.task, an entry point of room "trainer".
            if there is None or there == here:
                continue
            if there not in ALLOWED[here]:
                wrong.append(f"{_module_name(path)} -> {name}")
    assert not wrong, "imports that run upward or sideways:\n" + "\n".join(sorted(set(wrong)))


def test_no_module_import_cycles():
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p) for p in _product_files()}
    for path in _product_files():
        deps = set()
        for name in _imports(path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != _module_name(path) and name not in PACKAGES:
                deps.add(name)
        graph[_module_name(path)] = deps
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    "module",
    ["trainer.core.objective", "trainer.core.sides", "common.cli", "pipeline.options"],
)
def test_light_modules_do_not_load_tensorflow(module):
    """Parsing flags and building a config must not cost TensorFlow's import (seconds)."""
    if not (ROOT / (module.replace(".", "/") + ".py")).exists():
        pytest.skip(f"{module} does not exist")
    code = f"import sys, {module}; print('tensorflow' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_importing_the_kernels_leaves_xla_flags_alone():
    code = (
        "import os; os.environ.pop('XLA_FLAGS', None); import trainer.core.solver; "
        "print(os.environ.get('XLA_FLAGS'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "None"


def test_product_modules_stay_small():
    """A module over about 400 lines holds more than one thing (issue: one house)."""
    big = {
        str(p.relative_to(ROOT)): n
        for p in _product_files()
        if (n := len(p.read_text().splitlines())) > 420
    }
    assert not big, f"modules over 420 lines: {big}"
