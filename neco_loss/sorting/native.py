"""Native soft sorting network: diffsort's mathematics without its dense matrices.

diffsort builds the soft permutation by multiplying ``n x n`` one-hot split/combine matrices
per layer (about ``2 n^3`` multiply-adds per row and layer) and autograd keeps every layer for
backward. A layer only mixes disjoint pairs of wires, so here each layer is two strided views and
four fused multiply-adds, and the bitonic network's block-diagonal structure skips the zeros.

Backward is hand-written (``_NativeSort``): forward keeps only the input ``x`` (``rows * n``
numbers); backward recomputes the layers, in chunks of rows so that the transient memory stays
bounded, and propagates gradients through the same 2x2 mixes in reverse order (the mix is
symmetric, so its adjoint is itself) plus the derivative of the swap probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neco_loss.sorting.kernels.recomputing import RecomputingSort
from neco_loss.sorting.networks import Layer, SortingPlan
from neco_loss.sorting.relaxations import Relaxation

# Working-set budgets of a chunk of rows: (forward permutation state, backward layer states).
# On the CPU small chunks keep allocations below glibc's mmap threshold; on a GPU every chunk
# costs a few hundred kernel launches, so chunks are as large as memory comfortably allows.
CHUNK_BYTES = {"cpu": (8 * 2**20, 64 * 2**20), "cuda": (512 * 2**20, 2 * 2**30)}


@dataclass(frozen=True)
class _SortSettings:
    plan: SortingPlan
    relaxation: Relaxation
    steepness: float
    art_lambda: float


def _pair_views(state: Tensor, layer: Layer) -> tuple[Tensor, Tensor]:
    """Views of the first and second wires of every comparator of ``layer``.

    Args:
        state: ``(rows, groups, group_size, *tail)``.
        layer: The layer.

    Returns:
        Two views of shape ``(rows, groups, chunks, half, *tail)``.

    """
    span = state[:, :, layer.start : layer.stop].unflatten(2, (layer.chunks, 2, layer.half))
    return span[:, :, :, 0], span[:, :, :, 1]


def _mix_exact(values: Tensor, layer: Layer, c1: Tensor, c2: Tensor) -> Tensor:
    """Apply one layer to the values: ``a' = c1 a + c2 b`` and ``b' = c2 a + c1 b``.

    The values decide every later swap probability, and the relaxed network amplifies rounding
    differences there, so this follows diffsort's floating-point operations exactly.

    Args:
        values: ``(rows, groups, group_size)``.
        layer: The layer.
        c1: ``(rows, groups, chunks, half)`` weight of a wire's own value.
        c2: Same shape, weight of its partner's value.

    Returns:
        The new values, same shape.

    """
    out = _copy_untouched(values, layer)
    a, b = _pair_views(values, layer)
    out_a, out_b = _pair_views(out, layer)
    torch.mul(a, c1, out=out_a)
    out_a.add_(b * c2)
    torch.mul(a, c2, out=out_b)
    out_b.add_(b * c1)
    return out


def _mix_perm(state: Tensor, layer: Layer, c1: Tensor) -> Tensor:
    """Apply one layer to permutation rows: ``a' = b + c1 (a - b)``, ``b' = a + c1 (b - a)``.

    Two fused ``lerp`` passes per layer. Swap probabilities do not depend on the permutation, so
    its rounding does not feed back, and ``c2 = 1 - c1`` holds for every comparator kind. The 2x2
    matrix is symmetric, so the same call back-propagates a gradient.

    Args:
        state: ``(rows, groups, group_size, size)``.
        layer: The layer.
        c1: ``(rows, groups, chunks, half)`` weight of a wire's own row.

    Returns:
        The new state, same shape.

    """
    out = _copy_untouched(state, layer)
    weight = c1.unsqueeze(-1)
    a, b = _pair_views(state, layer)
    out_a, out_b = _pair_views(out, layer)
    torch.lerp(b, a, weight, out=out_a)
    torch.lerp(a, b, weight, out=out_b)
    return out


def _copy_untouched(state: Tensor, layer: Layer) -> Tensor:
    """A new tensor like ``state`` holding its wires outside ``layer``'s slice."""
    out = torch.empty_like(state)
    if layer.start > 0:
        out[:, :, : layer.start] = state[:, :, : layer.start]
    if layer.stop < state.shape[2]:
        out[:, :, layer.stop :] = state[:, :, layer.stop :]
    return out


