"""``neco_loss``: parity with the reference code's formulas on diffsort, properties, errors."""

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from diffsort import DiffSortNet
from hypothesis import given
from hypothesis import strategies as st

from neco_loss import neco_loss


def features(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference_code_loss(student, teacher, references, steepness=(100.0, 100.0), sim="cosine"):
    """The reference code's ``compute_knn_perm_mat`` + ``compute_knn_subloss``, on diffsort.

    ``references`` is ``(B, R, D)``; its shuffle is done by the caller. For ``sim="euclidean"``
    the score is the negative distance (our convention; the reference sorted plain distances).
    """
    batch, patches, _ = student.shape
    count = references.shape[1]

    def perm_mat(queries, sorter):
        if sim == "cosine":
            dist = torch.einsum(
                "bhc,bwc->bhw", F.normalize(queries, dim=-1), F.normalize(references, dim=-1)
            )
        else:
            dist = -torch.cdist(queries, references)
        _, perm = sorter(dist.reshape(-1, count))
        return perm.reshape(batch, patches, count, count).permute(0, 3, 2, 1)  # (B, rank, i, N)

    student_sorter = DiffSortNet("bitonic", count, steepness=steepness[0])
    teacher_sorter = DiffSortNet("bitonic", count, steepness=steepness[1])
    p = perm_mat(student, student_sorter)
    with torch.no_grad():
        q = perm_mat(teacher, teacher_sorter)
    return -torch.mean(torch.sum(q * torch.log(p), dim=1))


class TestReferenceParity:
    @pytest.mark.parametrize("count", [49, 16])
    @pytest.mark.parametrize("steepness", [(100.0, 100.0), (10.0, 100.0)])
    def test_value_and_gradient(self, count, steepness):
        student = features(3, 49, 32, seed=0).requires_grad_()
        teacher = features(3, 49, 32, seed=1)
        references = features(3, count, 32, seed=2)
        ours = neco_loss(student, teacher, references, steepness=steepness)
        (grad_ours,) = torch.autograd.grad(ours, student)
        theirs = reference_code_loss(student, teacher, references, steepness)
        (grad_theirs,) = torch.autograd.grad(theirs, student)
        assert torch.isfinite(theirs)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            grad_ours, grad_theirs, rtol=0, atol=1e-5 * grad_theirs.abs().max().item()
        )

    def test_shared_references_equal_per_image_copies(self):
        student, teacher = features(2, 49, 8, seed=3), features(2, 49, 8, seed=4)
        shared = features(49, 8, seed=5)
        torch.testing.assert_close(
            neco_loss(student, teacher, shared),
            reference_code_loss(student, teacher, shared.expand(2, -1, -1)),
            rtol=0,
            atol=1e-5,
        )

    def test_euclidean_is_negative_distance(self):
        student, teacher = features(2, 49, 8, seed=6), features(2, 49, 8, seed=7)
        references = features(2, 49, 8, seed=8)
        torch.testing.assert_close(
            neco_loss(student, teacher, references, similarity="euclidean"),
            reference_code_loss(student, teacher, references, sim="euclidean"),
            rtol=0,
            atol=1e-5,
        )

    def test_native_equals_diffsort_backend(self):
        student, teacher = features(2, 49, 8, seed=9), features(2, 49, 8, seed=10)
        references = features(2, 49, 8, seed=11)
        for options in ({}, {"direction": "both"}, {"top_k": 5}, {"loss": "l2"}):
            torch.testing.assert_close(
                neco_loss(student, teacher, references, **options),
                neco_loss(student, teacher, references, backend="diffsort", **options),
                rtol=0,
                atol=1e-5,
            )


class TestProperties:
    def test_ce_is_minimal_and_flat_when_student_equals_teacher(self):
        teacher = features(2, 16, 8, seed=12, dtype=torch.float64)
        references = features(2, 16, 8, seed=13, dtype=torch.float64)
        student = teacher.clone().requires_grad_()
        at_teacher = neco_loss(student, teacher, references, steepness=10.0)
        (gradient,) = torch.autograd.grad(at_teacher, student)
        assert gradient.abs().max() < 1e-10
        for seed in range(14, 20):
            moved = teacher + 0.3 * features(2, 16, 8, seed=seed, dtype=torch.float64)
            assert neco_loss(moved, teacher, references, steepness=10.0) > at_teacher

    @pytest.mark.parametrize("loss", ["l1", "l2"])
    def test_distances_are_zero_when_student_equals_teacher(self, loss):
        teacher, references = features(2, 49, 8, seed=20), features(49, 8, seed=21)
        assert neco_loss(teacher, teacher, references, loss=loss).item() == 0
        assert neco_loss(features(2, 49, 8, seed=22), teacher, references, loss=loss) > 0

    def test_only_the_student_gets_gradients(self):
        student = features(2, 49, 8, seed=23).requires_grad_()
        teacher = features(2, 49, 8, seed=24).requires_grad_()
        references = features(2, 49, 8, seed=25).requires_grad_()
        neco_loss(student, teacher, references, direction="both").backward()
        assert student.grad is not None and student.grad.abs().sum() > 0
        assert teacher.grad is None and references.grad is None

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_half_inputs(self, dtype):
        student = features(2, 49, 8, seed=26).to(dtype).requires_grad_()
        teacher, references = features(2, 49, 8, seed=27), features(49, 8, seed=28)
        loss = neco_loss(student, teacher.to(dtype), references.to(dtype))
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert torch.isfinite(student.grad).all()
        exact = neco_loss(student.float(), teacher.to(dtype).float(), references.to(dtype).float())
        torch.testing.assert_close(loss, exact)

    def test_autocast_is_disabled_inside(self):
        student, teacher = features(2, 49, 8, seed=29), features(2, 49, 8, seed=30)
        references = features(49, 8, seed=31)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = neco_loss(student, teacher, references)
        torch.testing.assert_close(loss, neco_loss(student, teacher, references))

    @pytest.mark.parametrize("relaxation", ["cauchy", "logistic", "logistic_phi", "optimal"])
    def test_steepness_1000_is_finite(self, relaxation):
        student = features(2, 49, 8, seed=32).requires_grad_()
        teacher, references = features(2, 49, 8, seed=33), features(2, 49, 8, seed=34)
        loss = neco_loss(student, teacher, references, steepness=1000.0, relaxation=relaxation)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()

    @pytest.mark.parametrize("similarity", ["cosine", "euclidean"])
    def test_zero_features_and_duplicate_references(self, similarity):
        student = features(2, 16, 8, seed=35)
        student[0, :4] = 0
        student.requires_grad_()
        references = features(1, 8, seed=36).expand(2, 16, 8)  # every reference the same
        references = torch.cat([references[:, :8], student.detach()[:, :8]], dim=1)
        loss = neco_loss(student, student.detach(), references, similarity=similarity)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


