"""Install-time build of the C++ sorting kernel (``neco_loss/sorting/kernels/csrc/soft_sort.cpp``).

Everything else about the package is declared in ``pyproject.toml``. The kernel is compiled
here, once, the way PyTorch C++ extensions ship (``CppExtension`` + ``BuildExtension``), into
modules beside ``neco_loss/sorting/kernels/``; ``import neco_loss`` never compiles anything.

Two builds of the same source, chosen between at import time by the CPU
(``neco_loss.sorting.kernels.cpp``): ``_soft_sort`` for any CPU of the architecture (no ``-march``),
and on x86-64 ``_soft_sort_avx512`` (``-march=x86-64-v4``: AVX-512, ~2.3x faster per NeCo loss
step than the portable build; docs/performance.md). ``NECO_KERNEL_MARCH=native`` (or any
``-march`` value) builds one module for that target instead. The kernel's build must match the
torch it runs with, so build against the installed torch: ``pip install --no-build-isolation``.

Without a C++ compiler, or when a build fails, the package still installs (the extensions are
optional) with a warning, and ``backend="native"`` falls back to the PyTorch implementation;
``NECO_REQUIRE_KERNEL=1`` makes a missing compiler or a failed build an install error.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
from pathlib import Path

from setuptools import setup

SOURCE = "neco_loss/sorting/kernels/csrc/soft_sort.cpp"
AVX512_SOURCE = "neco_loss/sorting/kernels/csrc/soft_sort_avx512.cpp"  # includes SOURCE
# -ffp-contract=off: no fused multiply-adds, so that the values round as in PyTorch's kernels;
# -fopenmp: the `omp simd` loops and at::parallel_for's OpenMP threads; -fno-wrapv undoes
# Python's -fwrapv (defined signed overflow keeps loops from vectorising: 5% of a loss step).
COMPILE_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-fno-wrapv"]
LINK_FLAGS = ["-fopenmp"]
# x86-64-v4 is AVX-512 (F, BW, CD, DQ, VL); tuned for Intel's server cores, where it was measured.
AVX512_FLAGS = ["-march=x86-64-v4", "-mtune=icelake-server"]


def required() -> bool:
    """Whether ``NECO_REQUIRE_KERNEL`` asks for the kernel (then a failed build is an error)."""
    return os.environ.get("NECO_REQUIRE_KERNEL", "0") not in ("", "0")


def builds() -> dict[str, tuple[str, list[str]]]:
    """Module name -> its source file and the flags that select its target CPU."""
    march = os.environ.get("NECO_KERNEL_MARCH", "")
    if march:
        return {"_soft_sort": (SOURCE, [f"-march={march}"])}
    if platform.machine().lower() in ("x86_64", "amd64"):
        return {"_soft_sort": (SOURCE, []), "_soft_sort_avx512": (AVX512_SOURCE, AVX512_FLAGS)}
    return {"_soft_sort": (SOURCE, [])}


def kernel_extensions() -> tuple[list, dict]:
    """The kernel's extensions and the build command, or none when torch is not importable."""
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("neco-loss: torch is not importable at build time: installing without the C++ kernel")
        return [], {}
    source_hash = hashlib.sha256(Path(SOURCE).read_bytes()).hexdigest()

    def extension(name: str, source: str, target: list[str]) -> CppExtension:
        flags = COMPILE_FLAGS + target
        # The module reports how it was built (neco_loss.sorting.kernels.cpp.build_info) and which
        # source and torch it was built from, so that a stale or mismatched build is not used.
        macros = {
            "NECO_BUILD_FLAGS": " ".join(flags),
            "NECO_TORCH_VERSION": torch.__version__,
            "NECO_SOURCE_SHA256": source_hash,
        }
        return CppExtension(
            f"neco_loss.sorting.kernels.{name}",
            [source],
            extra_compile_args=flags + [f'-D{key}="{value}"' for key, value in macros.items()],
            extra_link_args=LINK_FLAGS,
            optional=not required(),
        )

    class BuildKernel(BuildExtension):
        """``BuildExtension`` that builds the modules in parallel and survives no compiler."""

        def finalize_options(self) -> None:
            if self.parallel is None:
                self.parallel = os.cpu_count() or 1
            super().finalize_options()

        def build_extensions(self) -> None:
            compiler = self.compiler.compiler_cxx[0]
            if shutil.which(compiler) is None:
                message = f"no C++ compiler ({compiler!r} is not on PATH; set CXX or install g++)"
                if required():
                    raise SystemExit(f"neco-loss: {message}, and NECO_REQUIRE_KERNEL is set")
                print(f"WARNING neco-loss: {message}: installing without the C++ kernel")
                self.extensions = []
                return
            super().build_extensions()

    extensions = [extension(name, *build) for name, build in builds().items()]
    return extensions, {"build_ext": BuildKernel.with_options(use_ninja=False)}


extensions, commands = kernel_extensions()
setup(ext_modules=extensions, cmdclass=commands)
