"""The kernel layer: one device -> kernel choice, one numbering of relaxations shared with the
C++ source, and sorting that knows nothing of losses."""

import ast
import re
from pathlib import Path

import pytest
import torch

import neco_loss
from neco_loss.sorting import RELAXATIONS, kernels
from neco_loss.sorting.kernels import RELAXATION_CODES, kernel_for
from neco_loss.sorting.kernels.cpp import SOURCE, cpu_kernels

PACKAGE = Path(neco_loss.__file__).parent
LOSS_MODULES = ("neco_loss.permutation_losses", "neco_loss.functional", "neco_loss.loss")


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


@pytest.mark.parametrize("folder", ["sorting", "kernels"])
def test_sorting_and_kernels_import_no_loss_module(folder):
    for path in sorted((PACKAGE / folder).glob("*.py")):
        offending = {m for m in imported_modules(path) if m.startswith(LOSS_MODULES)}
        assert not offending, f"{path.name} imports {offending}"


def test_the_cpp_enum_is_relaxation_codes():
    enum = re.search(r"enum Relaxation : int64_t \{[^\n]*\n(.*?)\};", SOURCE.read_text(), re.S)
    assert enum is not None
    entries = dict(re.findall(r"k(\w+) = (\d+)", enum.group(1)))
    as_codes = {
        re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower(): int(v) for name, v in entries.items()
    }
    assert as_codes == RELAXATION_CODES
    assert set(RELAXATION_CODES) == set(RELAXATIONS)


def test_kernel_choice_by_device_and_dtype():
    x = torch.randn(2, 7, dtype=torch.float64)
    assert kernel_for(x, "bitonic", "cauchy") is (kernels.cpp if cpu_kernels() else None)
    assert kernel_for(x.half(), "bitonic", "cauchy") is None
    assert kernel_for(torch.empty(2, 7, device="meta"), "bitonic", "cauchy") is None
    assert set(kernels.KERNELS_BY_DEVICE) == {"cpu", "cuda"}
