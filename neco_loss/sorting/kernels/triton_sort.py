"""The soft sorting network as Triton kernels: one program per row.

A program keeps the row's values ``(W,)`` and its permutation state ``(W, NP)`` (wires x
element columns, ``W`` and ``NP`` padded to powers of two) on chip and applies the layers one
after the other. Every layer is written from each wire's point of view, so it is whole-tensor
arithmetic plus one gather of the partner wires: with ``p`` the partner's entry,
``v' = c1 v + c2 p`` and ``Y' = p + c1 (Y - p)`` (the 2x2 mix is symmetric). Wires a layer does
not touch are their own partner with ``c1 = 1``.

Backward recomputes the row's forward, keeping each layer's input state in a scratch buffer of
the call (rows are processed in chunks so that it stays bounded), and propagates the gradient
through the same mixes in reverse, plus d loss / d alpha: nothing but ``x`` is held between
forward and backward. Offsets of rows into ``(rows, n)`` and ``(rows, n, n)`` tensors are
int64 (``rows * n * n`` passes 2**31 at 8 GiB of float32 permutations).

The arithmetic is that of ``native.py`` / ``relaxations.py`` (Cauchy, logistic, reciprocal;
the other relaxations use the PyTorch backend on CUDA). Tested on the CPU with Triton's
interpreter (``TRITON_INTERPRET=1``), which runs the same kernels with NumPy. Which kernel runs
for a tensor is decided by ``neco_loss.sorting.kernels.kernel_for``; ``verified`` checks these
kernels once per configuration against the PyTorch backend.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from neco_loss.sorting.kernels.cross_entropy import CrossEntropySettings
from neco_loss.sorting.kernels.plan import SortSettings, flat_plan
from neco_loss.sorting.kernels.recomputing import RecomputingCrossEntropy, RecomputingSort

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with CUDA builds of PyTorch
    triton = None
    tl = None

NAME = "native (Triton kernels)"
RELAXATIONS = ("cauchy", "logistic", "reciprocal")  # the ones _alpha implements
SCRATCH_BYTES = 1 << 30  # bound of backward's per-call layer states; rows are chunked to fit
CHECK_ROWS = 8  # rows of the self-check


def available() -> bool:
    """Whether Triton is importable."""
    return triton is not None


def can_run(x: Tensor, relaxation: str) -> bool:
    """Whether these kernels take ``x``: float32/float64, a relaxation they implement.

    The device is the dispatcher's choice (``neco_loss.sorting.kernels.kernel_for``): CUDA
    tensors, or CPU tensors under Triton's interpreter.
    """
    return available() and x.dtype in (torch.float32, torch.float64) and relaxation in RELAXATIONS


def usable(x: Tensor, network: str, relaxation: str) -> bool:
    """``can_run``, and ``verified`` once per configuration."""
    return can_run(x, relaxation) and verified(network, x.shape[1], relaxation, x.dtype, x.device)


def verified(
    network: str, n: int, relaxation: str, dtype: torch.dtype, device: torch.device
) -> bool:
    """Whether the kernels compile here and agree with the PyTorch backend (checked once).

    Whatever the caller's grad mode. A kernel that fails to compile or launch, or disagrees, is
    remembered (with one warning naming the cause) and the PyTorch backend is used for this
    configuration; any other error propagates and is not remembered.
    """
    return _kernel_failure(network, n, relaxation, dtype, device) is None


@lru_cache(maxsize=256)
def _kernel_failure(
    network: str, n: int, relaxation: str, dtype: torch.dtype, device: torch.device
) -> str | None:
    """Why the kernels cannot be used for this configuration, or ``None``; warns on a failure.

    Sorts forward and backward, and the fused CE, with the Triton kernels and with the PyTorch
    backend on ``CHECK_ROWS`` random rows. Cached: an exception (not a kernel failure) leaves no
    entry.
    """
    with torch.inference_mode(False), torch.enable_grad():
        failure = _compare_with_pytorch(network, n, relaxation, dtype, device)
    if failure is not None:
        warnings.warn(
            f"neco-loss: the Triton sorting kernels {failure} for {network}, n={n}, "
            f"{relaxation}, {dtype} on {device}; using the PyTorch native backend there.",
            RuntimeWarning,
            stacklevel=4,
        )
    return failure


def _compare_with_pytorch(
    network: str, n: int, relaxation: str, dtype: torch.dtype, device: torch.device
) -> str | None:
    from neco_loss.sorting.native import native_soft_sort
    from neco_loss.sorting.networks import sorting_plan
    from neco_loss.sorting.relaxations import get_relaxation

    generator = torch.Generator().manual_seed(0)
    x, teacher = torch.randn(2, CHECK_ROWS, n, generator=generator, dtype=dtype).to(device)
    x.requires_grad_()
    weights = torch.randn(CHECK_ROWS, n, n, generator=generator, dtype=dtype).to(device)
    sort = SortSettings(network, relaxation, 30.0)
    # An explicit clamp: probabilities far below it (logistic tails at steepness 100) are
    # rounding noise that differs between any two implementations; the check is of arithmetic.
    fused = CrossEntropySettings(network, relaxation, 100.0, 100.0, epsilon=1e-8)

    def pytorch_sort(scores: Tensor, settings: SortSettings) -> Tensor:
        plan = sorting_plan(network, n, device, dtype)
        relax = get_relaxation(relaxation)
        return native_soft_sort(scores, plan, relax, settings.steepness, settings.art_lambda)[1]

    def perm_and_grad(perm: Tensor) -> tuple[Tensor, Tensor]:
        (grad,) = torch.autograd.grad((perm * weights).sum(), x)
        return perm.detach(), grad

    def loss_and_grad(loss: Tensor) -> tuple[Tensor, Tensor]:
        (grad,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), grad

    expected = [
        perm_and_grad(pytorch_sort(x, sort)),
        loss_and_grad(
            fused.on_permutations(
                pytorch_sort(x, fused.sort("student")),
                pytorch_sort(teacher, fused.sort("teacher")),
            )
        ),
    ]
    try:
        results = [
            perm_and_grad(soft_sort(x, sort)[1]),
            loss_and_grad(sort_cross_entropy(x, teacher, fused)),
        ]
    except torch.OutOfMemoryError:  # transient, not the kernels' fault: never remembered
        raise
    except Exception as error:  # compile or launch error of the kernels
        return f"failed to run ({type(error).__name__}: {str(error).strip()[:200]})"
    tolerance = 1e-3 if dtype == torch.float32 else 1e-9
    for name, mine, theirs in zip(("sort", "fused CE"), results, expected, strict=True):
        for what, a, b in zip(("value", "gradient"), mine, theirs, strict=True):
            scale = max(1.0, b.abs().max().item())
            if not torch.allclose(a, b, rtol=0, atol=tolerance * scale):
                difference = (a - b).abs().max().item()
                return f"disagree with the PyTorch backend ({name} {what}: {difference:.2e})"
    return None


@dataclass(frozen=True)
class LayerTables:
    """A network as the Triton kernels read it: one row per layer, one column per wire.

    Per layer and (padded) wire: the partner wire, a first-of-pair flag, the comparator's sign
    and ``c1`` of fixed comparators, shapes ``(L, W)``; untouched wires are their own partner
    with sign 0 and fixed 1.
    """

    n: int
    n_dropped: int
    wires: int
    columns: int
    partner: Tensor  # int32
    first: Tensor  # float: 1 for the comparator's first wire
    sign: Tensor  # float: +1, -1, 0
    fixed: Tensor  # float

    @property
    def layers(self) -> int:
        """Number of layers ``L``."""
        return int(self.partner.shape[0])

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four tables, in the order every kernel takes them."""
        return self.partner, self.first, self.sign, self.fixed


