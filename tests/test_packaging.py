"""setup.py declares every third-party package that the product (pipeline/, transforms/,
trainer/) imports, so that `pip install .` and Dataflow's `--setup_file` workers get them."""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRODUCT_PACKAGES = ("common", "pipeline", "transforms", "trainer")
# The Airflow DAG runs in Airflow's own environment, with the pins of
# pipeline/dags/requirements-airflow.txt (checked by tests/test_dag.py), not setup.py's.
AIRFLOW_DAGS = ROOT / "pipeline" / "dags"


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): apache_beam -> apache-beam."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_requirements() -> set[str]:
    """Canonical names in setup.py's REQUIRED (read from its source, not the installed metadata,
    which lags until the next `pip install`)."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "REQUIRED" for target in node.targets
        ):
            specs = ast.literal_eval(node.value)
            return {canonical(re.match(r"[A-Za-z0-9._-]+", spec).group()) for spec in specs}
    raise AssertionError("setup.py has no REQUIRED list")


def imported_top_level_modules() -> dict[str, list[str]]:
    """{top-level module: [files importing it]} over every absolute import in the product,
    including imports inside functions."""
    found: dict[str, list[str]] = {}
    for package in PRODUCT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if AIRFLOW_DAGS in path.parents:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], []).append(str(path.relative_to(ROOT)))
    return found


def test_the_dags_imports_come_from_their_own_requirements():
    """The DAG imports only Airflow (whose pins are in its requirements file) and the stdlib."""
    pinned = (AIRFLOW_DAGS / "requirements-airflow.txt").read_text(encoding="utf-8")
    assert "apache-airflow==" in pinned
    for path in AIRFLOW_DAGS.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top = node.module.split(".")[0]
            elif isinstance(node, ast.Import):
                top = node.names[0].name.split(".")[0]
            else:
                continue
            assert top in ("airflow", "__future__") or top in sys.stdlib_module_names, (
                f"{path.name} imports {top}, which Airflow's environment may not have"
            )


def third_party(modules: dict[str, list[str]]) -> dict[str, list[str]]:
    local = set(PRODUCT_PACKAGES) | {"__future__"}
    return {
        name: files
        for name, files in modules.items()
        if name not in local and name not in sys.stdlib_module_names
    }


def test_finds_the_product_imports():
    # Guards the parser: a test that found nothing would pass whatever setup.py says.
    modules = third_party(imported_top_level_modules())
    assert {"apache_beam", "tensorflow", "tensorflow_transform", "numpy", "orjson"} <= set(modules)


def test_every_imported_package_is_declared_in_setup_py():
    declared = declared_requirements()
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for module, files in sorted(third_party(imported_top_level_modules()).items()):
        providers = {canonical(dist) for dist in distributions.get(module, [])}
        if not providers:
            problems.append(f"{module} (imported by {files[0]}) is not installed")
        elif not providers & declared:
            problems.append(
                f"{module} (imported by {files[0]}) comes from {sorted(providers)}, "
                "which setup.py's REQUIRED does not declare"
            )
    assert not problems, "\n".join(problems)
