"""Compiled soft sorting kernels: a fused per-row C++ kernel for the CPU.

``csrc/soft_sort.cpp`` runs the network one row at a time in cache (values once, the
permutation mixed in place, only the columns a comparator can reach) and recomputes the row in
backward: memory held for backward is the input alone. It also fuses the consumer:
``sort_cross_entropy`` sorts the student's and the teacher's rows and returns the CE per row
without materialising either permutation.

The extension is compiled just in time on first use with ``torch.utils.cpp_extension.load``
(cached under ``TORCH_EXTENSIONS_DIR``, ``~/.cache/torch_extensions`` by default; ``make setup``
builds it once). Without a working compiler the pure-PyTorch backend is used instead, with a
one-line warning. ``backend="native"`` picks the compiled kernel whenever it can run;
``backend="native-python"`` forces the portable path.
"""

from __future__ import annotations

import hashlib
import platform
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from neco_loss.sorting.networks import sorting_plan
from neco_loss.sorting.recomputing import RecomputingSort

SOURCE = Path(__file__).parent / "csrc" / "soft_sort.cpp"
# -ffp-contract=off: no fused multiply-adds, so that the values round as in PyTorch's kernels
# (the relaxed network amplifies rounding differences); -march=native: vector width of this CPU.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
# The C++ kernel's relaxation codes (enum Relaxation in soft_sort.cpp).
COLUMN_BLOCK = 8  # soft_sort.cpp's kColumnBlock: comparators mix whole blocks of columns
RELAXATION_CODES = {
    "cauchy": 0,
    "logistic": 1,
    "logistic_phi": 2,
    "gaussian": 3,
    "reciprocal": 4,
    "optimal": 5,
}


def _cpu_signature() -> str:
    """The CPU's instruction-set flags: ``-march=native`` builds differ between CPUs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_kernels() -> ModuleType | None:
    """The compiled CPU extension, built on first call; ``None`` (and a warning) if it cannot be.

    The build is named by a hash of the source, the flags and the CPU, so an edited source or a
    different CPU never loads a stale binary.
    """
    key = "\n".join([SOURCE.read_text(), *CFLAGS, _cpu_signature(), torch.__version__])
    name = "neco_soft_sort_" + hashlib.sha256(key.encode()).hexdigest()[:16]
    try:
        from torch.utils.cpp_extension import load

        return load(
            name,
            [str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a failed build: fall back, say so once
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"neco-loss: the compiled sorting kernel could not be built ({reason[:200]}); using "
            "the pure-PyTorch native backend (same values, slower).",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


@dataclass(frozen=True)
class FlatPlan:
    """A sorting network as the C++ kernel reads it (CPU tensors).

    Attributes:
        n_wires: Wires including the leading dropped ones.
        layer_offsets: ``(L + 1,)`` int64: comparators of layer ``l`` are
            ``layer_offsets[l] .. layer_offsets[l + 1] - 1``.
        comparators: ``(C, 5)`` int64: wire a, wire b, sign (+1 ascending, -1 descending, 0
            fixed), first and one-past-last permutation column the comparator can reach.
        fixed: ``(C,)`` float64: ``c1`` of the fixed comparators (1 keep, 0 swap).
        tape_offsets: ``(C + 1,)`` int64: where backward keeps each comparator's input
            difference of its two rows (one number per column it reaches).

    """

    n_wires: int
    layer_offsets: Tensor
    comparators: Tensor
    fixed: Tensor
    tape_offsets: Tensor

    def arguments(self) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """The plan arguments of every kernel entry point, in order."""
        return self.layer_offsets, self.comparators, self.fixed, self.tape_offsets, self.n_wires


@lru_cache(maxsize=256)
def flat_plan(network: str, n: int) -> FlatPlan:
    """``network`` for ``n`` inputs as comparator lists (see ``FlatPlan``); cached.

    Raises:
        ValueError: As ``sorting_plan`` (unknown network, or a layout that mis-sorts ``n``).

    """
    plan = sorting_plan(network, n, torch.device("cpu"), torch.float64)
    dropped = plan.n_dropped
    rows: list[Tensor] = []
    fixed: list[Tensor] = []
    offsets = [0]
    for stage in plan.stages:
        group_first = torch.arange(stage.groups) * stage.group_size
        for layer in stage.layers:
            shape = (stage.groups, layer.chunks, layer.half)
            wire_a = (
                group_first.view(-1, 1, 1)
                + layer.start
                + torch.arange(layer.chunks).view(1, -1, 1) * 2 * layer.half
                + torch.arange(layer.half).view(1, 1, -1)
            ).expand(shape)
            sign = torch.ones(shape) if layer.sign is None else layer.sign
            layer_fixed = torch.ones(shape) if layer.fixed is None else layer.fixed
            # Permutation columns a comparator can reach: the elements that started in its group.
            # Rounded out to whole column blocks (zero columns in both rows, harmless).
            first = (group_first - dropped).clamp(min=0) // COLUMN_BLOCK * COLUMN_BLOCK
            last = (group_first + stage.group_size - dropped).clamp(min=0)
            last = (last + COLUMN_BLOCK - 1) // COLUMN_BLOCK * COLUMN_BLOCK
            first, last = first.view(-1, 1, 1).expand(shape), last.view(-1, 1, 1)
            columns = torch.stack(
                [wire_a, wire_a + layer.half, sign.long(), first, last.expand(shape)], dim=-1
            )
            # Fixed comparators that keep both wires (diffsort's around its dropped wires) are
            # identities for values, permutation and gradient alike: leave them out.
            active = ~((sign == 0) & (layer_fixed == 1)).reshape(-1)
            rows.append(columns.reshape(-1, 5)[active])
            fixed.append(layer_fixed.reshape(-1).double()[active])
            offsets.append(offsets[-1] + rows[-1].shape[0])
    comparators = torch.cat(rows) if rows else torch.zeros(0, 5, dtype=torch.long)
    widths = comparators[:, 4] - comparators[:, 3]
    tape = torch.cat([torch.zeros(1, dtype=torch.long), widths.cumsum(0)])
    return FlatPlan(
        plan.n_wires,
        torch.tensor(offsets, dtype=torch.long),
        comparators.contiguous(),
        (torch.cat(fixed) if fixed else torch.zeros(0, dtype=torch.float64)).contiguous(),
        tape.contiguous(),
    )


@dataclass(frozen=True)
class _Settings:
    plan: FlatPlan
    relaxation: int
    steepness: float
    art_lambda: float


def _compiled_gradient(
    x: Tensor, settings: _Settings, grad_sorted: Tensor | None, grad_perm: Tensor | None
) -> Tensor:
    kernels: Any = cpu_kernels()
    return kernels.sort_backward(
        x,
        None if grad_sorted is None else grad_sorted.contiguous(),
        None if grad_perm is None else grad_perm.contiguous(),
        *settings.plan.arguments(),
        settings.relaxation,
        settings.steepness,
        settings.art_lambda,
    )


class _CompiledSort(RecomputingSort):
    """Soft sort on the CPU kernel; backward recomputes the rows from ``x``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, settings: _Settings) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        RecomputingSort.remember(ctx, x, settings, _compiled_gradient)
        kernels: Any = cpu_kernels()
        sorted_x, perm = kernels.sort_forward(
            x,
            *settings.plan.arguments(),
            settings.relaxation,
            settings.steepness,
            settings.art_lambda,
            True,
        )
        return sorted_x, perm


