"""CE / L1 / L2 between soft permutations, top-K ranks and directions."""

import math

import pytest
import torch

from neco_loss import soft_permutation
from neco_loss.permutation_losses import permutation_loss


def perms(rows: int = 3, n: int = 6, seed: int = 0, steepness: float = 5.0) -> torch.Tensor:
    scores = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed))
    return soft_permutation(scores.double(), "odd_even", steepness)[1]


class TestCrossEntropy:
    def test_matches_hand_computation(self):
        q_teacher = torch.tensor([[[0.75, 0.25], [0.25, 0.75]]])
        q_student = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
        expected = -(0.75 * math.log(0.5) + 0.25 * math.log(0.5))  # every element alike
        assert permutation_loss(q_student, q_teacher).item() == pytest.approx(expected)

    def test_sum_over_ranks_mean_over_elements(self):
        q_student, q_teacher = perms(seed=1), perms(seed=2)
        expected = -(q_teacher * q_student.log()).sum(dim=2).mean(dim=1)
        torch.testing.assert_close(permutation_loss(q_student, q_teacher), expected)

    def test_directions(self):
        q_student, q_teacher = perms(seed=3), perms(seed=4)
        forward = permutation_loss(q_student, q_teacher)
        backward = permutation_loss(q_student, q_teacher, direction="student_to_teacher")
        both = permutation_loss(q_student, q_teacher, direction="both")
        torch.testing.assert_close(both, forward + backward)
        torch.testing.assert_close(backward, permutation_loss(q_teacher, q_student))

    def test_minimal_at_the_teacher(self):
        q_teacher = perms(seed=5)
        at_teacher = permutation_loss(q_teacher, q_teacher)
        for seed in range(6, 16):
            assert (permutation_loss(perms(seed=seed), q_teacher) >= at_teacher - 1e-12).all()

    def test_epsilon_keeps_zero_probabilities_finite(self):
        q_teacher = torch.eye(3).expand(2, 3, 3)
        q_student = torch.eye(3)[[1, 2, 0]].expand(2, 3, 3).clone().requires_grad_()
        loss = permutation_loss(q_student, q_teacher, epsilon=1e-8)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(q_student.grad).all()
        assert loss[0].item() == pytest.approx(-math.log(1e-8), rel=1e-6)

    def test_default_log_is_unclamped_above_the_smallest_normal(self):
        """The reference code's unclamped log wherever it is finite, e.g. odd-even at
        steepness 100 where entries far below 1e-8 occur (the old 1e-8 clamp changed them)."""
        scores = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)).double()
        q_student = soft_permutation(scores, "odd_even", 100.0)[1]
        q_teacher = soft_permutation(scores + 0.1, "odd_even", 100.0)[1]
        assert float(q_student.min()) < 1e-8  # the case the default must get right
        assert float(q_student.min()) > torch.finfo(torch.float64).tiny
        unclamped = -(q_teacher * q_student.log()).sum(dim=2).mean(dim=1)
        torch.testing.assert_close(
            permutation_loss(q_student, q_teacher), unclamped, rtol=1e-15, atol=0
        )
        assert not torch.allclose(
            permutation_loss(q_student, q_teacher, epsilon=1e-8), unclamped, rtol=1e-12, atol=0
        )

    def test_default_turns_log_zero_into_a_large_finite_number(self):
        q_teacher = torch.eye(3).expand(2, 3, 3)
        q_student = torch.eye(3)[[1, 2, 0]].expand(2, 3, 3).clone().requires_grad_()
        loss = permutation_loss(q_student, q_teacher)
        loss.sum().backward()
        assert torch.isfinite(q_student.grad).all()
        assert loss[0].item() == pytest.approx(-math.log(torch.finfo(torch.float32).tiny))

    def test_teacher_gets_no_gradient(self):
        q_student = perms(seed=7).requires_grad_()
        q_teacher = perms(seed=8).requires_grad_()
        permutation_loss(q_student, q_teacher, direction="both").sum().backward()
        assert q_teacher.grad is None and q_student.grad is not None


class TestTopK:
    def test_uses_the_highest_ranks(self):
        q_student, q_teacher = perms(seed=9), perms(seed=10)
        expected = -(q_teacher[..., -2:] * q_student[..., -2:].log()).sum(dim=2).mean(dim=1)
        torch.testing.assert_close(permutation_loss(q_student, q_teacher, top_k=2), expected)

    def test_full_top_k_is_no_top_k(self):
        q_student, q_teacher = perms(seed=11), perms(seed=12)
        torch.testing.assert_close(
            permutation_loss(q_student, q_teacher, top_k=6), permutation_loss(q_student, q_teacher)
        )

    @pytest.mark.parametrize("top_k, error", [(0, ValueError), (7, ValueError), (2.0, TypeError)])
    def test_bad_top_k(self, top_k, error):
        with pytest.raises(error, match="top_k"):
            permutation_loss(perms(), perms(seed=1), top_k=top_k)


class TestDistances:
    @pytest.mark.parametrize("loss", ["l1", "l2"])
    def test_zero_at_the_teacher_and_positive_elsewhere(self, loss):
        q = perms(seed=13)
        assert permutation_loss(q, q, loss=loss).abs().max() == 0
        assert (permutation_loss(perms(seed=14), q, loss=loss) > 0).all()

    def test_l1_and_l2_formulas(self):
        q_student, q_teacher = perms(seed=15), perms(seed=16)
        difference = q_student - q_teacher
        torch.testing.assert_close(
            permutation_loss(q_student, q_teacher, loss="l1"), difference.abs().mean(dim=(1, 2))
        )
        torch.testing.assert_close(
            permutation_loss(q_student, q_teacher, loss="l2"), difference.square().mean(dim=(1, 2))
        )

    def test_direction_is_refused_for_symmetric_losses(self):
        with pytest.raises(ValueError, match="direction='both' applies to loss='ce' only"):
            permutation_loss(perms(), perms(seed=1), loss="l1", direction="both")


class TestValidation:
    def test_unknown_names_list_the_valid_ones(self):
        with pytest.raises(ValueError, match=r"loss must be one of \['ce', 'l1', 'l2'\]"):
            permutation_loss(perms(), perms(), loss="kl")
        with pytest.raises(ValueError, match="direction must be one of"):
            permutation_loss(perms(), perms(), direction="up")

    def test_shapes(self):
        with pytest.raises(ValueError, match=r"q_student must be \(rows, n, n\)"):
            permutation_loss(torch.rand(2, 3, 4), torch.rand(2, 3, 4))
        with pytest.raises(ValueError, match=r"q_teacher must have q_student's shape"):
            permutation_loss(torch.rand(2, 3, 3), torch.rand(1, 3, 3))

    @pytest.mark.parametrize("epsilon", [0.0, -1.0, float("nan")])
    def test_epsilon(self, epsilon):
        with pytest.raises(ValueError, match="epsilon"):
            permutation_loss(perms(), perms(), epsilon=epsilon)
