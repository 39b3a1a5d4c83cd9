"""``neco check-sorter`` and the ``soft_sort_check`` pytest fixture, as users run them."""

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from neco_loss.app.cli import main

ROOT = Path(__file__).parents[1]
NECO = str(Path(sys.executable).parent / "neco")

USER_SORTERS = """
import torch
from neco_loss import soft_permutation


def odd_even(x, steepness):
    return soft_permutation(x, "odd_even", steepness, backend="native-python")


def descending(x):
    sorted_x, perm = soft_permutation(x, "odd_even", 100.0, backend="native-python")
    return sorted_x.flip(-1), perm.flip(-1)


def only_perm(x):
    return soft_permutation(x, "odd_even", 100.0, backend="native-python")[1]


def wrong_shape(x):
    return x


NOT_A_FUNCTION = 3
"""


def neco(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``neco check-sorter ARGS`` as a user types it (a new process)."""
    return subprocess.run(
        [NECO, "check-sorter", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def check_sorter(capsys, monkeypatch):
    """``neco check-sorter ARGS`` in this process (faster than a new one; same code path)."""

    def run(*args: str, cwd: Path) -> Outcome:
        monkeypatch.chdir(cwd)
        try:
            main(["check-sorter", *args])
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
        output = capsys.readouterr()
        return Outcome(code, output.out, output.err)

    return run


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    (tmp_path / "user_sorters.py").write_text(USER_SORTERS)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the cwd the command adds is undone
    yield tmp_path
    sys.modules.pop("user_sorters", None)


def test_a_correct_sorter_passes(check_sorter, user_folder):
    result = check_sorter(
        "user_sorters:odd_even", "--n", "1..8", "--max-examples", "10", cwd=user_folder
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "soft sort properties of user_sorters:odd_even" in result.stdout
    assert "ascending            PASSED" in result.stdout
    assert "gradgradcheck" not in result.stdout  # optional: asked for by name


def test_a_broken_sorter_fails_with_counterexamples(check_sorter, user_folder):
    result = check_sorter(
        "user_sorters:descending",
        "--n",
        "1..8",
        "--max-examples",
        "10",
        "--properties",
        "entries",
        "ascending",
        cwd=user_folder,
    )
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(line.strip().startswith("entries") and "PASSED" in line for line in lines)
    failed = next(line for line in lines if line.strip().startswith("ascending"))
    assert "FAILED" in failed and "n = 2, input [[" in failed


def test_a_perm_only_sorter_and_a_reference(check_sorter, user_folder):
    result = check_sorter(
        "user_sorters:only_perm",
        "--n",
        "1..6",
        "--max-examples",
        "5",
        "--properties",
        "sorted_matches_perm",
        "parity",
        "--reference",
        "user_sorters:odd_even",
        cwd=user_folder,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "NOT APPLICABLE  the sorter returns perm only" in result.stdout
    assert "parity               PASSED" in result.stdout


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("user_sorters", "sorter must be MODULE:FUNCTION"),
        ("no_such_module:f", "cannot import module 'no_such_module'"),
        ("user_sorters:missing", "has no 'missing'"),
        ("user_sorters:NOT_A_FUNCTION", "sorter must be a callable"),
        ("user_sorters:wrong_shape", r"must return perm of shape (2, 3, 3)"),
    ],
)
def test_bad_sorters_get_one_line_errors(check_sorter, user_folder, spec, message):
    result = check_sorter(spec, "--max-examples", "2", cwd=user_folder)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_options(check_sorter, user_folder):
    result = check_sorter("user_sorters:odd_even", "--n", "9..3", cwd=user_folder)
    assert result.returncode == 2 and "expected 1 <= MIN <= MAX" in result.stderr
    result = check_sorter("user_sorters:odd_even", "--properties", "sortedness", cwd=user_folder)
    assert result.returncode != 0 and "properties must be 'all' or names" in result.stderr


def test_the_documented_neural_sort_command():
    """docs/testing.md and the README, verbatim: NeuralSort is not doubly stochastic."""
    command = (
        "neco check-sorter examples.sorters.neural_sort:neural_sort --n 1..16 --max-examples 20"
    )
    for page in ("docs/testing.md", "README.md"):
        assert command in (ROOT / page).read_text()
    result = neco(*command.split()[2:], cwd=ROOT)
    assert result.returncode == 1, result.stderr[-2000:]
    assert re.search(r"element \d+'s probabilities over ranks sums to", result.stdout)
    assert "ascending            PASSED" in result.stdout


@pytest.mark.slow
def test_the_quick_report_as_ci_runs_it(tmp_path):
    """The reduced report (docs/sorting.md): 3 sorters, n <= 24, 5 examples each."""
    pytest.importorskip("diffsort")
    pytest.importorskip("torchsort")
    table = tmp_path / "report.md"
    result = neco("--report", "--quick", "--markdown", str(table), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    text = table.read_text()
    assert "| `diffsort/bitonic/cauchy` |" in text and "**FAIL**" in text
    assert "`torchsort/soft_rank/l2`, doubly_stochastic: n = 3" in text
    native = next(line for line in text.splitlines() if line.startswith("| `native/"))
    assert native.count("**FAIL**") == 1  # gradgradcheck: first-order backward


PLUGIN_TEST = """
from neco_loss import soft_permutation


def good(x, steepness):
    return soft_permutation(x, "odd_even", steepness, backend="native-python")


def descending(x, steepness):
    sorted_x, perm = good(x, steepness)
    return sorted_x.flip(-1), perm.flip(-1)


def test_good(soft_sort_check):
    soft_sort_check(good, ["entries", "ascending"], n=(1, 8))


def test_descending(soft_sort_check):
    soft_sort_check(descending, ["ascending"], n=(1, 8))
"""


def test_pytest_plugin_fixture(pytester):
    pytester.makepyfile(test_user=PLUGIN_TEST)
    result = pytester.runpytest(
        "-p", "neco_loss.testing.pytest_plugin", "--soft-sort-examples", "5", "-q"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*ascending*FAILED*n = 2, input*"])