@dataclass(frozen=True)
class CrossEntropySettings:
    """What ``sort_cross_entropy`` compares.

    Attributes:
        network: Sorting network name.
        relaxation: Swap-probability name.
        steepness_student: Inverse temperature of the student's sort.
        steepness_teacher: Inverse temperature of the teacher's sort.
        art_lambda: Exponent of ``logistic_phi``.
        top_k: Compare only the ``k`` highest ranks (``None``: all).
        teacher_to_student: Include ``CE(Q_t, Q_s)``.
        student_to_teacher: Include ``CE(Q_s, Q_t)``.
        epsilon: Clamp of probabilities before their log.

    """

    network: str
    relaxation: str
    steepness_student: float
    steepness_teacher: float
    art_lambda: float = 0.25
    top_k: int | None = None
    teacher_to_student: bool = True
    student_to_teacher: bool = False
    epsilon: float = 1e-8

    def arguments(self, n: int) -> tuple[Any, ...]:
        """Kernel arguments after the tensors, for ``n`` references."""
        return (
            *flat_plan(self.network, n).arguments(),
            RELAXATION_CODES[self.relaxation],
            float(self.steepness_student),
            float(self.steepness_teacher),
            float(self.art_lambda),
            n - (self.top_k or n),
            float(self.teacher_to_student),
            float(self.student_to_teacher),
            float(self.epsilon),
        )


class _CompiledSortCrossEntropy(torch.autograd.Function):
    """Per-row CE of the two soft permutations; nothing ``n x n`` is stored or returned."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, student: Tensor, teacher: Tensor, settings: CrossEntropySettings
    ) -> Tensor:
        ctx.settings = settings
        ctx.save_for_backward(student, teacher)
        kernels: Any = cpu_kernels()
        return kernels.sort_ce_forward(student, teacher, *settings.arguments(student.shape[1]))

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        student, teacher = ctx.saved_tensors
        settings: CrossEntropySettings = ctx.settings
        kernels: Any = cpu_kernels()
        grad = kernels.sort_ce_backward(
            student, teacher, grad_loss.contiguous(), *settings.arguments(student.shape[1])
        )
        return grad, None, None


def can_run(x: Tensor) -> bool:
    """Whether the compiled kernel handles ``x`` (float32/float64 on the CPU, compiler present)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and cpu_kernels() is not None
    )


def compiled_soft_sort(
    x: Tensor, network: str, relaxation: str, steepness: float, art_lambda: float
) -> tuple[Tensor, Tensor]:
    """Soft-sort the rows of ``x (rows, n)`` with the compiled kernel (check ``can_run`` first).

    Returns:
        ``sorted_x (rows, n)`` and ``perm (rows, n, n)`` as every backend.

    """
    settings = _Settings(
        flat_plan(network, x.shape[1]), RELAXATION_CODES[relaxation], steepness, art_lambda
    )
    return _CompiledSort.apply(x.contiguous(), settings)


def sort_cross_entropy(
    student_scores: Tensor, teacher_scores: Tensor, settings: CrossEntropySettings
) -> Tensor:
    """Per-row CE between the soft permutations of two score matrices, fused on the CPU.

    Equals ``permutation_loss(Q_s, Q_t, loss="ce", ...)`` with ``Q = soft_permutation(...)[1]``
    (mean over elements of the sum over the compared ranks); the gradient flows into
    ``student_scores`` only. Check ``can_run`` first.

    Args:
        student_scores: ``(rows, n)``.
        teacher_scores: ``(rows, n)``, same dtype (used without gradient).
        settings: Network, relaxation, steepnesses and the comparison.

    Returns:
        ``(rows,)`` losses.

    """
    return _CompiledSortCrossEntropy.apply(
        student_scores.contiguous(), teacher_scores.detach().contiguous(), settings
    )
