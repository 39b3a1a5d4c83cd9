"""The house plan of ../shared/design.md, held by the code: sizes, layers, one teacher step.

Read from the source with ``ast`` (nothing is imported): every function of the package and the
integrations within 60 lines and every module within 400, outside kernel code (Triton kernels
and their launch module); the library never imports the application wing; no module imports
another module's private name; the teacher switch lives in ``neco_loss/teacher_step.py`` only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SOURCES = sorted(
    path
    for folder in ("neco_loss", "integrations")
    for path in (ROOT / folder).rglob("*.py")
    if "build" not in path.parts
)
KERNEL_CODE = {"neco_loss/sorting/kernels/triton_sort.py"}  # Triton kernels and their launches
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400
TEACHER_MODULE = "neco_loss/teacher_step.py"


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported_modules(module: ast.Module) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``import`` and ``from ... import`` at any depth."""
    found = []
    for node in ast.walk(module):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return found


def test_the_sources_are_found():
    names = {relative(path) for path in SOURCES}
    assert {TEACHER_MODULE, "neco_loss/app/cli.py", "neco_loss/loss.py"} <= names
    assert KERNEL_CODE <= names


@pytest.mark.parametrize("path", SOURCES, ids=relative)
def test_functions_and_files_are_small(path):
    if relative(path) in KERNEL_CODE:
        pytest.skip("kernel code")
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{relative(path)} has {lines} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree(path))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{relative(path)}: {long}"


def test_the_library_never_imports_the_application():
    offenders = [
        f"{relative(path)} imports {module}"
        for path in SOURCES
        if not relative(path).startswith("neco_loss/app/")
        for module, names in imported_modules(tree(path))
        if module == "neco_loss.app"
        or module.startswith("neco_loss.app.")
        or (module == "neco_loss" and "app" in names)
    ]
    assert not offenders


def test_no_module_imports_a_private_name_of_another():
    offenders = [
        f"{relative(path)}: from {module} import {name}"
        for path in SOURCES
        for module, names in imported_modules(tree(path))
        if module.startswith("neco_loss")
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not offenders


def compares_teacher_mode(node: ast.AST) -> bool:
    """``teacher == "ema"``, ``self.teacher != "student"`` and the like."""
    if not isinstance(node, ast.Compare):
        return False
    sides = [node.left, *node.comparators]
    names = {
        side.id if isinstance(side, ast.Name) else side.attr
        for side in sides
        if isinstance(side, ast.Name | ast.Attribute)
    }
    strings = {side.value for side in sides if isinstance(side, ast.Constant)}
    return bool(names & {"teacher"}) and bool(strings & {"ema", "student", "student_detached"})


def test_the_teacher_switch_lives_in_one_core_module():
    switches = {
        relative(path)
        for path in SOURCES
        if any(compares_teacher_mode(node) for node in ast.walk(tree(path)))
    }
    assert switches == {TEACHER_MODULE}
