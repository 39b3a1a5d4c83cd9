"""Second-order gradients: supported and correct (gradgradcheck), or refused with a clear error,
never a gradient that silently carries no graph."""

import pytest
import torch

from neco_loss import neco_loss, soft_permutation
from neco_loss.functional import SortOptions, soft_permutation_loss
from neco_loss.sorting.kernels.cpp import cpu_kernels

FIRST_ORDER_BACKENDS = {
    "native": "native \\(C\\+\\+ kernel\\)" if cpu_kernels() is not None else "native-python",
    "native-python": "native-python",
    "torchsort": "torchsort",
}


@pytest.mark.parametrize("network", ["bitonic", "odd_even"])
@pytest.mark.parametrize("n", [2, 5])
def test_diffsort_supports_double_backward(network, n):
    x = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda v: soft_permutation(v, network, 3.0, backend="diffsort"), (x,)
    )


@pytest.mark.parametrize("backend", sorted(FIRST_ORDER_BACKENDS))
def test_first_order_backends_refuse_create_graph(backend):
    if backend == "torchsort":
        pytest.importorskip("torchsort")
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    sorted_x, perm = soft_permutation(x, steepness=3.0, backend=backend)
    loss = (perm * torch.randn_like(perm)).sum() + sorted_x.sum()
    name = FIRST_ORDER_BACKENDS[backend]
    with pytest.raises(RuntimeError, match=f"the {name} soft sort .*backend='diffsort'"):
        torch.autograd.grad(loss, x, create_graph=True)
    (grad,) = torch.autograd.grad(loss, x)  # first order still works
    assert torch.isfinite(grad).all()


@pytest.mark.skipif(cpu_kernels() is None, reason="needs the C++ kernel")
def test_the_fused_cross_entropy_refuses_create_graph():
    student = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    terms = soft_permutation_loss(student, torch.randn(4, 9, dtype=torch.float64), SortOptions())
    assert terms.q_student is None  # the fused kernel ran
    with pytest.raises(RuntimeError, match="C\\+\\+ kernel\\), fused CE soft sort.*diffsort"):
        torch.autograd.grad(terms.per_row.sum(), student, create_graph=True)


def test_a_gradient_penalty_through_neco_loss_with_diffsort():
    """The advertised alternative works through similarities, sorts and CE: d/dx |dL/dx|^2.

    (``NeCoLoss`` itself ROI-aligns with torchvision's ``roi_align``, which has no double
    backward and says so.)
    """
    student = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 8, dtype=torch.float64)
    loss = neco_loss(student, teacher, teacher[0], backend="diffsort", steepness=5.0)
    (grad,) = torch.autograd.grad(loss, student, create_graph=True)
    assert grad.requires_grad
    (second,) = torch.autograd.grad(grad.square().sum(), student)
    assert torch.isfinite(second).all() and second.abs().sum() > 0
