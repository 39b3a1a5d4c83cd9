"""How the log clamp ``epsilon`` of the CE affects float32 values and gradients.

For each relaxation, steepness and epsilon: the CE ``-mean sum_rank Q_t log max(Q_s, eps)`` and
its gradient with respect to the student's scores are computed in float32 and float64 on the
same inputs (cosine similarities of random 64-d features to 49 references, 2000 rows). Reported:
the relative error of the float32 gradient (norm of the difference over the norm of the float64
gradient) and the float32 - float64 loss difference.

Usage:
    python benchmarks/epsilon.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

from neco_loss import soft_permutation
from neco_loss.permutation_losses import permutation_loss

EPSILONS = (1e-30, 1e-12, 1e-8, 1e-6, 1e-3)


def scores(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(2000, 64, generator=generator, dtype=torch.float64), dim=-1)
    references = F.normalize(torch.randn(49, 64, generator=generator, dtype=torch.float64), dim=-1)
    return queries @ references.T


def loss_and_gradient(
    student: torch.Tensor, teacher: torch.Tensor, relaxation: str, steepness: float, eps: float
) -> tuple[float, torch.Tensor]:
    student = student.detach().requires_grad_()
    _, q_student = soft_permutation(student, steepness=steepness, relaxation=relaxation)
    with torch.no_grad():
        _, q_teacher = soft_permutation(teacher, steepness=steepness, relaxation=relaxation)
    loss = permutation_loss(q_student, q_teacher, epsilon=eps).mean()
    loss.backward()
    assert student.grad is not None
    return float(loss.detach()), student.grad.double()


def main() -> None:
    student, teacher = scores(0), scores(1)
    print("| relaxation | steepness | epsilon | float32 gradient rel. error | loss f32 - f64 |")
    print("|---|---|---|---|---|")
    for relaxation in ("cauchy", "logistic", "logistic_phi"):
        for steepness in (100.0, 1000.0):
            for eps in EPSILONS:
                loss32, grad32 = loss_and_gradient(
                    student.float(), teacher.float(), relaxation, steepness, eps
                )
                loss64, grad64 = loss_and_gradient(student, teacher, relaxation, steepness, eps)
                error = float((grad32 - grad64).norm() / grad64.norm())
                print(
                    f"| {relaxation} | {steepness:g} | {eps:g} | {error:.1e} "
                    f"| {loss32 - loss64:+.1e} |"
                )


if __name__ == "__main__":
    main()