@lru_cache(maxsize=256)
def layer_tables(network: str, n: int, device: torch.device, dtype: torch.dtype) -> LayerTables:
    """The tables of ``network`` for ``n`` inputs on ``device``, from ``flat_plan`` (cached)."""
    plan = flat_plan(network, n)
    wires = 1 << max(0, math.ceil(math.log2(plan.n_wires)))
    columns = 1 << max(0, math.ceil(math.log2(n)))
    layers = max(1, plan.n_layers)  # n == 1: one identity layer keeps the kernels simple
    layer = torch.repeat_interleave(torch.arange(plan.n_layers), plan.layer_offsets.diff())
    wire_a, wire_b, sign = plan.comparators[:, :3].unbind(dim=1)
    partner = torch.arange(wires).repeat(layers, 1)
    partner[layer, wire_a], partner[layer, wire_b] = wire_b, wire_a
    first = torch.zeros(layers, wires)
    first[layer, wire_a] = 1.0
    signs, fixed = torch.zeros(layers, wires), torch.ones(layers, wires)
    for wire in (wire_a, wire_b):
        signs[layer, wire], fixed[layer, wire] = sign.float(), plan.fixed.float()
    return LayerTables(
        n,
        plan.n_dropped,
        wires,
        columns,
        partner.to(device=device, dtype=torch.int32).contiguous(),
        first.to(device=device, dtype=dtype).contiguous(),
        signs.to(device=device, dtype=dtype).contiguous(),
        fixed.to(device=device, dtype=dtype).contiguous(),
    )


