"""Public interface: registry, argument errors, memory held for backward, optional backends."""

import math
import re

import pytest
import torch

from neco_loss import SoftSorter, get_sorter, soft_permutation
from neco_loss.sorting import BACKENDS, NETWORKS, RELAXATIONS


class TestRegistry:
    def test_names(self):
        assert set(BACKENDS) == {"native", "native-python", "diffsort", "torchsort"}
        assert set(NETWORKS) == {"bitonic", "bitonic_padded", "odd_even"}
        assert list(RELAXATIONS)[0] == "cauchy"

    def test_get_sorter_is_soft_permutation(self):
        x = torch.randn(5, 49)
        sorter = get_sorter("odd_even", relaxation="logistic", steepness=20.0)
        assert isinstance(sorter, SoftSorter)
        for a, b in zip(sorter(x), soft_permutation(x, "odd_even", 20.0, "logistic"), strict=True):
            assert torch.equal(a, b)

    def test_defaults_are_the_reference_code(self):
        sorter = get_sorter()
        assert (sorter.network, sorter.relaxation, sorter.steepness) == ("bitonic", "cauchy", 100.0)
        assert sorter.backend == "native"

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (
                {"network": "merge"},
                r"network must be one of \['bitonic', 'bitonic_padded', 'odd_even'\] "
                r"but is 'merge'",
            ),
            (
                {"backend": "cuda"},
                r"backend must be one of \['native', 'native-python', 'diffsort', 'torchsort'\] "
                "but is 'cuda'",
            ),
            ({"relaxation": "softmax"}, r"relaxation must be one of \['cauchy'.*but is 'softmax'"),
            ({"steepness": 0.0}, r"steepness must be finite and > 0 but is 0.0"),
            ({"steepness": -5}, r"steepness must be finite and > 0 but is -5"),
            ({"steepness": math.inf}, r"steepness must be finite and > 0 but is inf"),
            ({"steepness": math.nan}, r"steepness must be finite and > 0 but is nan"),
            ({"art_lambda": 0.0}, r"art_lambda must be finite and > 0"),
        ],
    )
    def test_bad_options(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            soft_permutation(torch.randn(2, 4), **kwargs)

    def test_steepness_type(self):
        with pytest.raises(TypeError, match=r"steepness must be a real number but is str"):
            get_sorter(steepness="100")


class TestInputErrors:
    @pytest.mark.parametrize("shape", [(4,), (2, 3, 4), ()])
    def test_not_2d(self, shape):
        with pytest.raises(ValueError, match=re.escape(f"x must be 2-D but has shape {shape}")):
            soft_permutation(torch.randn(shape))

    def test_no_columns(self):
        with pytest.raises(ValueError, match=r"x must have n >= 1 columns but has shape \(3, 0\)"):
            soft_permutation(torch.randn(3, 0))

    def test_integer_dtype(self):
        with pytest.raises(
            TypeError, match=r"x must have a floating dtype but has dtype torch.int64"
        ):
            soft_permutation(torch.arange(6).view(2, 3))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match=r"x must be a torch.Tensor but is list"):
            soft_permutation([[1.0, 2.0]])

    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
    def test_non_finite(self, bad):
        x = torch.randn(3, 5)
        x[1, 2] = bad
        with pytest.raises(ValueError, match=r"x must be finite but holds 1 NaN or Inf values"):
            soft_permutation(x)

    def test_zero_rows(self):
        sorted_x, perm = soft_permutation(torch.randn(0, 7))
        assert sorted_x.shape == (0, 7) and perm.shape == (0, 7, 7)


def saved_bytes(backend: str, rows: int, n: int) -> int:
    """Bytes autograd keeps for backward of one soft sort (distinct tensors saved by its nodes)."""
    sizes = {}

    def pack(tensor):
        sizes[(tensor.data_ptr(), tuple(tensor.shape))] = tensor.numel() * tensor.element_size()
        return tensor

    x = torch.randn(rows, n, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        soft_permutation(x, backend=backend)
    return sum(sizes.values())


def test_native_keeps_only_its_input_for_backward():
    rows, n = 64, 49
    assert saved_bytes("native", rows, n) == rows * n * 4
    # diffsort keeps every layer: more than 20 permutation matrices per row at n = 49
    assert saved_bytes("diffsort", rows, n) > 20 * rows * n * n * 4


def test_native_backward_matches_in_chunks(monkeypatch):
    """Backward processes rows in chunks; the result must not depend on the chunk size."""
    from neco_loss.sorting import native

    x = torch.randn(37, 49, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(37, 49, 49, dtype=torch.float64)

    def grad():
        x.grad = None
        (soft_permutation(x)[1] * weights).sum().backward()
        return x.grad.clone()

    whole = grad()
    monkeypatch.setattr(native, "CHUNK_BYTES", {"cpu": (1, 1), "cuda": (1, 1)})
    torch.testing.assert_close(grad(), whole, rtol=0, atol=1e-12)


def test_torchsort_construction():
    """Hard ranks give one-hot rows; half-way soft ranks split a row between two ranks."""
    x = torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64)
    _, perm = soft_permutation(x, steepness=1000.0, backend="torchsort")
    torch.testing.assert_close(perm[0], torch.eye(3, dtype=torch.float64)[[2, 0, 1]])
    ties = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    _, perm = soft_permutation(ties, backend="torchsort")
    torch.testing.assert_close(perm[0], torch.full((2, 2), 0.5, dtype=torch.float64))
