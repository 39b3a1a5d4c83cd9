"""The C++ sorting kernel for CPU tensors: a fused per-row network and a fused sort+CE.

``csrc/soft_sort.cpp`` runs the network one row at a time in cache (values once, the
permutation mixed in place, only the columns a comparator can reach) and recomputes the row in
backward: memory held for backward is the input alone. It also fuses the consumer:
``sort_cross_entropy`` sorts the student's and the teacher's rows and returns the CE per row
without materialising either permutation.

The extension is compiled just in time on first use with ``torch.utils.cpp_extension.load``
(cached under ``TORCH_EXTENSIONS_DIR``, ``~/.cache/torch_extensions`` by default; ``make setup``
builds it once), under a name that hashes every input of its build command. Without a
compiler, or if the build fails, the pure-PyTorch backend is used with a one-line warning
saying which; ``NECO_REQUIRE_KERNEL=1`` makes that an error (CI sets it). Which kernel runs for
a tensor is decided by ``neco_loss.kernels.kernel_for``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sysconfig
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from neco_loss.kernels.cross_entropy import CrossEntropySettings
from neco_loss.kernels.plan import SortSettings, flat_plan
from neco_loss.kernels.recomputing import RecomputingCrossEntropy, RecomputingSort

NAME = "native (C++ kernel)"
SOURCE = Path(__file__).parent / "csrc" / "soft_sort.cpp"
# -ffp-contract=off: no fused multiply-adds, so that the values round as in PyTorch's kernels
# (the relaxed network amplifies rounding differences); -march=native: vector width of this CPU.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def _cpu_signature() -> str:
    """The CPU's instruction-set flags: ``-march=native`` builds differ between CPUs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


REQUIRE_KERNEL = "NECO_REQUIRE_KERNEL"  # set to 1: a kernel that cannot be built is an error


def compiler() -> str:
    """The C++ compiler ``torch.utils.cpp_extension`` runs (``$CXX``, else ``c++``)."""
    return os.environ.get("CXX", "c++")


def _cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported without its CPU-only noise.

    On importing it, torch logs "No CUDA runtime is found, using CUDA_HOME=..." on every machine
    with a CUDA toolkit but no GPU; the C++ kernel needs no CUDA, so that line only misleads.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as extension
    finally:
        logger.setLevel(level)
    return extension


def build_inputs() -> list[str]:
    """Everything that enters the build command ``cpp_extension.load`` writes to build.ninja.

    The source's text and absolute path, the compiler, include and library paths (this
    environment's torch and Python), the flags, the CPU (``-march=native``) and torch's version.
    Two callers that differ in any of these build under different names, so that they never
    rebuild each other's extension.
    """
    extension = _cpp_extension()
    return [
        SOURCE.read_text(),
        str(SOURCE.resolve()),
        compiler(),
        *extension.include_paths("cpu"),
        sysconfig.get_path("include", scheme="posix_prefix") or "",
        *extension.library_paths(),
        *CFLAGS,
        *LDFLAGS,
        _cpu_signature(),
        torch.__version__,
    ]


def extension_name() -> str:
    """The extension's name: a hash of ``build_inputs``."""
    digest = hashlib.sha256("\n".join(build_inputs()).encode()).hexdigest()
    return "neco_soft_sort_" + digest[:16]


class KernelBuildError(RuntimeError):
    """The C++ kernel could not be built (raised when ``NECO_REQUIRE_KERNEL=1``)."""


@lru_cache(maxsize=1)
def cpu_kernels() -> ModuleType | None:
    """The compiled CPU extension, built on first call; ``None`` (and a warning) if it cannot be.

    Built once per set of ``build_inputs`` (cached under ``TORCH_EXTENSIONS_DIR``). Without a
    compiler, or when the build fails, one warning says which (with the compiler's first error)
    and the PyTorch backend is used; with ``NECO_REQUIRE_KERNEL=1`` either raises instead.

    Raises:
        KernelBuildError: If the kernel cannot be built and ``NECO_REQUIRE_KERNEL=1``.

    """
    problem = _build_problem()
    if problem is None:
        try:
            return _cpp_extension().load(
                extension_name(),
                [str(SOURCE)],
                extra_cflags=CFLAGS,
                extra_ldflags=LDFLAGS,
                verbose=False,
            )
        except Exception as error:  # the build failed: say how, fall back or fail
            problem = f"the build failed: {_first_error(str(error))}"
    failure = f"neco-loss: the compiled sorting kernel could not be built: {problem}."
    if os.environ.get(REQUIRE_KERNEL, "0") not in ("", "0"):
        raise KernelBuildError(
            f"{failure} {REQUIRE_KERNEL} is set, so this is an error; unset it to fall back to "
            "the pure-PyTorch native backend."
        )
    fallback = " Using the pure-PyTorch native backend (same values, slower)."
    warnings.warn(failure + fallback, RuntimeWarning, stacklevel=2)
    return None


