"""``RecomputingSort``: the autograd protocol of the sorting kernels that recompute in backward.

Forward saves the input ``x`` alone; backward hands the incoming gradients of ``sorted_x`` and
``perm`` (either may be missing) to the kernel's gradient function, which recomputes the
network from ``x``. These backwards are first-order only: ``refuse_double_backward`` raises
when autograd asks for a differentiable gradient (``create_graph=True``) instead of returning a
gradient that silently carries no graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Gradient = Callable[[Tensor, Any, Tensor | None, Tensor | None], Tensor]
CrossEntropyGradient = Callable[[Tensor, Tensor, Any, Tensor], Tensor]


def refuse_double_backward(backend: str) -> None:
    """Raise if the running backward was asked for a graph (``create_graph=True``).

    Autograd runs a backward with grad mode on exactly when ``create_graph=True``.

    Raises:
        RuntimeError: Naming ``backend`` and the backend that supports it.

    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the {backend} soft sort has a first-order backward only: it cannot be "
            "differentiated twice (create_graph=True, e.g. gradient penalties or meta-learning). "
            "Use backend='diffsort', whose operations autograd differentiates to any order."
        )


class _FirstOrderOnly(torch.autograd.Function):
    """Identity whose backward refuses ``create_graph=True``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, backend: str) -> Tensor:  # type: ignore[override]
        ctx.backend = backend
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        refuse_double_backward(ctx.backend)
        return grad, None


def first_order_only(x: Tensor, backend: str) -> Tensor:
    """``x`` unchanged, but a backward through it with ``create_graph=True`` raises.

    For third-party operations whose second derivative is wrong (torchsort's soft ranks):
    pass their input through this.
    """
    return _FirstOrderOnly.apply(x, backend)


class RecomputingSort(torch.autograd.Function):
    """Base of a soft sort ``(x, settings) -> (sorted_x, perm)`` that keeps only ``x``.

    A subclass's ``forward`` calls ``remember(ctx, x, settings, gradient, backend)`` and returns
    the kernel's outputs; ``gradient(x, settings, grad_sorted, grad_perm)`` returns
    ``d loss / d x``.
    """

    @staticmethod
    def remember(ctx: Any, x: Tensor, settings: Any, gradient: Gradient, backend: str) -> None:
        """Keep what backward needs: ``x``, the settings, the gradient function and its name."""
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        ctx.settings = settings
        ctx.gradient = gradient
        ctx.backend = backend

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_sorted: Tensor | None, grad_perm: Tensor | None
    ) -> tuple[Tensor | None, None]:
        """``d loss / d x`` from the gradients of ``sorted_x`` and ``perm``, by recomputing."""
        if grad_sorted is None and grad_perm is None:
            return None, None
        refuse_double_backward(ctx.backend)
        (x,) = ctx.saved_tensors
        return ctx.gradient(x, ctx.settings, grad_sorted, grad_perm), None


class RecomputingCrossEntropy(torch.autograd.Function):
    """Base of a fused sort+CE ``(student, teacher, settings) -> (rows,)`` keeping the scores.

    A subclass's ``forward`` calls ``remember(ctx, student, teacher, settings, gradient,
    backend)`` and returns the kernel's per-row losses; ``gradient(student, teacher, settings,
    grad_loss)`` returns ``d loss / d student`` (the teacher gets none).
    """

    @staticmethod
    def remember(
        ctx: Any,
        student: Tensor,
        teacher: Tensor,
        settings: Any,
        gradient: CrossEntropyGradient,
        backend: str,
    ) -> None:
        """Keep what backward needs: both score matrices, the settings and the gradient."""
        ctx.save_for_backward(student, teacher)
        ctx.settings = settings
        ctx.gradient = gradient
        ctx.backend = backend

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: Tensor
    ) -> tuple[Tensor, None, None]:
        """``d loss / d student``, recomputing both sorts."""
        refuse_double_backward(ctx.backend)
        student, teacher = ctx.saved_tensors
        return ctx.gradient(student, teacher, ctx.settings, grad_loss.contiguous()), None, None
