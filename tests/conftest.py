"""Hypothesis profiles: bounded and deterministic by default so that CI stays fast and stable.

Set HYPOTHESIS_PROFILE=thorough for a longer, randomised search.
"""

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# The compiled kernel's files at the start of the session (pytest_sessionstart).
KERNEL_FILES = pytest.StashKey[dict]()

# solo-learn main built by scripts/solo_learn.sh: its tests run when it is there.
SOLO_LEARN = Path(__file__).parents[1] / ".solo-learn"
if SOLO_LEARN.is_dir():
    sys.path.insert(0, str(SOLO_LEARN))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(SOLO_LEARN), os.environ.get("PYTHONPATH")])
    )

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

pytest_plugins = ["pytester"]  # tests of the soft-sort pytest plugin run pytest inside pytest


def _compiled_kernel_files() -> dict[str, tuple[int, int]]:
    """Each compiled kernel module of the package: (modification time, size)."""
    import neco_loss

    kernels = Path(neco_loss.__file__).parent / "kernels"
    files = sorted(kernels.glob("*.so"))
    return {path.name: (path.stat().st_mtime_ns, path.stat().st_size) for path in files}


def pytest_sessionstart(session):
    """The kernel was built at set-up: it loads before the first test (under
    NECO_REQUIRE_KERNEL=1 a missing one stops the run here), and its files are recorded."""
    from neco_loss.sorting.kernels.cpp import cpu_kernels

    cpu_kernels()
    session.config.stash[KERNEL_FILES] = _compiled_kernel_files()


def pytest_sessionfinish(session, exitstatus):
    """No test compiled the kernel: its files are those of the start."""
    before = session.config.stash.get(KERNEL_FILES, None)
    if before is not None and _compiled_kernel_files() != before:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(
            f"\nerror: the compiled kernel changed during the tests: {before} -> "
            f"{_compiled_kernel_files()}; nothing may compile it after set-up"
        )
