"""The native backend computes what diffsort 0.2.0 computes: values and gradients."""

import pytest
import torch

from neco_loss import soft_permutation
from neco_loss.sorting import RELAXATIONS
from neco_loss.sorting.kernels.cpp import build_info
from neco_loss.sorting.networks import sorts_every_input

VALID_BITONIC_SIZES = [n for n in range(1, 131) if sorts_every_input("bitonic", n)]
GRADIENT_SIZES = [1, 2, 3, 5, 8, 16, 17, 31, 49, 64, 100, 128]
# diffsort's gaussian backward keeps sigma = 1 / steepness as a float32 tensor, so its float64
# gradients carry float32 rounding.
GRADIENT_RTOL = {"gaussian": 1e-6}


NATIVE_BACKENDS = ["native", "native-python"]  # the compiled kernel and the PyTorch one


def run(x: torch.Tensor, backend: str, network: str, relaxation: str):
    x = x.detach().requires_grad_()
    sorted_x, perm = soft_permutation(x, network, 30.0, relaxation, backend)
    weight_perm = torch.linspace(-1, 1, perm.numel(), dtype=x.dtype).view_as(perm)
    weight_sorted = torch.linspace(1, -1, sorted_x.numel(), dtype=x.dtype).view_as(sorted_x)
    ((perm * weight_perm).sum() + (sorted_x * weight_sorted).sum()).backward()
    return sorted_x.detach(), perm.detach(), x.grad


def sizes(network: str):
    return VALID_BITONIC_SIZES if network == "bitonic" else range(1, 131)


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("relaxation", RELAXATIONS)
@pytest.mark.parametrize("network", ["bitonic", "odd_even"])
def test_values_match_for_every_size(network, relaxation, backend):
    """float64: the same values as diffsort to 1e-9, every size up to 130."""
    generator = torch.Generator().manual_seed(0)
    for n in sizes(network):
        x = torch.randn(2, n, generator=generator).double()
        with torch.no_grad():
            ours = soft_permutation(x, network, 30.0, relaxation, backend)
            reference = soft_permutation(x, network, 30.0, relaxation, "diffsort")
        for mine, theirs in zip(ours, reference, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-9, msg=f"n={n}")


@pytest.mark.parametrize("relaxation", RELAXATIONS)
@pytest.mark.parametrize("network", ["bitonic", "odd_even"])
def test_float32_values(network, relaxation):
    """float32: the PyTorch backend repeats diffsort's operations (1e-5). The relaxed network
    amplifies rounding through up to 130 layers (odd-even, n = 96, Gaussian: ~1e-4 for a last-bit
    change of erf), so the compiled kernel, which runs the values in double, is held to
    diffsort's own float32 accuracy: no farther from the float64 result, on every CPU."""
    generator = torch.Generator().manual_seed(0)
    worst, worst_reference = 0.0, 0.0
    for n in sizes(network):
        x = torch.randn(2, n, generator=generator)
        with torch.no_grad():
            exact = soft_permutation(x.double(), network, 30.0, relaxation, "native-python")
            reference = soft_permutation(x, network, 30.0, relaxation, "diffsort")
            portable = soft_permutation(x, network, 30.0, relaxation, "native-python")
            compiled = soft_permutation(x, network, 30.0, relaxation, "native")
        for mine, theirs in zip(portable, reference, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5, msg=f"n={n}")
        for mine, theirs, truth in zip(compiled, reference, exact, strict=True):
            own_error = (theirs.double() - truth).abs().max().item()
            error = (mine.double() - truth).abs().max().item()
            assert error <= 2 * own_error + 1e-5, (
                f"n={n}: {error:.2e} vs {own_error:.2e} ({build_info()})"
            )
            worst, worst_reference = max(worst, error), max(worst_reference, own_error)
    assert worst <= 1.5 * worst_reference + 1e-6, (
        f"{worst:.2e} vs diffsort {worst_reference:.2e} ({build_info()})"
    )


# float32 gradients through 100+ layers differ from float64 by up to ~1e-4 of their scale in
# both backends (diffsort's own deviation is the larger one), hence the float32 tolerance.
@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 5e-4), (torch.float64, 1e-9)])
@pytest.mark.parametrize("relaxation", RELAXATIONS)
@pytest.mark.parametrize("network", ["bitonic", "odd_even"])
def test_gradients_match(network, relaxation, dtype, rtol, backend):
    rtol = max(rtol, GRADIENT_RTOL.get(relaxation, 0.0))
    generator = torch.Generator().manual_seed(1)
    for n in GRADIENT_SIZES:
        x = torch.randn(3, n, generator=generator).to(dtype)
        *_, grad_native = run(x, backend, network, relaxation)
        *_, grad_diffsort = run(x, "diffsort", network, relaxation)
        scale = grad_diffsort.abs().max().item()
        torch.testing.assert_close(
            grad_native, grad_diffsort, rtol=0, atol=rtol * scale, msg=f"n={n}"
        )


def test_half_inputs_are_computed_in_float32():
    """Half inputs are sorted as their float32 values: the float64 result to float32 accuracy
    (diffsort's float32 result is itself ~1e-5 from it, so it is no reference here)."""
    x = torch.randn(4, 49, generator=torch.Generator().manual_seed(2))
    for dtype in (torch.float16, torch.bfloat16):
        sorted_half, perm_half = soft_permutation(x.to(dtype))
        sorted_ref, perm_ref = soft_permutation(x.to(dtype).double(), backend="native-python")
        assert perm_half.dtype == torch.float32 and sorted_half.dtype == torch.float32
        torch.testing.assert_close(perm_half.double(), perm_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(sorted_half.double(), sorted_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [22, 45, 70])
@pytest.mark.parametrize("backend", ["native", "native-python", "diffsort"])
def test_mis_sorting_bitonic_sizes_are_refused(backend, n):
    with pytest.raises(ValueError, match=rf"n={n} is not a sorting network.*bitonic_padded"):
        soft_permutation(torch.randn(2, n), "bitonic", backend=backend)


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 64, 128])
def test_padded_bitonic_is_diffsort_for_powers_of_two(n, backend):
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    ours = soft_permutation(x, "bitonic_padded", backend=backend)
    reference = soft_permutation(x, "bitonic", backend="diffsort")
    for mine, theirs in zip(ours, reference, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("network", ["bitonic", "bitonic_padded", "odd_even"])
def test_native_on_cuda_matches_cpu(network):
    x = torch.randn(256, 49, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(256, 49, 49, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        values = x.clone().to(device).requires_grad_()  # a fresh leaf on each device
        sorted_x, perm = soft_permutation(values, network)
        (perm * weights.to(device)).sum().backward()
        results.append((sorted_x.detach().cpu(), perm.detach().cpu(), values.grad.cpu()))
    for on_cpu, on_cuda in zip(*results, strict=True):
        torch.testing.assert_close(on_cuda, on_cpu, rtol=0, atol=1e-9)
