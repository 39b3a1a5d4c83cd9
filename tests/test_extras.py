"""Each extra installs what its commands import; a missing one is named in one line."""

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import neco_loss
from neco_loss.extras import EXTRA_OF_MODULE, install_hint

ROOT = Path(neco_loss.__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# torch and torchvision are the core's requirements; torchvision brings numpy and pillow, and
# torch's Linux builds bring triton (used for CUDA tensors only).
CORE_MODULES = {"torch", "torchvision", "numpy", "PIL", "triton", "neco_loss"}


def imported_modules() -> set[str]:
    """Top-level names of every module imported anywhere in the package (lazily or not)."""
    names = set()
    for path in (ROOT / "neco_loss").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_optional_import_has_an_extra_and_every_extra_entry_is_used():
    third_party = imported_modules() - set(sys.stdlib_module_names) - CORE_MODULES
    assert third_party == set(EXTRA_OF_MODULE)


@pytest.mark.parametrize("module", sorted(EXTRA_OF_MODULE))
def test_the_named_extra_installs_the_module(module):
    extra = EXTRA_OF_MODULE[module]
    assert extra in EXTRAS, f"{module}: extra {extra!r} is not in pyproject.toml"
    distributions = importlib.metadata.packages_distributions().get(module)
    if distributions is None:
        pytest.skip(f"{module} is not installed here, so its distribution cannot be looked up")
    required = {requirement_name(requirement) for requirement in EXTRAS[extra]}
    # distribution names compared PEP 503-normalised (huggingface_hub is huggingface-hub)
    assert {name.lower().replace("_", "-") for name in distributions} & required, (
        f"{module} comes from {distributions}, which extra {extra!r} does not require: "
        f"{EXTRAS[extra]}"
    )


def test_the_readme_lists_every_extra():
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `(\w+)` \|", readme, flags=re.M))
    assert listed == set(EXTRAS)


def test_install_hint():
    assert install_hint("yaml") == 'pip install "neco-loss[train]"'
    assert install_hint("faiss.contrib") == 'pip install "neco-loss[eval]"'
    assert install_hint("json") is None


def start_neco_without(modules: list[str], *arguments: str) -> subprocess.Popen:
    """Start ``neco ARGUMENTS`` as if ``modules`` were not installed."""
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({modules!r}))  # import of each raises, as if absent\n"
        "from neco_loss.app.cli import main\n"
        f"main({list(arguments)!r})\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def neco_without(modules: list[str], *arguments: str) -> subprocess.CompletedProcess:
    """``neco ARGUMENTS`` as if ``modules`` were not installed, run to its end."""
    process = start_neco_without(modules, *arguments)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_help_needs_only_the_core():
    helps = [["--help"], ["train", "--help"], ["eval", "--help"]]
    processes = [start_neco_without(sorted(EXTRA_OF_MODULE), *arguments) for arguments in helps]
    for process in processes:  # started together: one start-up's wait, not three
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]
        assert stdout.startswith("usage: neco")


@pytest.mark.parametrize(
    "missing, arguments, extra",
    [
        ("yaml", ["train", "examples/recipes/tiny_cpu.yaml", "--output-dir", "{tmp}"], "train"),
        ("timm", ["train", "examples/recipes/tiny_cpu.yaml", "--output-dir", "{tmp}"], "train"),
        ("hypothesis", ["check-sorter", "examples.sorters.neural_sort:neural_sort"], "testing"),
    ],
)
def test_a_missing_module_names_its_extra_in_one_line(missing, arguments, extra, tmp_path):
    result = neco_without([missing], *(argument.format(tmp=tmp_path) for argument in arguments))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: neco {arguments[0]} needs {missing!r}, which is not installed: "
        f'pip install "neco-loss[{extra}]"'
    )
