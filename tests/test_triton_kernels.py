"""The Triton (CUDA) kernels, run on the CPU by Triton's interpreter (``TRITON_INTERPRET=1``):
values and gradients, the self-check whatever the caller's grad mode, int64 row offsets, and
what a failing check does."""

import os
import subprocess
import sys

import pytest
import torch

triton_sort = pytest.importorskip("neco_loss.sorting.kernels.triton_sort")
pytest.importorskip("triton")

# Routes CPU tensors to the Triton kernels: the interpreter runs them with NumPy.
ROUTE_CPU_TO_TRITON = """
import torch
from neco_loss.sorting import kernels
kernels.KERNELS_BY_DEVICE["cpu"] = "triton_sort"
"""


def run_interpreted(script: str) -> str:
    """Run ``script`` in a fresh process under Triton's interpreter; return its stdout."""
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


PARITY = """
import torch
from neco_loss import soft_permutation
from neco_loss.sorting.kernels import CrossEntropySettings, SortSettings
from neco_loss.sorting.kernels.triton_sort import soft_sort, sort_cross_entropy, verified
from neco_loss.permutation_losses import permutation_loss

generator = torch.Generator().manual_seed(0)
checked = 0
for network in ("bitonic", "bitonic_padded", "odd_even"):
    for relaxation in ("cauchy", "logistic", "reciprocal"):
        for n in (1, 2, 5, 16, 17):
            x = torch.randn(3, n, generator=generator, dtype=torch.float64, requires_grad=True)
            weights = torch.randn(3, n, n, generator=generator, dtype=torch.float64)
            sorted_weights = torch.randn(3, n, generator=generator, dtype=torch.float64)
            outputs = []
            for run in ("triton", "native-python"):
                if run == "triton":
                    sorted_x, perm = soft_sort(x, SortSettings(network, relaxation, 33.3))
                else:
                    sorted_x, perm = soft_permutation(x, network, 33.3, relaxation, run)
                loss = (perm * weights).sum() + (sorted_x * sorted_weights).sum()
                (grad,) = torch.autograd.grad(loss, x)
                outputs.append((sorted_x.detach(), perm.detach(), grad))
            for mine, theirs in zip(*outputs):
                torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-9)
            checked += 1
for direction, top_k in (("teacher_to_student", None), ("both", 3), ("student_to_teacher", 2)):
    for n in (1, 5, 16):
        student = torch.randn(4, n, generator=generator, dtype=torch.float64, requires_grad=True)
        teacher = torch.randn(4, n, generator=generator, dtype=torch.float64)
        top = None if top_k is None else min(top_k, n)
        settings = CrossEntropySettings(
            "bitonic", "cauchy", 33.3, 20.0, top_k=top,
            teacher_to_student=direction != "student_to_teacher",
            student_to_teacher=direction != "teacher_to_student",
        )
        weights = torch.rand(4, generator=generator, dtype=torch.float64)
        fused = sort_cross_entropy(student, teacher, settings)
        (grad_fused,) = torch.autograd.grad((fused * weights).sum(), student)
        _, q_student = soft_permutation(student, "bitonic", 33.3, backend="native-python")
        _, q_teacher = soft_permutation(teacher, "bitonic", 20.0, backend="native-python")
        reference = permutation_loss(q_student, q_teacher, direction=direction, top_k=top)
        (grad_reference,) = torch.autograd.grad((reference * weights).sum(), student)
        torch.testing.assert_close(fused, reference, rtol=0, atol=1e-9)
        torch.testing.assert_close(grad_fused, grad_reference, rtol=0, atol=1e-9)
        checked += 1
assert verified("bitonic", 49, "cauchy", torch.float32, torch.device("cpu"))
print("checked", checked)
"""


@pytest.mark.slow
def test_triton_kernels_in_the_interpreter():
    """The PyTorch backend's values and gradients (float64) for every network and supported
    relaxation, the fused CE's for every direction and top_k, and the self-check a GPU runs."""
    assert "checked 54" in run_interpreted(PARITY)