if triton is not None:

    @triton.jit
    def _atan(v):
        """Cephes' double-precision atan: range reduction and a rational approximation.

        Plain arithmetic, so that Triton's interpreter runs it too (it has no libdevice).
        """
        x = tl.abs(v)
        big = x > 2.414213562373095  # tan(3 pi / 8)
        middle = x > 0.66
        reduced = tl.where(
            big, -1.0 / tl.where(big, x, 1.0), tl.where(middle, (x - 1.0) / (x + 1.0), x)
        )
        zero = x * 0.0  # constants in x's dtype: tl.where of two literals would be float32
        offset = tl.where(
            big, zero + 1.5707963267948966, tl.where(middle, zero + 0.7853981633974483, zero)
        )
        extra = tl.where(
            big, zero + 6.123233995736766e-17, tl.where(middle, zero + 3.061616997868383e-17, zero)
        )
        z = reduced * reduced
        p = -8.750608600031904122785e-1
        p = p * z - 1.615753718733365076637e1
        p = p * z - 7.500855792314704667340e1
        p = p * z - 1.228866684490136173410e2
        p = p * z - 6.485021904942025371773e1
        q = z + 2.485846490142306297962e1
        q = q * z + 1.650270098316988542046e2
        q = q * z + 4.328810604912902668951e2
        q = q * z + 4.853903996359136964868e2
        q = q * z + 1.945506571482613964425e2
        result = offset + (reduced * (z * p / q) + reduced + extra)
        return tl.where(v < 0, -result, result)

    @triton.jit
    def _alpha(delta, steepness, kind: tl.constexpr):
        v = steepness * delta
        if kind == 0:  # cauchy (RELAXATION_CODES): atan(v) / pi + 1/2
            result = _atan(v) * 0.3183098861837907 + 0.5
        elif kind == 1:  # logistic
            result = tl.sigmoid(v)
        else:  # 4: reciprocal
            result = 0.5 * (v / (2.0 + tl.abs(v)) + 1.0)
        return result

    @triton.jit
    def _dalpha(delta, steepness, kind: tl.constexpr):
        v = steepness * delta
        if kind == 0:
            result = steepness / (1.0 + v * v) * 0.3183098861837907
        elif kind == 1:
            a = tl.sigmoid(v)
            result = a * (1.0 - a) * steepness
        else:
            d = 2.0 + tl.abs(v)
            result = steepness / (d * d)
        return result

    @triton.jit
    def _row_starts(row, n):
        """Where row ``row`` starts in ``(rows, n)`` and in ``(rows, n, n)`` tensors, in int64.

        ``program_id`` and ``n`` are int32: ``row * n * n`` would wrap at 2**31 elements.
        """
        row = row.to(tl.int64)
        return row * n, row * n * n

    @triton.jit
    def _layer_weights(values, partner_values, first, sign, fixed, steepness, kind: tl.constexpr):
        """Swap gap and (c1, c2) of every wire's comparator, seen from the wire."""
        delta = tl.where(first > 0, partner_values - values, values - partner_values)
        alpha = _alpha(delta, steepness, kind)
        c1 = tl.where(sign > 0, alpha, tl.where(sign < 0, 1.0 - alpha, fixed))
        c2 = tl.where(sign > 0, 1.0 - alpha, tl.where(sign < 0, alpha, 1.0 - fixed))
        return delta, c1, c2

    @triton.jit
    def _initial_state(
        x_ptr, row, n, n_dropped, W: tl.constexpr, NP: tl.constexpr, dtype: tl.constexpr
    ):
        wire = tl.arange(0, W)
        element = wire - n_dropped
        real = (element >= 0) & (element < n)
        row_start, _ = _row_starts(row, n)
        values = tl.load(x_ptr + row_start + element, mask=real, other=0.0).to(dtype)
        column = tl.arange(0, NP)
        state = tl.where(element[:, None] == column[None, :], 1.0, 0.0).to(dtype)
        return wire, values, state

    @triton.jit
    def _forward(
        x_ptr,
        row,
        n,
        n_dropped,
        layers,
        steepness,
        tables_ptrs,
        tape,
        KIND: tl.constexpr,
        W: tl.constexpr,
        NP: tl.constexpr,
        WITH_STATE: tl.constexpr,
        RECORD: tl.constexpr,
    ):
        """The network on one row: final values (W,) and state (W, NP).

        With RECORD, every layer's input values and state go to the tape (W * (NP + 1) numbers
        per layer).
        """
        partner_ptr, first_ptr, sign_ptr, fixed_ptr = tables_ptrs
        dtype = x_ptr.dtype.element_ty
        wire, values, state = _initial_state(x_ptr, row, n, n_dropped, W, NP, dtype)
        column = tl.arange(0, NP)
        for layer in range(layers):
            offset = layer * W + wire
            partner = tl.load(partner_ptr + offset)
            first = tl.load(first_ptr + offset)
            sign = tl.load(sign_ptr + offset)
            fixed = tl.load(fixed_ptr + offset)
            if RECORD:
                base = tape + layer * W * (NP + 1)
                tl.store(base + wire, values)
                tl.store(base + W + wire[:, None] * NP + column[None, :], state)
            partner_values = tl.gather(values, partner, 0)
            _, c1, c2 = _layer_weights(values, partner_values, first, sign, fixed, steepness, KIND)
            values = values * c1 + partner_values * c2
            if WITH_STATE:
                partner_state = tl.gather(state, tl.broadcast_to(partner[:, None], (W, NP)), 0)
                state = partner_state + c1[:, None] * (state - partner_state)
        return values, state

    @triton.jit
    def _reverse(
        grad_values,
        grad_state,
        layers,
        steepness,
        tables_ptrs,
        tape,
        KIND: tl.constexpr,
        W: tl.constexpr,
        NP: tl.constexpr,
        HAS_PERM: tl.constexpr,
    ):
        """From the gradients of the final values and state to those of the input values.

        Each layer's input is read from the tape.
        """
        partner_ptr, first_ptr, sign_ptr, fixed_ptr = tables_ptrs
        wire = tl.arange(0, W)
        column = tl.arange(0, NP)
        for step in range(layers):
            layer = layers - 1 - step
            offset = layer * W + wire
            partner = tl.load(partner_ptr + offset)
            first = tl.load(first_ptr + offset)
            sign = tl.load(sign_ptr + offset)
            fixed = tl.load(fixed_ptr + offset)
            base = tape + layer * W * (NP + 1)
            values_in = tl.load(base + wire)
            partner_values = tl.gather(values_in, partner, 0)
            delta, c1, c2 = _layer_weights(
                values_in, partner_values, first, sign, fixed, steepness, KIND
            )
            grad_partner = tl.gather(grad_values, partner, 0)
            # d loss / d c1 in the "first wire gets c1" orientation (the same on both wires)
            grad_alpha = (grad_values - grad_partner) * (values_in - partner_values)
            if HAS_PERM:
                state_in = tl.load(base + W + wire[:, None] * NP + column[None, :])
                index = tl.broadcast_to(partner[:, None], (W, NP))
                partner_state = tl.gather(state_in, index, 0)
                partner_grad_state = tl.gather(grad_state, index, 0)
                grad_alpha += tl.sum(
                    (grad_state - partner_grad_state) * (state_in - partner_state), axis=1
                )
                grad_state = partner_grad_state + c1[:, None] * (grad_state - partner_grad_state)
            grad_delta = grad_alpha * sign * _dalpha(delta, steepness, KIND)
            grad_values = c1 * grad_values + c2 * grad_partner
            grad_values += tl.where(first > 0, -grad_delta, grad_delta)
        return grad_values

    @triton.jit
    def _sort_forward_kernel(
        x_ptr,
        sorted_ptr,
        perm_ptr,
        partner_ptr,
        first_ptr,
        sign_ptr,
        fixed_ptr,
        n,
        n_dropped,
        layers,
        steepness_ptr,
        KIND: tl.constexpr,
        W: tl.constexpr,
        NP: tl.constexpr,
    ):
        row = tl.program_id(0)
        steepness = tl.load(steepness_ptr)  # in x's dtype: a float argument would be float32
        tables_ptrs = (partner_ptr, first_ptr, sign_ptr, fixed_ptr)
        values, state = _forward(
            x_ptr,
            row,
            n,
            n_dropped,
            layers,
            steepness,
            tables_ptrs,
            x_ptr,
            KIND,
            W,
            NP,
            True,
            False,
        )
        element = tl.arange(0, W) - n_dropped
        real = (element >= 0) & (element < n)
        row_start, perm_start = _row_starts(row, n)
        tl.store(sorted_ptr + row_start + element, values, mask=real)
        column = tl.arange(0, NP)
        # perm[row, e, rank] = state[n_dropped + rank, e]
        pointers = perm_ptr + perm_start + column[None, :] * n + element[:, None]
        tl.store(pointers, state, mask=real[:, None] & (column[None, :] < n))

    @triton.jit
    def _sort_backward_kernel(
        x_ptr,
        grad_sorted_ptr,
        grad_perm_ptr,
        grad_x_ptr,
        tape_ptr,
        partner_ptr,
        first_ptr,
        sign_ptr,
        fixed_ptr,
        row_offset,
        n,
        n_dropped,
        layers,
        steepness_ptr,
        KIND: tl.constexpr,
        W: tl.constexpr,
        NP: tl.constexpr,
        HAS_SORTED: tl.constexpr,
        HAS_PERM: tl.constexpr,
    ):
        local = tl.program_id(0)
        row = row_offset + local
        dtype = x_ptr.dtype.element_ty
        steepness = tl.load(steepness_ptr)
        tables_ptrs = (partner_ptr, first_ptr, sign_ptr, fixed_ptr)
        tape = tape_ptr + local.to(tl.int64) * layers * W * (NP + 1)
        _forward(
            x_ptr,
            row,
            n,
            n_dropped,
            layers,
            steepness,
            tables_ptrs,
            tape,
            KIND,
            W,
            NP,
            HAS_PERM,
            True,
        )
        element = tl.arange(0, W) - n_dropped
        real = (element >= 0) & (element < n)
        column = tl.arange(0, NP)
        row_start, perm_start = _row_starts(row, n)
        grad_values = tl.zeros((W,), dtype)
        if HAS_SORTED:
            grad_values = tl.load(grad_sorted_ptr + row_start + element, mask=real, other=0.0)
        grad_state = tl.zeros((W, NP), dtype)
        if HAS_PERM:
            pointers = grad_perm_ptr + perm_start + column[None, :] * n + element[:, None]
            grad_state = tl.load(
                pointers, mask=real[:, None] & (column[None, :] < n), other=0.0
            ).to(dtype)
        grad_values = _reverse(
            grad_values, grad_state, layers, steepness, tables_ptrs, tape, KIND, W, NP, HAS_PERM
        )
        tl.store(grad_x_ptr + row_start + element, grad_values, mask=real)

    @triton.jit
    def _cross_entropy_terms(
        student_state,
        teacher_state,
        n,
        n_dropped,
        first_rank,
        weight_ts,
        weight_st,
        epsilon,
        W: tl.constexpr,
        NP: tl.constexpr,
    ):
        """Per (rank wire, element) CE terms and d term / d Q_s, zero outside compared ranks.

        As permutation_losses: clamp_min before the log, its gradient where Q_s >= epsilon.
        """
        rank = tl.arange(0, W) - n_dropped
        column = tl.arange(0, NP)
        compared = ((rank >= first_rank) & (rank < n))[:, None] & (column[None, :] < n)
        qs = student_state
        qt = teacher_state
        log_s = tl.log(tl.maximum(qs, epsilon))
        log_t = tl.log(tl.maximum(qt, epsilon))
        terms = tl.where(compared, -(weight_ts * qt * log_s + weight_st * qs * log_t), 0.0)
        passes = qs >= epsilon
        ratio = qt / tl.where(passes, qs, 1.0)
        grad = -tl.where(passes, weight_ts * ratio, 0.0) - weight_st * log_t
        return terms, tl.where(compared, grad, 0.0)

    @triton.jit
    def _cross_entropy_forward_kernel(
        student_ptr,
        teacher_ptr,
        loss_ptr,
        partner_ptr,
        first_ptr,
        sign_ptr,
        fixed_ptr,
        n,
        n_dropped,
        layers,
        constants_ptr,
        first_rank,
        KIND: tl.constexpr,
        W: tl.constexpr,
        NP: tl.constexpr,
    ):
        row = tl.program_id(0)
        tables_ptrs = (partner_ptr, first_ptr, sign_ptr, fixed_ptr)
        # constants in the scores' dtype: steepness student, teacher, weights ts, st, epsilon
        steepness_student = tl.load(constants_ptr)
        steepness_teacher = tl.load(constants_ptr + 1)
        _, teacher_state = _forward(
            teacher_ptr,
            row,
            n,
            n_dropped,
            layers,
            steepness_teacher,
            tables_ptrs,
            teacher_ptr,
            KIND,
            W,
            NP,
            True,
            False,
        )
        _, student_state = _forward(
            student_ptr,
            row,
            n,
            n_dropped,
            layers,
            steepness_student,
            tables_ptrs,
            student_ptr,
            KIND,
            W,
            NP,
            True,
            False,
        )
        terms, _ = _cross_entropy_terms(
            student_state,
            teacher_state,
            n,
            n_dropped,
            first_rank,
            tl.load(constants_ptr + 2),
            tl.load(constants_ptr + 3),
            tl.load(constants_ptr + 4),
            W,
            NP,
        )
        tl.store(loss_ptr + row, tl.sum(tl.sum(terms, axis=1), axis=0) / n)

    @triton.jit
    def _cross_entropy_backward_kernel(
        student_ptr,
        teacher_ptr,
        grad_loss_ptr,
        grad_x_ptr,
        tape_ptr,
        partner_ptr,
        first_ptr,
        sign_ptr,
        fixed_ptr,
        row_offset,
        n,
        n_dropped,
        layers,
        constants_ptr,
        first_rank,
        KIND: tl.constexpr,
        W: tl.constexpr,
        NP: tl.constexpr,
    ):
        local = tl.program_id(0)
        row = row_offset + local
        dtype = student_ptr.dtype.element_ty
        tables_ptrs = (partner_ptr, first_ptr, sign_ptr, fixed_ptr)
        steepness_student = tl.load(constants_ptr)
        steepness_teacher = tl.load(constants_ptr + 1)
        tape = tape_ptr + local.to(tl.int64) * layers * W * (NP + 1)
        _, teacher_state = _forward(
            teacher_ptr,
            row,
            n,
            n_dropped,
            layers,
            steepness_teacher,
            tables_ptrs,
            tape,
            KIND,
            W,
            NP,
            True,
            False,
        )
        _, student_state = _forward(
            student_ptr,
            row,
            n,
            n_dropped,
            layers,
            steepness_student,
            tables_ptrs,
            tape,
            KIND,
            W,
            NP,
            True,
            True,
        )
        _, grad_state = _cross_entropy_terms(
            student_state,
            teacher_state,
            n,
            n_dropped,
            first_rank,
            tl.load(constants_ptr + 2),
            tl.load(constants_ptr + 3),
            tl.load(constants_ptr + 4),
            W,
            NP,
        )
        grad_state = grad_state * (tl.load(grad_loss_ptr + row) / n)
        grad_values = _reverse(
            tl.zeros((W,), dtype),
            grad_state.to(dtype),
            layers,
            steepness_student,
            tables_ptrs,
            tape,
            KIND,
            W,
            NP,
            True,
        )
        element = tl.arange(0, W) - n_dropped
        row_start, _ = _row_starts(row, n)
        tl.store(grad_x_ptr + row_start + element, grad_values, mask=(element >= 0) & (element < n))