cases = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 3),
        "patches": st.integers(1, 9),
        "count": st.sampled_from([1, 2, 3, 5, 8, 16, 17]),
        "dim": st.integers(1, 6),
        "shared": st.booleans(),
        "network": st.sampled_from(["bitonic", "bitonic_padded", "odd_even"]),
        "relaxation": st.sampled_from(["cauchy", "logistic", "logistic_phi", "optimal"]),
        "steepness": st.tuples(st.floats(1.0, 1000.0), st.floats(1.0, 1000.0)),
        "similarity": st.sampled_from(["cosine", "euclidean"]),
        "loss": st.sampled_from(["ce", "l1", "l2"]),
        "scale": st.sampled_from([0.0, 1e-4, 1.0, 1e3]),
        "dtype": st.sampled_from([torch.float32, torch.float64]),
        "all_ranks": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


@given(cases)
def test_never_nan_for_legal_inputs(case):
    """Default log floor (the dtype's smallest normal): finite loss and gradient everywhere,
    constant rows (scale 0) and ties (rounded references) included."""
    generator = torch.Generator().manual_seed(case["seed"])
    shape = (case["batch"], case["patches"], case["dim"])
    dtype = case["dtype"]
    student = (
        torch.randn(shape, generator=generator, dtype=dtype) * case["scale"]
    ).requires_grad_()
    teacher = torch.randn(shape, generator=generator, dtype=dtype)
    reference_shape = (case["count"], case["dim"])
    if not case["shared"]:
        reference_shape = (case["batch"], *reference_shape)
    references = torch.randn(reference_shape, generator=generator, dtype=dtype).round()
    loss = neco_loss(
        student,
        teacher,
        references,
        network=case["network"],
        relaxation=case["relaxation"],
        steepness=case["steepness"],
        similarity=case["similarity"],
        loss=case["loss"],
        top_k=None if case["all_ranks"] else min(2, case["count"]),
    )
    loss.backward()
    assert torch.isfinite(loss) and loss >= 0
    assert torch.isfinite(student.grad).all()


class TestValidation:
    def test_shapes(self):
        student = features(2, 49, 8, seed=0)
        with pytest.raises(ValueError, match=r"teacher must have student's shape \(2, 49, 8\)"):
            neco_loss(student, features(2, 48, 8, seed=1), student)
        with pytest.raises(ValueError, match=r"references must be \(2, R, 8\) or \(R, 8\)"):
            neco_loss(student, student, features(3, 49, 8, seed=2))
        with pytest.raises(ValueError, match=r"references must be \(2, R, 8\) or \(R, 8\)"):
            neco_loss(student, student, features(49, 7, seed=2))
        with pytest.raises(ValueError, match="student must be 3-D"):
            neco_loss(student[0], student[0], student[0])
        with pytest.raises(ValueError, match="references must be"):
            neco_loss(student, student, features(49, seed=3))

    def test_types_and_values(self):
        student = features(2, 49, 8, seed=0)
        with pytest.raises(TypeError, match="student must have a floating dtype"):
            neco_loss(student.long(), student, student)
        bad = student.clone()
        bad[0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="teacher must be finite"):
            neco_loss(student, bad, student)

    def test_options(self):
        student = features(2, 49, 8, seed=0)
        with pytest.raises(
            ValueError, match=r"similarity must be one of \['cosine', 'euclidean'\]"
        ):
            neco_loss(student, student, student, similarity="dot")
        with pytest.raises(ValueError, match="top_k must be <= the number of references R = 49"):
            neco_loss(student, student, student, top_k=50)
        with pytest.raises(ValueError, match="network must be one of"):
            neco_loss(student, student, student, network="bubble")
        with pytest.raises(ValueError, match=r"steepness\[1\] \(teacher\)"):
            neco_loss(student, student, student, steepness=(1.0, -1.0))
        with pytest.raises(ValueError, match="steepness must be one number or a"):
            neco_loss(student, student, student, steepness=(1.0, 2.0, 3.0))
        with pytest.raises(ValueError, match="n=22 is not a sorting network"):
            neco_loss(student, student, student[:, :22])