FIRST_CALL_NO_GRAD = (
    ROUTE_CPU_TO_TRITON
    + """
import warnings
from neco_loss import soft_permutation
from neco_loss.functional import SortOptions, soft_permutation_loss
from neco_loss.sorting.kernels import kernel_for, triton_sort

warnings.simplefilter("error")  # a fallback warning fails the script
generator = torch.Generator().manual_seed(0)
x = torch.randn(4, 16, generator=generator, dtype=torch.float64)
student = torch.randn(4, 12, generator=generator, dtype=torch.float64)
teacher = torch.randn(4, 12, generator=generator, dtype=torch.float64)
fused_options = SortOptions(network="odd_even", relaxation="logistic")

# The first call of each configuration inside no_grad, as the teacher's sort makes it.
with torch.no_grad():
    _, perm_no_grad = soft_permutation(x)
    terms_no_grad = soft_permutation_loss(student, teacher, fused_options)
    assert terms_no_grad.q_student is None  # the fused kernel, not the materialising fallback

assert kernel_for(x, "bitonic", "cauchy") is triton_sort
assert kernel_for(student, "odd_even", "logistic") is triton_sort

# With grad back on, the Triton autograd functions are the ones that ran.
x_grad = x.clone().requires_grad_()
_, perm = soft_permutation(x_grad)
print("sort", type(perm.grad_fn).__name__)
try:
    torch.autograd.grad((perm * perm.detach()).sum(), x_grad, create_graph=True)
except RuntimeError as error:
    print("double backward:", error)
terms = soft_permutation_loss(student.clone().requires_grad_(), teacher, fused_options)
print("fused", type(terms.per_row.grad_fn).__name__)
torch.testing.assert_close(perm.detach(), perm_no_grad)
torch.testing.assert_close(terms.per_row.detach(), terms_no_grad.per_row)
"""
)


@pytest.mark.slow
def test_first_call_no_grad_uses_the_triton_kernels():
    """The self-check runs whatever the caller's grad mode: a first call inside no_grad verifies
    the kernels and later calls (grad on) use them, for a plain sort and for the fused CE."""
    output = run_interpreted(FIRST_CALL_NO_GRAD)
    assert "sort _TritonSortBackward" in output
    assert "fused _TritonSortCrossEntropyBackward" in output
    assert "double backward: the native (Triton kernels) soft sort has a first-order" in output


ROW_OFFSETS = """
import torch
import triton
import triton.language as tl
from neco_loss.sorting.kernels.triton_sort import _row_starts

@triton.jit
def offsets(row_ptr, n, out_ptr):
    row = tl.load(row_ptr)  # int32, as tl.program_id(0)
    row_start, perm_start = _row_starts(row, n)
    tl.store(out_ptr, row_start)
    tl.store(out_ptr + 1, perm_start)

for rows, n in ((900_000, 49), (40_000, 256), (2**31 // 49 - 1, 49)):
    out = torch.zeros(2, dtype=torch.int64)
    offsets[(1,)](torch.tensor([rows], dtype=torch.int32), n, out)
    assert rows * n * n >= 2**31
    assert out.tolist() == [rows * n, rows * n * n], (rows, n, out.tolist())
print("ok")
"""


def test_row_offsets_are_int64_past_two_to_the_31():
    """``row * n * n`` at rows * n**2 > 2**31 (8 GiB of float32 permutations), computed by the
    kernels' own offset helper: no int32 wrap-around."""
    assert "ok" in run_interpreted(ROW_OFFSETS)


@pytest.fixture
def fresh_check():
    triton_sort._kernel_failure.cache_clear()
    yield
    triton_sort._kernel_failure.cache_clear()


def check_bitonic_16() -> bool:
    return triton_sort.verified("bitonic", 16, "cauchy", torch.float64, torch.device("cpu"))


def test_a_kernel_that_fails_to_run_is_remembered_with_its_cause(monkeypatch, fresh_check):
    """A kernel that does not compile or launch on a GPU: one warning naming the error, then
    the PyTorch backend for that configuration, without checking again."""
    calls = []

    def fails_to_compile(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("gather is not supported on this GPU")

    monkeypatch.setattr(triton_sort, "soft_sort", fails_to_compile)
    with pytest.warns(RuntimeWarning, match="failed to run.*gather is not supported"):
        assert not check_bitonic_16()
    assert not check_bitonic_16()
    assert len(calls) == 1


def test_a_kernel_that_disagrees_is_not_used(monkeypatch, fresh_check):
    from neco_loss import soft_permutation
    from neco_loss.functional import SortOptions, soft_permutation_loss

    def slightly_off(x, settings):
        sorted_x, perm = soft_permutation(
            x, settings.network, settings.steepness, settings.relaxation, "native-python"
        )
        return sorted_x, perm * 1.001

    def fused_native_python(student, teacher, settings):
        options = SortOptions(settings.network, backend="native-python")
        return soft_permutation_loss(student, teacher, options).per_row

    monkeypatch.setattr(triton_sort, "soft_sort", slightly_off)
    monkeypatch.setattr(triton_sort, "sort_cross_entropy", fused_native_python)
    with pytest.warns(RuntimeWarning, match="disagree with the PyTorch backend \\(sort value"):
        assert not check_bitonic_16()


def test_other_errors_are_raised_and_not_remembered(monkeypatch, fresh_check):
    """Out of memory during the check is not the kernels' fault: it propagates, and the next
    call checks again."""

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(triton_sort, "soft_sort", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        check_bitonic_16()

    def fails_to_compile(*args, **kwargs):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(triton_sort, "soft_sort", fails_to_compile)
    with pytest.warns(RuntimeWarning, match="no kernel image"):
        assert not check_bitonic_16()
