"""The C++ kernel's build cannot fail silently, and is built once per set of build inputs."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import neco_loss
from neco_loss.kernels import cpp

LOAD = textwrap.dedent(
    """
    import warnings
    warnings.simplefilter("always")
    from neco_loss.kernels.cpp import cpu_kernels
    kernels = cpu_kernels()
    print("LOADED" if kernels is not None else "FALLBACK", getattr(kernels, "__file__", ""))
    """
)


def load_in_subprocess(environment: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LOAD],
        env={**os.environ, **environment},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def failing_compiler(tmp_path):
    """A 'compiler' that fails every build with a compiler-style error line."""
    script = tmp_path / "bogus-g++"
    script.write_text(
        "#!/bin/sh\necho 'soft_sort.cpp:1:1: error: this bogus compiler refuses' >&2\nexit 1\n"
    )
    script.chmod(0o755)
    return str(script)


def test_no_compiler_warns_once_and_says_so(tmp_path):
    result = load_in_subprocess(
        {
            "CXX": "/nonexistent/g++",
            "TORCH_EXTENSIONS_DIR": str(tmp_path),
            "NECO_REQUIRE_KERNEL": "0",
        }
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("FALLBACK")
    assert result.stderr.count("could not be built") == 1
    assert "no C++ compiler ('/nonexistent/g++' is not on PATH" in result.stderr


def test_a_failed_build_is_not_a_missing_compiler(tmp_path, failing_compiler):
    result = load_in_subprocess(
        {"CXX": failing_compiler, "TORCH_EXTENSIONS_DIR": str(tmp_path), "NECO_REQUIRE_KERNEL": "0"}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("FALLBACK")
    assert "the build failed: soft_sort.cpp:1:1: error: this bogus compiler refuses" in (
        result.stderr
    )
    assert "no C++ compiler" not in result.stderr


@pytest.mark.parametrize("cxx", ["/nonexistent/g++", "failing"])
def test_required_kernel_turns_a_failed_build_into_an_error(tmp_path, failing_compiler, cxx):
    compiler = failing_compiler if cxx == "failing" else cxx
    result = load_in_subprocess(
        {"CXX": compiler, "TORCH_EXTENSIONS_DIR": str(tmp_path), "NECO_REQUIRE_KERNEL": "1"}
    )
    assert result.returncode != 0
    assert "KernelBuildError" in result.stderr and "NECO_REQUIRE_KERNEL is set" in result.stderr


def test_ci_requires_the_kernel():
    ci = (Path(neco_loss.__file__).parents[1] / ".ci" / "run").read_text()
    assert "export NECO_REQUIRE_KERNEL=1" in ci.splitlines()


def test_the_name_hashes_the_build_command(monkeypatch, tmp_path):
    name = cpp.extension_name()
    assert name == cpp.extension_name()  # deterministic
    copy = tmp_path / "soft_sort.cpp"
    shutil.copy(cpp.SOURCE, copy)
    monkeypatch.setattr(cpp, "SOURCE", copy)  # the same text at another path (another checkout)
    assert cpp.extension_name() != name
    monkeypatch.setattr(
        cpp, "SOURCE", Path(neco_loss.__file__).parent / "kernels/csrc/soft_sort.cpp"
    )
    monkeypatch.setenv("CXX", "clang++")
    assert cpp.extension_name() != name


@pytest.mark.slow
def test_two_copies_of_the_package_do_not_rebuild_each_other(tmp_path):
    """A checkout and a copy of the package elsewhere (e.g. a wheel): each builds once, under
    its own name; loading the first again rebuilds nothing."""
    environment = {"NECO_REQUIRE_KERNEL": "1"}
    first = load_in_subprocess(environment)
    assert first.returncode == 0 and first.stdout.startswith("LOADED"), first.stderr[-2000:]
    library = Path(first.stdout.split()[1])
    built = library.stat().st_mtime_ns
    copy = tmp_path / "copy"
    shutil.copytree(Path(neco_loss.__file__).parent, copy / "neco_loss")
    other = load_in_subprocess({**environment, "PYTHONPATH": str(copy)}, cwd=tmp_path)
    assert other.returncode == 0 and other.stdout.startswith("LOADED"), other.stderr[-2000:]
    assert Path(other.stdout.split()[1]) != library
    again = load_in_subprocess(environment, cwd=tmp_path)
    assert again.stdout.split()[1] == str(library)
    assert library.stat().st_mtime_ns == built  # not rebuilt


def test_loading_the_kernel_says_nothing_about_cuda():
    """torch's "No CUDA runtime is found, using CUDA_HOME" (a CUDA toolkit without a GPU, as on
    this project's CPU machines) is not printed: the C++ kernel needs no CUDA."""
    result = load_in_subprocess({})
    assert result.returncode == 0 and result.stdout.startswith("LOADED"), result.stderr[-2000:]
    assert "No CUDA runtime" not in result.stderr
