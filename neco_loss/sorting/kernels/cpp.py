"""The C++ sorting kernel for CPU tensors: a fused per-row network and a fused sort+CE.

``csrc/soft_sort.cpp`` runs the network one row at a time in cache (values once, the
permutation mixed in place, only the columns a comparator can reach) and recomputes the row in
backward: memory held for backward is the input alone. It also fuses the consumer:
``sort_cross_entropy`` sorts the student's and the teacher's rows and returns the CE per row
without materialising either permutation.

The kernel is compiled when the package is installed (``setup.py``), never at import or on
first use, into ``neco_loss/sorting/kernels/_soft_sort*.so``: a portable build and, on x86-64, an
AVX-512 build, of which the best one this CPU runs is loaded. A module whose source or torch
differs from the installed ones is not used. Without a compiled module (no compiler at install
time, a failed build, a stale or mismatched one) the pure-PyTorch backend is used with one
warning saying why and how to rebuild; ``NECO_REQUIRE_KERNEL=1`` makes that an error (CI sets
it). Which kernel runs for a tensor is decided by ``neco_loss.sorting.kernels.kernel_for``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from neco_loss.sorting.kernels.cross_entropy import CrossEntropySettings
from neco_loss.sorting.kernels.plan import SortSettings, flat_plan
from neco_loss.sorting.kernels.recomputing import RecomputingCrossEntropy, RecomputingSort

NAME = "native (C++ kernel)"
SOURCE = Path(__file__).parent / "csrc" / "soft_sort.cpp"
REQUIRE_KERNEL = "NECO_REQUIRE_KERNEL"  # set to 1: a kernel that cannot be loaded is an error
# The CPU features of setup.py's AVX-512 build (-march=x86-64-v4), as /proc/cpuinfo names them.
AVX512_FEATURES = frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})
BUILDS = {
    "avx512": "neco_loss.sorting.kernels._soft_sort_avx512",
    "portable": "neco_loss.sorting.kernels._soft_sort",
}
# Set to a key of BUILDS: load that build only (benchmarks/kernel_builds.py; debugging). The
# AVX-512 build on a CPU without AVX-512 stops the process with an illegal instruction.
FORCE_BUILD = "NECO_KERNEL_BUILD"
REBUILD = (
    "rebuild it with a C++ compiler: `pip install --no-build-isolation --force-reinstall "
    "--no-deps neco-loss` (in a checkout: `make setup`, or `pip install --no-build-isolation "
    "-e .`; add -v to see the compiler's output)"
)


class KernelBuildError(RuntimeError):
    """No usable compiled kernel (raised when ``NECO_REQUIRE_KERNEL=1``)."""


def _cpuinfo(*keys: str) -> str | None:
    """The value of the first ``/proc/cpuinfo`` line starting with one of ``keys``, if any."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(keys):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_features() -> frozenset[str]:
    """The CPU's instruction-set flags (empty where ``/proc/cpuinfo`` has none)."""
    return frozenset((_cpuinfo("flags", "Features") or "").split())


def runnable_builds() -> list[str]:
    """The builds (keys of ``BUILDS``) this CPU runs, best first, installed or not."""
    if AVX512_FEATURES <= _cpu_features():
        return ["avx512", "portable"]
    return ["portable"]


def candidate_modules() -> list[str]:
    """The compiled modules to try loading, best first (``setup.py`` builds them).

    Raises:
        ValueError: If ``NECO_KERNEL_BUILD`` names no build.

    """
    forced = os.environ.get(FORCE_BUILD, "")
    if forced:
        if forced not in BUILDS:
            raise ValueError(f"{FORCE_BUILD} must be one of {sorted(BUILDS)} but is {forced!r}.")
        return [BUILDS[forced]]
    return [BUILDS[build] for build in runnable_builds()]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the machine type."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _why_unusable(module: ModuleType) -> str | None:
    """Why a compiled module must not be used (another source or torch), or ``None``."""
    if module.TORCH_VERSION != torch.__version__:
        return (
            f"{module.__name__} was built for torch {module.TORCH_VERSION}, this is torch "
            f"{torch.__version__}"
        )
    if SOURCE.is_file() and hashlib.sha256(SOURCE.read_bytes()).hexdigest() != (
        module.SOURCE_SHA256
    ):
        return f"{module.__name__} is older than {SOURCE.name} (the source changed since the build)"
    return None


@lru_cache(maxsize=1)
def cpu_kernels() -> ModuleType | None:
    """The compiled CPU extension; ``None`` (and one warning) if there is no usable one.

    Loads the best module of ``candidate_modules`` that imports and matches the installed
    source and torch. Never compiles.

    Raises:
        KernelBuildError: If no module is usable and ``NECO_REQUIRE_KERNEL=1``.

    """
    problems = []
    for name in candidate_modules():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        except ImportError as error:  # e.g. built against another torch: undefined symbols
            problems.append(f"{name} does not load ({str(error).splitlines()[0][:200]})")
            continue
        problem = _why_unusable(module)
        if problem is None:
            return module
        problems.append(problem)
    problem = "; ".join(problems) or (
        "the package was installed without it (no C++ compiler at install time, or its build "
        "failed)"
    )
    failure = f"neco-loss: no usable compiled sorting kernel: {problem}. To use it, {REBUILD}."
    if os.environ.get(REQUIRE_KERNEL, "0") not in ("", "0"):
        raise KernelBuildError(
            f"{failure} {REQUIRE_KERNEL} is set, so this is an error; unset it to fall back to "
            "the pure-PyTorch native backend."
        )
    fallback = " Using the pure-PyTorch native backend (same values, slower) meanwhile."
    warnings.warn(failure + fallback, RuntimeWarning, stacklevel=2)
    return None


def build_info() -> str:
    """Which compiled module runs, its build flags and torch, and this CPU (for reports)."""
    kernels = cpu_kernels()
    cpu = f"CPU: {cpu_name()} ({'AVX-512' if 'avx512' in runnable_builds() else 'no AVX-512'})"
    if kernels is None:
        return f"no compiled kernel (PyTorch fallback); {cpu}"
    return (
        f"{kernels.__name__} built with `{kernels.BUILD_FLAGS}` for torch "
        f"{kernels.TORCH_VERSION}; {cpu}"
    )


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
