"""dvc.yaml's code deps are each stage's real import closure: editing any module a stage runs
makes `dvc status` show that stage (and everything after it) as changed."""

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PACKAGE = "pipeline"


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def module_file(name: str) -> Path | None:
    """``pipeline.model.networks`` -> pipeline/model/networks.py (or a package's __init__.py); None outside the package."""
    if name != PACKAGE and not name.startswith(f"{PACKAGE}."):
        return None
    path = REPO / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """The package's modules ``path`` imports, at any depth of the file (lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pipeline import models`
    return {name for name in names if module_file(name)}


def import_closure(module: str) -> set[Path]:
    """Every file of the package that running ``python -m module`` executes, __init__.py included."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for prefix in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):  # parent packages run first
            path = module_file(prefix)
            if path and path not in seen:
                seen.add(path)
                todo += sorted(imported_modules(path))
    return seen


def stage_module(cmd: str) -> str:
    match = re.fullmatch(rf"python -m ({PACKAGE}(?:\.\w+)+)", cmd.strip())
    assert match, f"stage command {cmd!r} is not `python -m {PACKAGE}.<stage>`"
    return match.group(1)


def code_deps(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if d.startswith(f"{PACKAGE}/") and d.endswith(".py")}


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_deps_are_its_import_closure(name):
    stage = stages()[name]
    needed = {str(p.relative_to(REPO)) for p in import_closure(stage_module(stage["cmd"]))}
    listed = code_deps(stage)
    assert not needed - listed, f"dvc.yaml stage '{name}' runs but does not depend on {sorted(needed - listed)}"
    assert not listed - needed, f"dvc.yaml stage '{name}' depends on code it never runs: {sorted(listed - needed)}"


def test_closure_follows_lazy_and_from_imports():
    closure = {str(p.relative_to(REPO)) for p in import_closure("pipeline.stages.evaluate")}
    # evaluate -> models -> config -> backbones; pipeline/__init__.py runs before any module of it.
    assert {
        "pipeline/__init__.py",
        "pipeline/stages/evaluate.py",
        "pipeline/model/networks.py",
        "pipeline/config.py",
        "pipeline/model/backbones.py",
    } <= closure


def stage_outputs() -> set[str]:
    paths = set()
    for stage in stages().values():
        for entry in [*stage.get("outs", []), *stage.get("metrics", [])]:
            paths.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths


def test_every_output_path_has_its_one_home_in_paths_py():
    from pipeline import paths

    homes = {str(value) for name, value in vars(paths).items() if name.isupper() and isinstance(value, Path)}
    assert not stage_outputs() - homes, (
        f"outputs in dvc.yaml without a constant in pipeline/paths.py: {sorted(stage_outputs() - homes)}"
    )
