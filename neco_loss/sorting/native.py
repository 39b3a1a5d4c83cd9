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

from neco_loss.sorting.networks import Layer, SortingPlan
from neco_loss.sorting.relaxations import Relaxation

FORWARD_CHUNK_BYTES = 8 * 2**20  # one permutation state of a chunk of rows
BACKWARD_CHUNK_BYTES = 64 * 2**20  # all recomputed layer states of a backward chunk


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


def _merge_groups(perm: Tensor) -> Tensor:
    """Block-diagonal merge ``(rows, G, S, S) -> (rows, G / 2, 2S, 2S)`` of adjacent groups."""
    rows, groups, size, _ = perm.shape
    pairs = perm.view(rows, groups // 2, 2, size, size)
    merged = perm.new_zeros(rows, groups // 2, 2 * size, 2 * size)
    merged[:, :, :size, :size] = pairs[:, :, 0]
    merged[:, :, size:, size:] = pairs[:, :, 1]
    return merged


def _split_groups(grad: Tensor) -> Tensor:
    """Adjoint of ``_merge_groups``: keep the diagonal blocks, ``(rows, G, 2S, 2S) -> (rows, 2G, S, S)``."""
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
class _LayerRecord:
    """What backward needs of one layer: its inputs and swap probabilities."""

    values: Tensor  # (rows, G, S)
    perm: Tensor | None  # (rows, G, S, S)
    delta: Tensor  # (rows, G, C, half)
    c1: Tensor
    c2: Tensor


def _run_network(
    x: Tensor, settings: _SortSettings, with_perm: bool, record: bool
) -> tuple[Tensor, Tensor | None, list[_LayerRecord]]:
    """Run the relaxed network on ``x (rows, n)``.

    Returns:
        ``sorted (rows, n)``, the wire-major permutation ``(rows, n_wires, n_wires)`` with
        ``[r, wire, element]`` (or ``None`` without ``with_perm``), and per-layer records when
        ``record`` is set.
    """
    plan = settings.plan
    rows = x.shape[0]
    values = _pad(x, plan)
    perm = None
    records: list[_LayerRecord] = []
    for index, stage in enumerate(plan.stages):
        values = values.reshape(rows, stage.groups, stage.group_size)
        if with_perm:
            perm = _initial_perm(rows, plan, x) if index == 0 else _merge_groups(perm)
        for layer in stage.layers:
            first, second = _pair_views(values, layer)
            delta = second - first
            alpha = settings.relaxation.alpha(delta, settings.steepness, settings.art_lambda)
            c1, c2 = _coefficients(alpha, layer)
            if record:
                records.append(_LayerRecord(values, perm, delta, c1, c2))
            values = _mix_exact(values, layer, c1, c2)
            if perm is not None:
                perm = _mix_perm(perm, layer, c1)
    values = values.reshape(rows, plan.n_wires)
    if with_perm and perm is None:  # n == 1: no layer at all
        perm = x.new_ones(rows, 1, 1)
    if perm is not None:
        perm = perm.reshape(rows, plan.n_wires, plan.n_wires)
    return values[:, plan.n_dropped :], perm, records


def _backward_chunk(
    x: Tensor, grad_sorted: Tensor | None, grad_perm: Tensor | None, settings: _SortSettings
) -> Tensor:
    """Gradient w.r.t. ``x (rows, n)`` for one chunk of rows (recomputes the forward)."""
    plan = settings.plan
    rows = x.shape[0]
    with_perm = grad_perm is not None
    _, _, records = _run_network(x, settings, with_perm=with_perm, record=True)
    grad_values = _pad(grad_sorted if grad_sorted is not None else torch.zeros_like(x), plan)
    grad_state = None
    if grad_perm is not None:
        # element-major (rows, n, n) -> wire-major, zero rows/columns for the dropped wires
        wire_major = grad_perm.transpose(1, 2)
        grad_state = wire_major.new_zeros(rows, 1, plan.n_wires, plan.n_wires)
        grad_state[:, 0, plan.n_dropped :, plan.n_dropped :] = wire_major
    layer_index = len(records)
    for index in reversed(range(len(plan.stages))):
        stage = plan.stages[index]
        grad_values = grad_values.reshape(rows, stage.groups, stage.group_size)
        if grad_state is not None and grad_state.shape[1] != stage.groups:
            grad_state = _split_groups(grad_state)
        for layer in reversed(stage.layers):
            layer_index -= 1
            rec = records[layer_index]
            g_first, g_second = _pair_views(grad_values, layer)
            v_first, v_second = _pair_views(rec.values, layer)
            # d loss / d alpha of the "a gets alpha" orientation, summed over what the wire carries
            grad_alpha = (g_first - g_second) * (v_first - v_second)
            if grad_state is not None:
                h_first, h_second = _pair_views(grad_state, layer)
                p_first, p_second = _pair_views(rec.perm, layer)
                grad_alpha = grad_alpha + ((h_first - h_second) * (p_first - p_second)).sum(-1)
            if layer.sign is not None:
                grad_alpha = grad_alpha * layer.sign
            grad_delta = grad_alpha * settings.relaxation.dalpha(
                rec.delta, settings.steepness, settings.art_lambda
            )
            grad_values = _mix_exact(grad_values, layer, rec.c1, rec.c2)
            g_first, g_second = _pair_views(grad_values, layer)
            g_first.sub_(grad_delta)
            g_second.add_(grad_delta)
            if grad_state is not None:
                grad_state = _mix_perm(grad_state, layer, rec.c1)
    return grad_values.reshape(rows, plan.n_wires)[:, plan.n_dropped :]


def _rows_per_chunk(plan: SortingPlan, element_size: int, with_records: bool) -> int:
    """Rows processed at once, so that each working tensor stays small.

    Chunks keep every allocation below glibc's largest mmap threshold (32 MiB), so freed
    buffers are reused instead of being returned to the system and page-faulted in again, which
    costs more than the arithmetic at NeCo's sizes. Backward additionally keeps every layer's
    state of its chunk.
    """
    numbers_per_row = plan.n_wires * plan.n_wires
    if with_records:
        numbers_per_row = sum(
            len(stage.layers) * plan.n_wires * (stage.group_size + 4) for stage in plan.stages
        )
    budget = BACKWARD_CHUNK_BYTES if with_records else FORWARD_CHUNK_BYTES
    return max(1, budget // max(1, numbers_per_row * element_size))


class _NativeSort(torch.autograd.Function):
    """Soft sort with a recomputing backward: memory held for backward is ``x`` alone."""

    @staticmethod
    def forward(ctx, x: Tensor, settings: _SortSettings) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.settings = settings
        ctx.save_for_backward(x)
        rows, n = x.shape
        dropped = settings.plan.n_dropped
        sorted_x = torch.empty_like(x)
        perm = x.new_empty(rows, n, n)
        chunk = _rows_per_chunk(settings.plan, x.element_size(), with_records=False)
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            sorted_part, wire_major, _ = _run_network(x[part], settings, True, record=False)
            assert wire_major is not None
            sorted_x[part] = sorted_part
            perm[part] = wire_major[:, dropped:, dropped:].transpose(1, 2)
        return sorted_x, perm

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad_sorted: Tensor | None, grad_perm: Tensor | None
    ) -> tuple[Tensor | None, None]:
        (x,) = ctx.saved_tensors
        if grad_sorted is None and grad_perm is None:
            return None, None
        settings: _SortSettings = ctx.settings
        chunk = _rows_per_chunk(settings.plan, x.element_size(), with_records=True)
        grads = [
            _backward_chunk(
                x[start : start + chunk],
                None if grad_sorted is None else grad_sorted[start : start + chunk],
                None if grad_perm is None else grad_perm[start : start + chunk],
                settings,
            )
            for start in range(0, x.shape[0], chunk)
        ]
        return torch.cat(grads, dim=0), None


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