def _coefficients(alpha: Tensor, layer: Layer) -> tuple[Tensor, Tensor]:
    """Turn swap probabilities into per-wire weights ``(c1, c2)``.

    Ascending comparators send ``alpha a + (1 - alpha) b`` to wire a (diffsort's min), descending
    ones send it to wire b, fixed ones keep (``fixed = 1``) or swap (``fixed = 0``) both wires.
    Computing ``1 - alpha`` once, as diffsort does, keeps tiny probabilities bit-compatible.
    """
    one_minus = 1 - alpha
    if layer.sign is None or layer.fixed is None:
        return alpha, one_minus
    sign, fixed = layer.sign, layer.fixed
    c1 = torch.where(sign > 0, alpha, torch.where(sign < 0, one_minus, fixed))
    c2 = torch.where(sign > 0, one_minus, torch.where(sign < 0, alpha, 1 - fixed))
    return c1, c2


def _merge_groups(perm: Tensor, first_element: int = 0) -> Tensor:
    """Block-diagonal merge ``(rows, G, S, S) -> (rows, G / 2, 2S, 2S - first_element)``.

    Adjacent groups become one; columns before ``first_element`` (padding elements, which never
    mix with real ones) are left out.
    """
    rows, groups, size, _ = perm.shape
    pairs = perm.view(rows, groups // 2, 2, size, size)
    merged = perm.new_zeros(rows, groups // 2, 2 * size, 2 * size - first_element)
    merged[:, :, :size, : size - first_element] = pairs[:, :, 0, :, first_element:]
    merged[:, :, size:, size - first_element :] = pairs[:, :, 1]
    return merged


def _split_groups(grad: Tensor, first_element: int = 0) -> Tensor:
    """Adjoint of ``_merge_groups``: ``(rows, G, 2S, 2S - f) -> (rows, 2G, S, S)`` diagonals."""
    if first_element:
        grad = torch.nn.functional.pad(grad, (first_element, 0))
    rows, groups, size2, _ = grad.shape
    size = size2 // 2
    blocks = grad.view(rows, groups, 2, size, 2, size)
    diagonal = torch.stack((blocks[:, :, 0, :, 0], blocks[:, :, 1, :, 1]), dim=2)
    return diagonal.reshape(rows, 2 * groups, size, size)


def _pad(values: Tensor, plan: SortingPlan) -> Tensor:
    """Prepend the dropped wires: ``(rows, n) -> (rows, n_wires)`` (zeros, never compared)."""
    if plan.n_dropped == 0:
        return values
    return torch.cat((values.new_zeros(values.shape[0], plan.n_dropped), values), dim=1)


def _initial_perm(rows: int, plan: SortingPlan, like: Tensor) -> Tensor:
    """Identity permutation in the first stage's block layout, ``(rows, G, S, S)``."""
    stage = plan.stages[0]
    eye = torch.eye(stage.group_size, dtype=like.dtype, device=like.device)
    return eye.expand(rows, stage.groups, -1, -1).contiguous()


@dataclass
class _ValuePass:
    """The network run on the values of all rows: what the permutation pass and backward need.

    Per layer, in execution order: ``c1``, ``c2`` ``(rows, G, C, half)`` weights; with
    ``record`` also the layer's input values ``(rows, G, S)`` and gaps ``delta = b - a``.
    """

    sorted_x: Tensor  # (rows, n)
    c1: list[Tensor]
    c2: list[Tensor]
    values: list[Tensor]
    delta: list[Tensor]


def _value_pass(x: Tensor, settings: _SortSettings, record: bool) -> _ValuePass:
    """Run the relaxed network on the values ``x (rows, n)`` and keep its weights."""
    plan = settings.plan
    rows = x.shape[0]
    values = _pad(x, plan)
    result = _ValuePass(x, [], [], [], [])
    for stage in plan.stages:
        values = values.reshape(rows, stage.groups, stage.group_size)
        for layer in stage.layers:
            first, second = _pair_views(values, layer)
            delta = second - first
            alpha = settings.relaxation.alpha(delta, settings.steepness, settings.art_lambda)
            c1, c2 = _coefficients(alpha, layer)
            result.c1.append(c1)
            result.c2.append(c2)
            if record:
                result.values.append(values)
                result.delta.append(delta)
            values = _mix_exact(values, layer, c1, c2)
    result.sorted_x = values.reshape(rows, plan.n_wires)[:, plan.n_dropped :]
    return result


def _perm_pass(c1: list[Tensor], plan: SortingPlan, record: bool) -> tuple[Tensor, list[Tensor]]:
    """Build the wire-major permutation of a chunk of rows from its layer weights ``c1``.

    The last stage carries the real elements only (its largest state skips the padding columns).

    Returns:
        ``(rows, n_wires, n)`` with ``[r, wire, element]``, and with ``record`` every layer's
        input state (block layout of its stage).

    """
    rows = c1[0].shape[0]
    last = len(plan.stages) - 1
    perm = _initial_perm(rows, plan, c1[0])
    if last == 0 and plan.n_dropped:
        perm = perm[..., plan.n_dropped :].contiguous()
    states: list[Tensor] = []
    index = 0
    for stage_index, stage in enumerate(plan.stages):
        if stage_index > 0:
            perm = _merge_groups(perm, plan.n_dropped if stage_index == last else 0)
        for layer in stage.layers:
            if record:
                states.append(perm)
            perm = _mix_perm(perm, layer, c1[index])
            index += 1
    return perm.reshape(rows, plan.n_wires, plan.n), states


def _perm_grad_alpha(c1: list[Tensor], grad_perm: Tensor, plan: SortingPlan) -> list[Tensor]:
    """D loss / d alpha of every layer through the permutation, for a chunk of rows.

    Args:
        c1: Layer weights of the chunk.
        grad_perm: ``(rows, n, n)`` element-major gradient of the permutation.
        plan: The network.

    Returns:
        Per layer ``(rows, G, C, half)``, in the "wire a gets alpha" orientation.

    """
    rows = grad_perm.shape[0]
    _, states = _perm_pass(c1, plan, record=True)
    # element-major (rows, n, n) -> wire-major (rows, 1, n_wires, n), zero rows for padding wires
    grad_state = grad_perm.new_zeros(rows, 1, plan.n_wires, plan.n)
    grad_state[:, 0, plan.n_dropped :] = grad_perm.transpose(1, 2)
    grads_reversed: list[Tensor] = []
    index = len(states)
    for stage_index in reversed(range(len(plan.stages))):
        stage = plan.stages[stage_index]
        if stage_index < len(plan.stages) - 1:
            is_last_split = stage_index == len(plan.stages) - 2
            grad_state = _split_groups(grad_state, plan.n_dropped if is_last_split else 0)
        for layer in reversed(stage.layers):
            index -= 1
            h_first, h_second = _pair_views(grad_state, layer)
            p_first, p_second = _pair_views(states[index], layer)
            grads_reversed.append(torch.linalg.vecdot(h_first - h_second, p_first - p_second))
            grad_state = _mix_perm(grad_state, layer, c1[index])
    return grads_reversed[::-1]


def _values_backward(
    forward: _ValuePass,
    grad_sorted: Tensor | None,
    perm_grad_alpha: list[Tensor] | None,
    settings: _SortSettings,
) -> Tensor:
    """Gradient w.r.t. ``x`` through the values, adding the permutation's d loss / d alpha."""
    plan = settings.plan
    rows = forward.sorted_x.shape[0]
    if grad_sorted is None:
        grad_sorted = torch.zeros_like(forward.sorted_x)
    grad_values = _pad(grad_sorted, plan)
    index = len(forward.c1)
    for stage in reversed(plan.stages):
        grad_values = grad_values.reshape(rows, stage.groups, stage.group_size)
        for layer in reversed(stage.layers):
            index -= 1
            g_first, g_second = _pair_views(grad_values, layer)
            v_first, v_second = _pair_views(forward.values[index], layer)
            # d loss / d alpha in the "wire a gets alpha" orientation, then the comparator's sign
            grad_alpha = (g_first - g_second) * (v_first - v_second)
            if perm_grad_alpha is not None:
                grad_alpha = grad_alpha + perm_grad_alpha[index]
            if layer.sign is not None:
                grad_alpha = grad_alpha * layer.sign
            grad_delta = grad_alpha * settings.relaxation.dalpha(
                forward.delta[index], settings.steepness, settings.art_lambda
            )
            grad_values = _mix_exact(grad_values, layer, forward.c1[index], forward.c2[index])
            g_first, g_second = _pair_views(grad_values, layer)
            g_first.sub_(grad_delta)
            g_second.add_(grad_delta)
    return grad_values.reshape(rows, plan.n_wires)[:, plan.n_dropped :]


def _rows_per_chunk(plan: SortingPlan, like: Tensor, with_records: bool) -> int:
    """Rows of the permutation pass processed at once, so that each working tensor stays small.

    Chunks keep every allocation below glibc's largest mmap threshold (32 MiB), so freed
    buffers are reused instead of being returned to the system and page-faulted in again, which
    costs more than the arithmetic at NeCo's sizes. Backward additionally keeps every layer's
    state of its chunk.
    """
    numbers_per_row = plan.n_wires * plan.n_wires
    if with_records:
        numbers_per_row = sum(
            len(stage.layers) * plan.n_wires * stage.group_size for stage in plan.stages
        )
    budgets = CHUNK_BYTES.get(like.device.type, CHUNK_BYTES["cuda"])
    budget = budgets[1] if with_records else budgets[0]
    return max(1, budget // max(1, numbers_per_row * like.element_size()))


def _native_gradient(
    x: Tensor, settings: _SortSettings, grad_sorted: Tensor | None, grad_perm: Tensor | None
) -> Tensor:
    """``d loss / d x``: the value pass again (recorded), the permutation's in row chunks."""
    plan = settings.plan
    values = _value_pass(x, settings, record=True)
    perm_grad_alpha = None
    if grad_perm is not None and plan.stages:
        chunk = _rows_per_chunk(plan, x, with_records=True)
        parts = [
            _perm_grad_alpha(
                [c[start : start + chunk] for c in values.c1],
                grad_perm[start : start + chunk],
                plan,
            )
            for start in range(0, x.shape[0], chunk)
        ]
        perm_grad_alpha = [torch.cat(layer, dim=0) for layer in zip(*parts, strict=True)]
    return _values_backward(values, grad_sorted, perm_grad_alpha, settings)


class _NativeSort(RecomputingSort):
    """Soft sort with a recomputing backward: memory held for backward is ``x`` alone."""

    @staticmethod
    def forward(ctx, x: Tensor, settings: _SortSettings) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        RecomputingSort.remember(ctx, x, settings, _native_gradient, "native-python")
        plan = settings.plan
        rows, n = x.shape
        values = _value_pass(x, settings, record=False)
        if not plan.stages:  # n == 1
            return values.sorted_x.clone(), x.new_ones(rows, 1, 1)
        perm = x.new_empty(rows, n, n)
        chunk = _rows_per_chunk(plan, x, with_records=False)
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            wire_major, _ = _perm_pass([c[part] for c in values.c1], plan, record=False)
            perm[part] = wire_major[:, plan.n_dropped :].transpose(1, 2)
        return values.sorted_x, perm


def native_soft_sort(
    x: Tensor, plan: SortingPlan, relaxation: Relaxation, steepness: float, art_lambda: float
) -> tuple[Tensor, Tensor]:
    """Soft-sort the rows of ``x`` with the native backend.

    Args:
        x: ``(rows, n)`` floating tensor in its compute dtype (float32 or float64), validated.
        plan: Comparator schedule for ``n`` (from ``sorting_plan``), signs in ``x``'s dtype.
        relaxation: Swap probability.
        steepness: Inverse temperature of the swap probability.
        art_lambda: Exponent of ``logistic_phi``.

    Returns:
        ``sorted_x (rows, n)`` and ``perm (rows, n, n)`` with ``perm[r, i, j]`` the probability
        that element ``i`` lands at rank ``j``.

    """
    settings = _SortSettings(plan, relaxation, float(steepness), float(art_lambda))
    return _NativeSort.apply(x, settings)