def _build_problem() -> str | None:
    """Why no build can start (no compiler, no ninja), or ``None``."""
    if shutil.which(compiler()) is None:
        return f"no C++ compiler ({compiler()!r} is not on PATH; set CXX or install g++)"
    if not _cpp_extension().is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _first_error(output: str) -> str:
    """The compiler's first error line in a failed build's output, else its first line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "Error building" not in line]
    return (errors or lines or ["unknown error"])[0][:300]


def usable(x: Tensor, network: str, relaxation: str) -> bool:
    """Whether the extension is built (every network and relaxation runs on it)."""
    return cpu_kernels() is not None


def _sort_arguments(settings: SortSettings, n: int) -> tuple[Any, ...]:
    return (
        *flat_plan(settings.network, n).arguments(),
        settings.code,
        float(settings.steepness),
        float(settings.art_lambda),
    )


def _cross_entropy_arguments(
    settings: CrossEntropySettings, n: int, dtype: torch.dtype
) -> tuple[Any, ...]:
    return (
        *flat_plan(settings.network, n).arguments(),
        settings.sort("student").code,
        float(settings.steepness_student),
        float(settings.steepness_teacher),
        float(settings.art_lambda),
        settings.first_rank(n),
        float(settings.teacher_to_student),
        float(settings.student_to_teacher),
        settings.log_floor(dtype),
    )


def _gradient(
    x: Tensor, settings: SortSettings, grad_sorted: Tensor | None, grad_perm: Tensor | None
) -> Tensor:
    kernels: Any = cpu_kernels()
    return kernels.sort_backward(
        x,
        None if grad_sorted is None else grad_sorted.contiguous(),
        None if grad_perm is None else grad_perm.contiguous(),
        *_sort_arguments(settings, x.shape[1]),
    )


class _CompiledSort(RecomputingSort):
    """Soft sort on the CPU kernel; backward recomputes the rows from ``x``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, settings: SortSettings) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        RecomputingSort.remember(ctx, x, settings, _gradient, NAME)
        kernels: Any = cpu_kernels()
        sorted_x, perm = kernels.sort_forward(x, *_sort_arguments(settings, x.shape[1]), True)
        return sorted_x, perm


def _cross_entropy_gradient(
    student: Tensor, teacher: Tensor, settings: CrossEntropySettings, grad_loss: Tensor
) -> Tensor:
    kernels: Any = cpu_kernels()
    arguments = _cross_entropy_arguments(settings, student.shape[1], student.dtype)
    return kernels.sort_ce_backward(student, teacher, grad_loss, *arguments)


class _CompiledSortCrossEntropy(RecomputingCrossEntropy):
    """Per-row CE of the two soft permutations; nothing ``n x n`` is stored or returned."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, student: Tensor, teacher: Tensor, settings: CrossEntropySettings
    ) -> Tensor:
        RecomputingCrossEntropy.remember(
            ctx, student, teacher, settings, _cross_entropy_gradient, NAME + ", fused CE"
        )
        kernels: Any = cpu_kernels()
        arguments = _cross_entropy_arguments(settings, student.shape[1], student.dtype)
        return kernels.sort_ce_forward(student, teacher, *arguments)


def soft_sort(x: Tensor, settings: SortSettings) -> tuple[Tensor, Tensor]:
    """Soft-sort the rows of ``x (rows, n)`` with the C++ kernel.

    Returns:
        ``sorted_x (rows, n)`` and ``perm (rows, n, n)`` as every backend.

    """
    return _CompiledSort.apply(x.contiguous(), settings)


def sort_cross_entropy(
    student_scores: Tensor, teacher_scores: Tensor, settings: CrossEntropySettings
) -> Tensor:
    """Per-row CE between the soft permutations of two score matrices (``(rows,)``)."""
    return _CompiledSortCrossEntropy.apply(
        student_scores.contiguous(), teacher_scores.detach().contiguous(), settings
    )
