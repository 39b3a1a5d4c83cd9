"""``RecomputingSort``: the autograd protocol of the sorting kernels that recompute in backward.

Forward saves the input ``x`` alone; backward hands the incoming gradients of ``sorted_x`` and
``perm`` (either may be missing) to the kernel's gradient function, which recomputes the
network from ``x``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Gradient = Callable[[Tensor, Any, Tensor | None, Tensor | None], Tensor]


class RecomputingSort(torch.autograd.Function):
    """Base of a soft sort ``(x, settings) -> (sorted_x, perm)`` that keeps only ``x``.

    A subclass's ``forward`` calls ``remember(ctx, x, settings, gradient)`` and returns the
    kernel's outputs; ``gradient(x, settings, grad_sorted, grad_perm)`` returns ``d loss / d x``.
    """

    @staticmethod
    def remember(ctx: Any, x: Tensor, settings: Any, gradient: Gradient) -> None:
        """Keep what backward needs: ``x``, the settings and the gradient function."""
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        ctx.settings = settings
        ctx.gradient = gradient

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_sorted: Tensor | None, grad_perm: Tensor | None
    ) -> tuple[Tensor | None, None]:
        """``d loss / d x`` from the gradients of ``sorted_x`` and ``perm``, by recomputing."""
        if grad_sorted is None and grad_perm is None:
            return None, None
        (x,) = ctx.saved_tensors
        return ctx.gradient(x, ctx.settings, grad_sorted, grad_perm), None
