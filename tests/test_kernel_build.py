"""The C++ kernel is compiled when the package is installed, never when it is imported.

Wheels are built here from a copy of the project, with ``--no-build-isolation`` (against this
venv's torch) and installed with ``--target`` into a folder that is imported from outside the
checkout: with no compiler and with one that fails every build. The wheel with a working
compiler is the README's command, run verbatim by ``make test-docs``
(``tests/test_docs_verbatim.py::test_a_wheel_carries_the_compiled_kernel``).
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import neco_loss
from neco_loss.sorting.kernels import cpp

ROOT = Path(neco_loss.__file__).parents[1]
VENV_BIN = Path(sys.executable).parent

# Loads the kernel, sorts with it, and reports which module ran and whether anything compiled.
LOAD = textwrap.dedent(
    """
    import sys, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import torch
        from neco_loss import soft_permutation
        from neco_loss.sorting.kernels.cpp import cpu_kernels
        x = torch.randn(3, 49, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        native = soft_permutation(x, backend="native")
        again = soft_permutation(x, backend="native")
    portable = soft_permutation(x, backend="native-python")
    same = all(
        torch.allclose(a, b, rtol=0, atol=1e-9) for a, b in zip(native + again, portable + portable)
    )
    kernels = cpu_kernels()
    messages = [str(w.message) for w in caught if "compiled sorting kernel" in str(w.message)]
    print("LOADED" if kernels is not None else "FALLBACK", getattr(kernels, "__file__", "-"))
    print("jit" if "torch.utils.cpp_extension" in sys.modules else "no-jit", same)
    print(len(messages), *messages)
    """
)


def run_python(
    code: str, environment: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **environment},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def project_copy(tmp_path: Path) -> Path:
    """The files a wheel is built from, without any compiled module of the checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("*.so", "__pycache__")
    shutil.copytree(ROOT / "neco_loss", source / "neco_loss", ignore=ignore)
    shutil.copytree(ROOT / "integrations", source / "integrations", ignore=ignore)
    return source


def build_and_install(
    tmp_path: Path, environment: dict[str, str]
) -> tuple[subprocess.CompletedProcess, Path | None]:
    """``pip wheel`` a copy of the project, then install the wheel into ``tmp_path/site``."""
    source, wheels = project_copy(tmp_path), tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v"]
        + ["--disable-pip-version-check", "-w", str(wheels), str(source)],
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=900,
    )
    if build.returncode != 0:
        return build, None
    (wheel,) = wheels.glob("neco_loss-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check"]
        + ["--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return build, site


def compiled_modules(site: Path) -> list[str]:
    return sorted(
        path.name.split(".")[0] for path in (site / "neco_loss/sorting/kernels").glob("*.so")
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


@pytest.fixture
def tripwire_compiler(tmp_path):
    """A 'compiler' that records that it was called (nothing may call it after set-up)."""
    called = tmp_path / "compiler-was-called"
    script = tmp_path / "tripwire-g++"
    script.write_text(f"#!/bin/sh\ntouch {called}\nexit 1\n")
    script.chmod(0o755)
    return str(script), called


def test_the_installed_kernel_is_the_best_this_cpu_runs():
    kernels = cpp.cpu_kernels()
    assert kernels is not None, "make setup builds the kernel; see the warning above"
    assert kernels.__name__ == cpp.candidate_modules()[0]
    assert kernels.TORCH_VERSION == torch.__version__
    assert "-ffp-contract=off" in kernels.BUILD_FLAGS
    assert kernels.__name__ in cpp.build_info() and kernels.BUILD_FLAGS in cpp.build_info()


@pytest.mark.parametrize("venv_first", [True, False], ids=["venv-bin-first", "system-path"])
def test_importing_never_compiles(tmp_path, tripwire_compiler, venv_first):
    """Whatever ninja or compiler PATH finds, loading the kernel compiles nothing."""
    compiler, called = tripwire_compiler
    system_path = [p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != VENV_BIN]
    path = [str(VENV_BIN), *system_path] if venv_first else system_path
    extensions = tmp_path / "torch_extensions"
    result = run_python(
        LOAD,
        {
            "PATH": os.pathsep.join(path),
            "CXX": compiler,
            "CC": compiler,
            "TORCH_EXTENSIONS_DIR": str(extensions),
            "NECO_REQUIRE_KERNEL": "1",
        },
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded, jit, warnings = result.stdout.splitlines()
    assert (
        loaded.startswith("LOADED")
        and Path(loaded.split()[1]).parent == ROOT / "neco_loss/sorting/kernels"
    )
    assert jit == "no-jit True" and warnings == "0"
    assert not called.exists() and not extensions.exists()


def test_loading_the_kernel_says_nothing_about_cuda():
    """torch's "No CUDA runtime is found, using CUDA_HOME" (a CUDA toolkit without a GPU, as on
    this project's CPU machines) is not printed: the C++ kernel needs no CUDA."""
    result = run_python(LOAD, {})
    assert result.returncode == 0 and result.stdout.startswith("LOADED"), result.stderr[-2000:]
    assert "No CUDA runtime" not in result.stderr


def test_ci_requires_the_kernel():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "export NECO_REQUIRE_KERNEL=1" in ci.splitlines()


def assert_installed_without_kernel(site: Path, tmp_path: Path) -> None:
    """The package imports and sorts; one warning says why and how to rebuild."""
    assert compiled_modules(site) == []
    result = run_python(LOAD, {"PYTHONPATH": str(site), "NECO_REQUIRE_KERNEL": "0"}, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded, jit, warnings = result.stdout.splitlines()
    assert loaded == "FALLBACK -" and jit == "no-jit True"
    count, message = warnings.split(" ", 1)
    assert count == "1", message
    assert "installed without it (no C++ compiler at install time" in message
    assert "pip install --no-build-isolation --force-reinstall" in message
    assert "pure-PyTorch native backend" in message
    required = run_python(LOAD, {"PYTHONPATH": str(site), "NECO_REQUIRE_KERNEL": "1"}, tmp_path)
    assert required.returncode != 0
    assert "KernelBuildError" in required.stderr and "NECO_REQUIRE_KERNEL is set" in required.stderr


def test_without_a_compiler_the_package_installs_and_falls_back(tmp_path):
    missing = "/nonexistent/g++"
    build, site = build_and_install(
        tmp_path, {"CXX": missing, "CC": missing, "NECO_REQUIRE_KERNEL": "0"}
    )
    assert site is not None, build.stderr[-3000:]
    assert f"no C++ compiler ('{missing}' is not on PATH" in build.stdout + build.stderr
    assert_installed_without_kernel(site, tmp_path)


def test_a_failed_build_installs_and_falls_back(tmp_path, failing_compiler):
    build, site = build_and_install(
        tmp_path, {"CXX": failing_compiler, "CC": failing_compiler, "NECO_REQUIRE_KERNEL": "0"}
    )
    assert site is not None, build.stderr[-3000:]
    log = build.stdout + build.stderr
    assert "error: this bogus compiler refuses" in log
    assert 'building extension "neco_loss.sorting.kernels._soft_sort" failed' in log
    assert_installed_without_kernel(site, tmp_path)


@pytest.mark.parametrize("cxx", ["/nonexistent/g++", "failing"])
def test_required_kernel_turns_a_failed_build_into_an_install_error(
    tmp_path, failing_compiler, cxx
):
    compiler = failing_compiler if cxx == "failing" else cxx
    build, site = build_and_install(
        tmp_path, {"CXX": compiler, "CC": compiler, "NECO_REQUIRE_KERNEL": "1"}
    )
    assert site is None and build.returncode != 0


def test_a_stale_build_is_not_used(tmp_path):
    """A compiled module whose source changed since (a developer's edit) is refused, loudly."""
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "neco_loss", copy / "neco_loss", ignore=shutil.ignore_patterns("__py*"))
    source = copy / "neco_loss/sorting/kernels/csrc/soft_sort.cpp"
    source.write_text(source.read_text() + "// edited\n")
    result = run_python(LOAD, {"PYTHONPATH": str(copy), "NECO_REQUIRE_KERNEL": "0"}, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded, _, warnings = result.stdout.splitlines()
    assert loaded == "FALLBACK -"
    assert "is older than soft_sort.cpp (the source changed since the build)" in warnings
    assert "make setup" in warnings