def _launch_options(tables: LayerTables) -> dict[str, Any]:
    return {"W": tables.wires, "NP": tables.columns, "num_warps": 4 if tables.wires <= 64 else 8}


def _tape(tables: LayerTables, x: Tensor) -> tuple[int, Tensor]:
    """Rows per backward launch and their scratch: every layer's input values and state."""
    per_row = tables.layers * tables.wires * (tables.columns + 1)
    chunk = max(1, min(x.shape[0], SCRATCH_BYTES // (per_row * x.element_size())))
    return chunk, torch.empty(chunk * per_row, device=x.device, dtype=x.dtype)


def _triton_gradient(
    x: Tensor, settings: SortSettings, grad_sorted: Tensor | None, grad_perm: Tensor | None
) -> Tensor:
    rows, n = x.shape
    tables = layer_tables(settings.network, n, x.device, x.dtype)
    grad_x = torch.empty_like(x)
    chunk, tape = _tape(tables, x)
    steepness = x.new_full((1,), settings.steepness)
    sorted_grad = grad_sorted.contiguous() if grad_sorted is not None else x
    perm_grad = grad_perm.contiguous() if grad_perm is not None else x
    for start in range(0, rows, chunk):
        _sort_backward_kernel[(min(chunk, rows - start),)](
            x,
            sorted_grad,
            perm_grad,
            grad_x,
            tape,
            *tables.tensors(),
            start,
            n,
            tables.n_dropped,
            tables.layers,
            steepness,
            KIND=settings.code,
            HAS_SORTED=grad_sorted is not None,
            HAS_PERM=grad_perm is not None,
            **_launch_options(tables),
        )
    return grad_x


class _TritonSort(RecomputingSort):
    """Soft sort with the Triton kernels; backward recomputes from ``x``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, settings: SortSettings) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        RecomputingSort.remember(ctx, x, settings, _triton_gradient, NAME)
        rows, n = x.shape
        tables = layer_tables(settings.network, n, x.device, x.dtype)
        sorted_x = torch.empty_like(x)
        perm = torch.empty(rows, n, n, device=x.device, dtype=x.dtype)
        if rows:
            _sort_forward_kernel[(rows,)](
                x,
                sorted_x,
                perm,
                *tables.tensors(),
                n,
                tables.n_dropped,
                tables.layers,
                x.new_full((1,), settings.steepness),
                KIND=settings.code,
                **_launch_options(tables),
            )
        return sorted_x, perm


def soft_sort(x: Tensor, settings: SortSettings) -> tuple[Tensor, Tensor]:
    """Soft-sort the rows of ``x (rows, n)`` with the Triton kernels.

    Check ``can_run`` first; Triton's interpreter also runs them on CPU tensors.

    Returns:
        ``sorted_x (rows, n)`` and ``perm (rows, n, n)`` as every backend.

    """
    return _TritonSort.apply(x.contiguous(), settings)


def _cross_entropy_gradient(
    student: Tensor, teacher: Tensor, settings: CrossEntropySettings, grad_loss: Tensor
) -> Tensor:
    rows, n = student.shape
    tables = layer_tables(settings.network, n, student.device, student.dtype)
    grad = torch.empty_like(student)
    chunk, tape = _tape(tables, student)
    for start in range(0, rows, chunk):
        _cross_entropy_backward_kernel[(min(chunk, rows - start),)](
            student,
            teacher,
            grad_loss,
            grad,
            tape,
            *tables.tensors(),
            start,
            n,
            tables.n_dropped,
            tables.layers,
            _constants(settings, student),
            settings.first_rank(n),
            KIND=settings.sort("student").code,
            **_launch_options(tables),
        )
    return grad


class _TritonSortCrossEntropy(RecomputingCrossEntropy):
    """Per-row CE of the student's and the teacher's soft permutations on CUDA.

    Neither permutation is stored or returned; backward recomputes both rows.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, student: Tensor, teacher: Tensor, settings: CrossEntropySettings
    ) -> Tensor:
        RecomputingCrossEntropy.remember(
            ctx, student, teacher, settings, _cross_entropy_gradient, NAME + ", fused CE"
        )
        rows, n = student.shape
        tables = layer_tables(settings.network, n, student.device, student.dtype)
        loss = torch.empty(rows, device=student.device, dtype=student.dtype)
        if rows:
            _cross_entropy_forward_kernel[(rows,)](
                student,
                teacher,
                loss,
                *tables.tensors(),
                n,
                tables.n_dropped,
                tables.layers,
                _constants(settings, student),
                settings.first_rank(n),
                KIND=settings.sort("student").code,
                **_launch_options(tables),
            )
        return loss


def _constants(settings: CrossEntropySettings, like: Tensor) -> Tensor:
    """Steepnesses, CE weights and epsilon in the scores' dtype (float arguments are float32)."""
    values = [
        settings.steepness_student,
        settings.steepness_teacher,
        float(settings.teacher_to_student),
        float(settings.student_to_teacher),
        settings.log_floor(like.dtype),
    ]
    return torch.tensor(values, device=like.device, dtype=like.dtype)


def sort_cross_entropy(
    student_scores: Tensor, teacher_scores: Tensor, settings: CrossEntropySettings
) -> Tensor:
    """Per-row CE of two score matrices' soft permutations, none materialised (``(rows,)``).

    Check ``can_run`` first (Triton's interpreter also runs it on CPU tensors).
    """
    return _TritonSortCrossEntropy.apply(
        student_scores.contiguous(), teacher_scores.detach().contiguous(), settings
    )
